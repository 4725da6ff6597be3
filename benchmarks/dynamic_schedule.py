"""Dynamic mediator schedule vs static mediator counts: GFLOPs per image and images/s.

A small SiT (default: 32x32x4 input, patch 2 -> 256 tokens as SiT-*/2 at 256 px, hidden 64, depth 2)
is built with n = 4, 16, 64 mediators and random weights (N(0, 0.02^2) + the init's zero gates
perturbed, so the network output is not zero). All runs use the same sampler (default: the official
SDE, Euler-Maruyama, sigma diffusion, Mean last step) and the same noise / labels.

Rows:
  static n=K (scan)       `samplers.make_sample_fn` jitted: one lax.scan, no host round trips.
  static n=K (step loop)  `DynamicSampler` with that one model: the per-step host loop, to separate
                          the loop overhead from the schedule.
  dynamic 4->16->64       `DynamicSampler` with per-sample switching (ratios, F, distance below).
GFLOPs are analytic (`edit_jax.flops`, 1 multiply-add = 1 FLOP) per image; "executed" includes the
bucket padding of the dynamic sampler. Timings exclude compilation (one warm-up batch).

    python benchmarks/dynamic_schedule.py [--quick] [--out benchmarks/results/dynamic_schedule.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from edit_jax import flops, models  # noqa: E402
from edit_jax.diffusion import dynamic, samplers  # noqa: E402
from edit_jax.diffusion import transport as T  # noqa: E402


def random_params(model, seed, scale=0.02):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype),
                                models.abstract_params(model))


def timed(fn, repeats):
  fn()  # warm-up (compilation for the jitted path)
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
                                       / "results" / "dynamic_schedule.json"))
  ap.add_argument("--counts", default="4,16,64")
  ap.add_argument("--input_size", type=int, default=32)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--depth", type=int, default=2)
  ap.add_argument("--heads", type=int, default=2)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--mode", choices=("sde", "ode"), default="sde")
  ap.add_argument("--ratios", default="0.8,0.6")
  ap.add_argument("--first_several", type=int, default=3)
  ap.add_argument("--distance", default="l1")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
  a = ap.parse_args(argv)
  if a.quick:
    a.input_size, a.hidden, a.batch, a.steps, a.repeats = 16, 32, 8, 20, 1
    a.counts = "1,4,16"
  counts = [int(c) for c in a.counts.split(",")]
  ratios = tuple(float(r) for r in a.ratios.split(","))
  cfg = (samplers.SDEConfig(num_steps=a.steps) if a.mode == "sde"
         else samplers.ODEConfig("euler", a.steps))
  tr = T.create_transport()
  ms = [models.build_model(None, input_size=a.input_size, patch_size=2, in_channels=4,
                           hidden_size=a.hidden, depth=a.depth, num_heads=a.heads, num_classes=10,
                           mediator_num=n) for n in counts]
  ps = [random_params(m, i) for i, m in enumerate(ms)]
  b = a.batch
  x0 = jax.random.normal(jax.random.key(0), (b, a.input_size, a.input_size, 4))
  y = jnp.arange(b, dtype=jnp.int32) % 10
  keys = jax.random.split(jax.random.key(1), b)
  rule = dynamic.SwitchRule(ratios, a.first_several, a.distance)
  prog = samplers.program(tr, cfg)
  rows = []

  for m, p in zip(ms, ps):
    fn = jax.jit(samplers.make_sample_fn(m, tr, cfg))
    sec = timed(lambda: jax.block_until_ready(fn(p, x0, y, keys).x), a.repeats)
    g = flops.gflops(m) * prog.nfe
    rows.append(dict(run=f"static n={m.mediator_num} (scan)", gflops_per_image=g,
                     gflops_executed_per_image=g, images_per_s=b / sec, seconds_per_batch=sec))
    one = dynamic.DynamicSampler([m], [p], tr, cfg, dynamic.SwitchRule((), a.first_several),
                                 batch_size=b, bucket_sizes=(b,))
    sec = timed(lambda: one.sample(x0, y, keys), a.repeats)
    rows.append(dict(run=f"static n={m.mediator_num} (step loop)", gflops_per_image=g,
                     gflops_executed_per_image=g, images_per_s=b / sec, seconds_per_batch=sec))

  t = time.perf_counter()
  dyn = dynamic.DynamicSampler(ms, ps, tr, cfg, rule, batch_size=b)
  compile_s = time.perf_counter() - t
  res = dyn.sample(x0, y, keys)
  sec = timed(lambda: dyn.sample(x0, y, keys), a.repeats)
  name = "->".join(str(c) for c in counts)
  rows.append(dict(run=f"dynamic {name} (per-sample)", gflops_per_image=float(res.gflops.mean()),
                   gflops_executed_per_image=res.gflops_executed, images_per_s=b / sec,
                   seconds_per_batch=sec))
  batch_res = dyn.sample(x0, y, keys, per_sample=False)
  sec_b = timed(lambda: dyn.sample(x0, y, keys, per_sample=False), a.repeats)
  rows.append(dict(run=f"dynamic {name} (batch-level, official)",
                   gflops_per_image=float(batch_res.gflops.mean()),
                   gflops_executed_per_image=batch_res.gflops_executed, images_per_s=b / sec_b,
                   seconds_per_batch=sec_b))

  dev = jax.devices()[0]
  info = dict(device=f"{dev.platform}:{dev.device_kind}", num_devices=jax.device_count(),
              host=platform.processor() or platform.machine(), jax=jax.__version__,
              model=dict(input_size=a.input_size, patch=2, hidden=a.hidden, depth=a.depth,
                         heads=a.heads, tokens=(a.input_size // 2) ** 2, counts=counts),
              gflops_per_forward={str(m.mediator_num): flops.gflops(m) for m in ms},
              sampler=dict(kind=cfg.kind, **{k: v for k, v in vars(cfg).items()}), batch=b,
              nfe_per_image=prog.nfe, rule=dict(ratios=list(ratios), first_several=a.first_several,
                                                distance=a.distance),
              bucket_sizes=list(dyn.bucket_sizes), dynamic_compile_seconds=compile_s,
              steps_per_stage_mean=res.summary()["steps_per_stage_mean"],
              first_switch_step_per_sample=[
                  [int(np.argmax(res.stages[:, i] >= j)) if (res.stages[:, i] >= j).any() else None
                   for i in range(b)] for j in range(1, len(ms))],
              command=" ".join(["python", "benchmarks/dynamic_schedule.py"]
                               + (argv or sys.argv[1:])),
              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              cpu_count=os.cpu_count(), load_average=list(os.getloadavg()), repeats=a.repeats)
  print(f"{'run':42s} {'GFLOPs/img':>11s} {'executed':>10s} {'img/s':>9s}")
  for r in rows:
    print(f"{r['run']:42s} {r['gflops_per_image']:11.4f} {r['gflops_executed_per_image']:10.4f} "
          f"{r['images_per_s']:9.2f}")
  print(f"mean steps per stage {info['steps_per_stage_mean']}; device {info['device']}")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(info=info, rows=rows), indent=2, default=str))
  print(f"wrote {out}")
  print(markdown(dict(info=info, rows=rows)))


def markdown(payload: dict) -> str:
  """The docs' Markdown block (docs/sampling.md) for one result JSON: setup, table, stage counts.

  tests/test_docs_numbers.py checks that the docs hold exactly this text for the committed JSON."""
  info, rows = payload["info"], payload["rows"]
  m, smp, rule = info["model"], info["sampler"], info["rule"]
  counts = " / ".join(str(c) for c in m["counts"])
  if smp["kind"] == "sde":
    sampler = (f"SDE {smp['method']}-Maruyama ({smp['diffusion_form']} diffusion, last step "
               f"{smp['last_step']})")
  else:
    sampler = f"ODE {smp['method']}"
  la = ", ".join(f"{v:.1f}" for v in info["load_average"])
  lines = [
      f"`{info['command']}` on {info['device']} ({info['host']}, {info['cpu_count']} cores, "
      f"shared with other jobs; load average {la} at the end), jax {info['jax']}, "
      f"{info['date']}. Model: random-weight SiT, {m['input_size']}x{m['input_size']}x4 input, "
      f"patch {m['patch']} ({m['tokens']} tokens), hidden {m['hidden']}, depth {m['depth']}, "
      f"{m['heads']} heads, n = {counts}. Sampler: {sampler}, {smp['num_steps']} grid points "
      f"(NFE {info['nfe_per_image']}), batch {info['batch']}, the same noise and labels for every "
      f"row. Rule: rho = {' / '.join(str(r) for r in rule['ratios'])}, F = "
      f"{rule['first_several']}, {rule['distance']}. Median of {info['repeats']} timed batches "
      f"after a warm-up (compilation excluded).", "",
      "| run | GFLOPs / image | executed (incl. padding) | images / s |", "|---|---|---|---|"]
  biggest = [r for r in rows if r["run"] == f"static n={m['counts'][-1]} (scan)"]
  for r in rows:
    g = f"{r['gflops_per_image']:.3f}"
    if biggest and r["run"].startswith("dynamic") and "per-sample" in r["run"]:
      g += f" ({r['gflops_per_image'] / biggest[0]['gflops_per_image'] - 1:+.1%} vs n={m['counts'][-1]})"
    lines.append(f"| {r['run']} | {g} | {r['gflops_executed_per_image']:.3f} | "
                 f"{r['images_per_s']:.1f} |")
  per = " / ".join(f"{info['gflops_per_forward'][str(c)]:.5f}" for c in m["counts"])
  stages = " / ".join(f"{v:.1f}" for v in info["steps_per_stage_mean"])
  switches = []
  for j, firsts in enumerate(info["first_switch_step_per_sample"], 1):
    got = [f for f in firsts if f is not None]
    switches.append(f"switch {j}: {len(got)} of {len(firsts)} samples"
                    + (f", at steps {min(got)}-{max(got)}" if got else ""))
  dyn = [r for r in rows if "per-sample" in r["run"]]
  pad = (f"; padding to the buckets {{{', '.join(map(str, info['bucket_sizes']))}}} costs "
         f"{dyn[0]['gflops_executed_per_image'] / dyn[0]['gflops_per_image'] - 1:.1%} extra "
         f"executed FLOPs" if dyn else "")
  lines += ["", f"Per forward: {per} GFLOPs for n = {counts}. Mean steps per stage {stages} of "
            f"{info['nfe_per_image']} ({'; '.join(switches)}){pad}. The dynamic sampler's "
            f"{len(m['counts']) * len(info['bucket_sizes'])} step functions "
            f"({len(m['counts'])} models x {len(info['bucket_sizes'])} bucket sizes) compiled in "
            f"{info['dynamic_compile_seconds']:.0f} s."]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
