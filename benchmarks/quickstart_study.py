"""Quickstart recipe study: digit accuracy of the EMA model vs training steps and CPU time.

    python benchmarks/quickstart_study.py --name base --steps 1500 --eval 600,900,1200,1500 \
        [--set optim.learning_rate=2e-3 --set model.depth=3 ...] [--samples 500] \
        [--json benchmarks/results/quickstart_study.json]

Trains ``configs/quickstart.py`` (plus ``--set`` overrides, ml_collections dotted paths) with the
library's own train step (``edit_jax.train``), and at every ``--eval`` step samples ``--samples``
digits (50 per class for 500) with the config's sampler from the EMA weights and scores them with
the offline digit classifier (``edit_jax.eval.digits.conditional_accuracy``). Records, per eval
point: step, accuracy, training wall seconds and training process CPU seconds (sampling excluded),
the machine's load average. Appends one record per run to ``--json``.
The schedule's length is ``num_train_steps`` (``--steps``), so intermediate points of a cosine
schedule are not the same as shorter runs; use them only to see where quality saturates.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def parse_value(v: str):
  try:
    return json.loads(v)
  except json.JSONDecodeError:
    return v


def apply_sets(config, sets):
  with config.unlocked():
    for s in sets:
      key, _, val = s.partition("=")
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      old = node[leaf]
      v = parse_value(val)
      if isinstance(old, tuple) and isinstance(v, list):
        v = tuple(v)
      if isinstance(old, float) and isinstance(v, int):
        v = float(v)
      node[leaf] = v
  return config


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--name", required=True)
  ap.add_argument("--steps", type=int, required=True)
  ap.add_argument("--eval", default="", help="comma-separated steps (default: the last)")
  ap.add_argument("--set", action="append", default=[], dest="sets")
  ap.add_argument("--samples", type=int, default=500)
  ap.add_argument("--final_cfg", default="", help="extra CFG scales to score at the last step")
  ap.add_argument("--final_sample_steps", default="",
                  help="extra sampler grid sizes to score at the last step")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)

  import jax  # noqa: PLC0415
  import flax.linen as nn  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from benchmarks.train_throughput import load_config  # noqa: PLC0415
  from edit_jax import data as data_lib, sharding, train  # noqa: PLC0415
  from edit_jax.diffusion import transport as transport_lib  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415

  config = apply_sets(load_config("configs/quickstart.py"), args.sets)
  with config.unlocked():
    config.num_train_steps = args.steps
  evals = sorted({int(s) for s in args.eval.split(",") if s} | {args.steps})
  model = train.get_model(config)
  mesh = sharding.make_mesh(config.mesh_shape, tuple(config.mesh_axes))
  rules = sharding.rules_from_config(config)
  tx, schedule = train.make_optimizer(config)
  pipeline = data_lib.make_pipeline(config.data, seed=config.seed,
                                    global_batch_size=config.global_batch_size)
  bsh = sharding.batch_sharding(mesh)
  classes = np.arange(10)
  labels = np.resize(np.repeat(classes, max(args.samples // 10, 1)), args.samples).astype(np.int32)
  points = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings = train.create_train_state(model, tx, mesh, init_rng, rules,
                                                config.fsdp_min_size)
    loss_fn = transport_lib.make_loss_fn(model, train.get_transport(config))
    step_fn = train.make_train_step(loss_fn, tx, schedule, mesh, shardings,
                                    grad_accum_steps=config.grad_accum_steps,
                                    ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
    sampler = train.make_sampler(config, model, train.get_transport(config), mesh,
                                 shardings.ema_params)
    key = jax.random.key(config.sample.seed)
    x0 = np.asarray(jax.random.normal(key, (args.samples,) + tuple(pipeline.shape)))
    it = pipeline.iterate(0)
    wall = cpu = 0.0
    acc_m = None
    step = 0
    for target in evals:
      t0, c0 = time.perf_counter(), time.process_time()
      while step < target:
        state, m = step_fn(state, data_lib.to_global(next(it), bsh), train_rng)
        acc_m = m if acc_m is None else acc_m.merge(m)
        step += 1
      jax.block_until_ready(state)
      wall += time.perf_counter() - t0
      cpu += time.process_time() - c0
      loss = float(acc_m.compute()["loss"])
      acc_m = None
      s0 = time.perf_counter()
      x = np.asarray(jax.device_get(sampler(state.ema_params, x0, labels, key)))
      acc = digits.conditional_accuracy(np.clip(x, -1, 1), labels)
      pt = {"step": step, "accuracy": acc, "train_wall_s": round(wall, 1),
            "train_cpu_s": round(cpu, 1), "loss_since_last": round(loss, 4),
            "sample_wall_s": round(time.perf_counter() - s0, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}
      points.append(pt)
      print(args.name, json.dumps(pt), flush=True)
    # Extra sampler settings on the final EMA weights (same noise, same labels).
    extra = [("cfg_scale", float(v)) for v in args.final_cfg.split(",") if v] + [
        ("num_steps", int(v)) for v in args.final_sample_steps.split(",") if v]
    for field, value in extra:
      c2 = apply_sets(load_config("configs/quickstart.py"), args.sets)
      with c2.unlocked():
        c2.sample[field] = value
      s2 = train.make_sampler(c2, model, train.get_transport(c2), mesh, shardings.ema_params)
      s0 = time.perf_counter()
      x = np.asarray(jax.device_get(s2(state.ema_params, x0, labels, key)))
      acc = digits.conditional_accuracy(np.clip(x, -1, 1), labels)
      pt = {"step": step, "accuracy": acc, field: value, "method": c2.sample.method,
            "sample_wall_s": round(time.perf_counter() - s0, 1)}
      points.append(pt)
      print(args.name, json.dumps(pt), flush=True)
  rec = {"name": args.name, "sets": args.sets, "steps": args.steps, "samples": args.samples,
         "points": points, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
         "cpu_count": os.cpu_count()}
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + [rec], indent=1) + "\n")
  return rec


if __name__ == "__main__":
  main()
