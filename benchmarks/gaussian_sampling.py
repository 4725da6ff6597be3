"""Sampling throughput: DiT's DDIM-50 vs SiT's Euler-50 on the same network and batch.

    python benchmarks/gaussian_sampling.py --repeats 5 [--batches 32,128] [--cfg 1,3]

Network: the quickstart model (configs/quickstart.py: D=128, depth 4, patch 4, 16 mediators on
32x32x1) with learn_sigma=True, random weights, float32, so both samplers run the SAME forward
(the transport drops the variance half after the network, the Gaussian objective reads it). Both
samplers are one jitted `lax.scan` of 50 network evaluations (Euler ODE: 51 grid points; DDIM:
eta 0 on the "50" respacing, x0 clipped); with CFG every evaluation runs the doubled batch.
Variants are interleaved within each repeat (the machine is shared); reported: median / min wall
seconds per batch, images/s from the median, and the process CPU seconds per batch (median).
Writes benchmarks/results/gaussian_sampling.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from edit_jax import flops, models  # noqa: E402
from edit_jax.diffusion import gaussian, samplers, transport  # noqa: E402

NFE = 50


def quickstart_model():
  return models.build_model(None, input_size=32, in_channels=1, num_classes=10, patch_size=4,
                            hidden_size=128, depth=4, num_heads=4, mediator_num=16,
                            learn_sigma=True)


def samplers_for(model, cfg_scale: float) -> dict:
  d = gaussian.create_diffusion("", learn_sigma=True)
  ddim = gaussian.make_sample_fn(model, d, gaussian.GaussianSamplerConfig(
      "ddim", num_steps=NFE, clip_denoised=True), cfg_scale=cfg_scale, guide_channels=None)
  tr = transport.create_transport()
  ecfg = samplers.ODEConfig("euler", num_steps=NFE + 1)
  assert samplers.program(tr, ecfg).nfe == NFE
  euler = samplers.make_sample_fn(model, tr, ecfg, cfg_scale=cfg_scale, guide_channels=None)
  return {"DDIM-50 (gaussian)": jax.jit(lambda p, x, y: ddim(p, x, y).x),
          "Euler-50 ODE (transport)": jax.jit(lambda p, x, y: euler(p, x, y).x)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batches", default="32,128")
  ap.add_argument("--cfg", default="1,3", help="cfg scales (1 = no guidance)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gaussian_sampling.json"))
  args = ap.parse_args(argv)
  model = quickstart_model()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                        models.abstract_params(model))
  g = flops.gflops(model)
  rows = []
  for scale in [float(v) for v in args.cfg.split(",")]:
    fns = samplers_for(model, scale)
    for b in [int(v) for v in args.batches.split(",")]:
      x = jax.random.normal(jax.random.key(1), (b, 32, 32, 1))
      y = jnp.arange(b, dtype=jnp.int32) % 10
      for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn(params, x, y))
      wall = {k: [] for k in fns}
      cpu = {k: [] for k in fns}
      for _ in range(args.repeats):
        for k, fn in fns.items():  # interleaved
          c0, t0 = time.process_time(), time.perf_counter()
          jax.block_until_ready(fn(params, x, y))
          wall[k].append(time.perf_counter() - t0)
          cpu[k].append(time.process_time() - c0)
      for k in fns:
        med = float(np.median(wall[k]))
        rows.append({"sampler": k, "batch": b, "cfg_scale": scale, "nfe": NFE,
                     "median_s": med, "min_s": float(np.min(wall[k])),
                     "cpu_s_median": float(np.median(cpu[k])), "images_per_s": b / med,
                     "gflops_per_image": g * NFE * (2 if scale > 1 else 1)})
      base = [r for r in rows if r["batch"] == b and r["cfg_scale"] == scale]
      ratio = base[0]["median_s"] / base[1]["median_s"]
      for r in base:
        r["ddim_over_euler_time"] = ratio
  cols = ["sampler", "batch", "cfg_scale", "median_s", "min_s", "cpu_s_median", "images_per_s",
          "ddim_over_euler_time"]
  table = [{c: (f"{r[c]:.4g}" if isinstance(r[c], float) else r[c]) for c in cols} for r in rows]
  common.print_table(table, cols)
  load = os.getloadavg()
  common.write_json(args.out, {
      "command": "python benchmarks/gaussian_sampling.py " + " ".join(argv or sys.argv[1:]),
      "model": models.model_config(model), "gflops_per_forward": g, "repeats": args.repeats,
      "load_average_end": list(load), "rows": rows})


if __name__ == "__main__":
  main()
