"""Training throughput: images/s, TFLOP/s per device and MFU of the jitted train step.

    python benchmarks/train_throughput.py                                   # quickstart config
    python benchmarks/train_throughput.py --summarize benchmarks/results/train_throughput_hostmem
    python benchmarks/train_throughput.py --config=configs/sit.py:B2-med64 --steps=20 \
        --batch=256 --data=synthetic --json=out/b2.json

Times ``--steps`` train steps after ``--warmup`` steps (compilation excluded), on the real input
pipeline of the config or on device-resident synthetic batches (``--data=synthetic``: measures the
step alone). FLOPs: ``edit_jax.metrics`` (2 x 3 x forward multiply-adds per image, from
edit_jax.flops). MFU is against a MEASURED peak: the best TFLOP/s of a large square matmul
(``--peak_n``, default 8192 on accelerators, 2048 on CPU) jitted on the same device in the
model's compute dtype (``measure_peak_tflops``), unless ``--peak_tflops`` is given. Prints a table
and writes JSON (with the load average and the scheduling policy).
``--cpu_malloc=off`` measures the step with glibc's default allocator behaviour (every step's
temporary buffer page-faulted in again; edit_jax/hostmem.py); the JSON records the minor page
faults per step. An idle-machine figure on a shared Linux machine: run it under `chrt -f 1` (root; real-time
priority, the other jobs keep the 5% of each core that the kernel reserves for them; keep it short).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(spec: str):
  path, _, preset = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path)
                                                    if not os.path.isabs(path) else path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(preset) if preset else mod.get_config()


def measure_peak_tflops(dtype: str = "float32", n: int = 0, repeats: int = 10) -> dict:
  """Best achieved TFLOP/s of an (n, n) @ (n, n) matmul on the default device (2 n^3 FLOPs)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  dev = jax.devices()[0]
  n = n or (2048 if dev.platform == "cpu" else 8192)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    best = min(best, time.perf_counter() - t0)
  return {"peak_tflops": 2 * n ** 3 / best / 1e12, "peak_matmul_n": n, "peak_dtype": str(dtype),
          "peak_best_s": best}


def run(args) -> dict:
  import jax  # noqa: PLC0415
  import flax.linen as nn  # noqa: PLC0415
  from edit_jax import data as data_lib, hostmem, metrics as metrics_lib, sharding, train  # noqa: PLC0415
  from edit_jax.diffusion import transport  # noqa: PLC0415
  config = load_config(args.config)
  with config.unlocked():
    if args.batch:
      config.global_batch_size = args.batch
    if args.dtype:
      config.model.dtype = args.dtype
    if args.remat:
      config.model.remat = True
    if args.data == "synthetic":
      config.data.name = "synthetic"
  model = train.get_model(config)
  mesh = sharding.make_mesh(config.mesh_shape, tuple(config.mesh_axes))
  sharding.check_batch_size(config.global_batch_size, mesh, config.grad_accum_steps)
  rules = sharding.rules_from_config(config)
  tx, schedule = train.make_optimizer(config)
  pipeline = data_lib.make_pipeline(config.data, seed=0, global_batch_size=config.global_batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  bsh = sharding.batch_sharding(mesh)
  from benchmarks.backward_cost import variant  # noqa: PLC0415
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), variant(args.variant):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0), rules,
                                                config.fsdp_min_size)
    loss_fn = transport.make_loss_fn(model, train.get_transport(config))
    step = train.make_train_step(loss_fn, tx, schedule, mesh, shardings,
                                 grad_accum_steps=config.grad_accum_steps)
    rng = jax.random.key(1)
    it = pipeline.iterate(0)
    fixed = data_lib.to_global(next(it), bsh) if args.data == "synthetic" else None
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      state, m = step(state, fixed or data_lib.to_global(next(it), bsh), rng)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
      state, m = step(state, fixed or data_lib.to_global(next(it), bsh), rng)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps
  flops_img = metrics_lib.train_flops_per_image(model)
  if args.peak_tflops:
    peak_info = {"peak_tflops": args.peak_tflops, "peak_method": "--peak_tflops"}
  else:
    peak_info = measure_peak_tflops(str(config.model.dtype), args.peak_n)
    peak_info["peak_method"] = "measured matmul"
  peak = peak_info["peak_tflops"]
  tp = metrics_lib.throughput(args.steps, dt, config.global_batch_size, flops_img,
                              jax.device_count(), peak)
  dev = jax.devices()[0]
  return {
      "config": args.config, "data": args.data, "global_batch": config.global_batch_size,
      "steps": args.steps, "seconds": dt, "warmup_seconds_incl_compile": compile_s,
      "step_ms": 1e3 * dt / args.steps, "step_cpu_ms": 1e3 * cpu / args.steps,
      "variant": args.variant, "minor_page_faults_per_step": faults,
      "cpu_malloc": hostmem.status(), **tp,
      "train_gflops_per_image": flops_img / 1e9, "peak_tflops_per_device": peak, **peak_info,
      "estimated_peak_tflops": metrics_lib.peak_tflops_per_device(),
      "load_average": os.getloadavg(), "scheduling": scheduling_policy(),
      "devices": jax.device_count(), "device_kind": getattr(dev, "device_kind", dev.platform),
      "platform": dev.platform, "host": platform.node(), "cpu_count": os.cpu_count(),
      "dtype": str(config.model.dtype), "jax": jax.__version__,
      "loss_last": float(m.compute()["loss"]),
  }


def scheduling_policy() -> str:
  """The process's Linux scheduling policy: SCHED_FIFO/SCHED_RR when the measurement was run
  under `chrt` (real-time priority: the machine's other jobs get the 5% of each core that the
  kernel reserves for them, so a shared machine measures as if idle); SCHED_OTHER otherwise."""
  try:
    pol = os.sched_getscheduler(0)
  except (AttributeError, OSError):
    return "unknown"
  names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                        "SCHED_IDLE") if hasattr(os, n)}
  return names.get(pol, str(pol))


def summarize(folder: str) -> list[dict]:
  """Markdown rows (median over the runs) of the JSONs in `folder`, grouped by model variant and
  allocator setting; ratios against the first group ("current" with the settings applied)."""
  import glob  # noqa: PLC0415
  groups: dict = {}
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    key = (r["variant"], bool(r["cpu_malloc"]["applied"]))
    groups.setdefault(key, []).append(r)
  if not groups:
    raise SystemExit(f"no JSON files in {folder}")
  order = sorted(groups, key=lambda k: (k[0] != "current", not k[1]))
  base = float(np.median([r["images_per_sec"] for r in groups[order[0]]]))
  rows = []
  for key in order:
    rs = groups[key]
    ips = float(np.median([r["images_per_sec"] for r in rs]))
    rows.append({"model": key[0], "allocator settings": "applied" if key[1] else "glibc defaults",
                 "runs": len(rs),
                 "images/s (median)": f"{ips:.1f}",
                 "images/s (all)": ", ".join(f"{r['images_per_sec']:.1f}" for r in rs),
                 "step ms (median)": f"{np.median([r['step_ms'] for r in rs]):.0f}",
                 "page faults/step": f"{np.median([r['minor_page_faults_per_step'] for r in rs]):.0f}",
                 "MFU (median)": f"{100 * np.median([r['mfu'] for r in rs]):.1f} %",
                 "first row / this": f"{base / ips:.2f}"})
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  ap.add_argument("--data", choices=("config", "synthetic"), default="config")
  ap.add_argument("--dtype", default="", help="override model.dtype (e.g. bfloat16)")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--variant", default="current", choices=("current", "legacy"),
                  help="legacy: the model as before issue 15 (see benchmarks/backward_cost.py)")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="use this peak instead of measuring one (TFLOP/s per device)")
  ap.add_argument("--peak_n", type=int, default=0, help="matmul size of the peak measurement")
  ap.add_argument("--cpu_malloc", choices=("auto", "on", "off"), default="",
                  help="EDIT_JAX_CPU_MALLOC for this run (edit_jax/hostmem.py); off = glibc "
                       "defaults, i.e. the step's buffers page-faulted in every step")
  ap.add_argument("--json", default="", help="write the result here too")
  ap.add_argument("--summarize", default="", metavar="DIR",
                  help="print the markdown table of the run JSONs in DIR (no measurement)")
  args = ap.parse_args(argv)
  if args.summarize:
    from benchmarks.report import md_table  # noqa: PLC0415
    rows = summarize(args.summarize)
    print(md_table(rows, list(rows[0])))
    return rows
  if args.cpu_malloc:
    if "edit_jax" in sys.modules:
      ap.error("--cpu_malloc must be applied before edit_jax is imported (run the script itself)")
    os.environ["EDIT_JAX_CPU_MALLOC"] = args.cpu_malloc
  r = run(args)
  r["command"] = " ".join(["python benchmarks/train_throughput.py"]
                          + list(sys.argv[1:] if argv is None else argv))
  rows = [("config", r["config"]), ("device", f"{r['devices']} x {r['device_kind']}"),
          ("global batch", r["global_batch"]), ("step time", f"{r['step_ms']:.1f} ms (process CPU {r['step_cpu_ms']:.1f} ms)"),
          ("images/s", f"{r['images_per_sec']:.1f}"),
          ("minor page faults/step", f"{r['minor_page_faults_per_step']:.0f} (allocator settings "
           f"applied: {r['cpu_malloc']['applied']})"),
          ("TFLOP/s/device", f"{r['tflops_per_device']:.4f}"),
          ("peak TFLOP/s/device", f"{r['peak_tflops_per_device']:.4f} ({r['peak_method']})"),
          ("MFU", f"{100 * r['mfu']:.1f}%" if np.isfinite(r["mfu"]) else "n/a")]
  w = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{w}} | {v}" for k, v in rows))
  print(json.dumps(r, indent=2, default=str))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(r, f, indent=2, default=str)
  return r


if __name__ == "__main__":
  main()
