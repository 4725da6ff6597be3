"""Measure the quickstart: training time (wall and CPU) of configs/quickstart.py, and the share of
500 samples that the offline digit classifier assigns to their label.

    python benchmarks/quickstart_run.py [--json benchmarks/results/quickstart_cpu.json] \
        [--workdir /tmp/qs_measure] [--samples 500] [--set optim.learning_rate=...]

Runs exactly what `bash launch/quickstart.sh` trains (`edit_jax.train.train_and_evaluate` with
configs/quickstart.py, in a fresh workdir, compilation and checkpointing included) but with the
in-training sample grid switched off so that the timed part is training only. Then, from the final
EMA weights and with the config's own sampler (method, steps, CFG scale), it draws `--samples`
digits (equal counts of 0..9, fixed noise) and scores them with `edit_jax.eval.digits`.
Records the machine, the load average before and after (the CPU may be shared), wall and process
CPU seconds, the step reached, the final loss and the accuracy (overall and per class).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="/tmp/edit_jax_quickstart_measure",
                  help="fresh workdir (deleted first)")
  ap.add_argument("--samples", type=int, default=500)
  ap.add_argument("--set", action="append", default=[], dest="sets",
                  help="config override field=value (for recipe studies; none for the record)")
  ap.add_argument("--json", default="", help="write the record here")
  args = ap.parse_args(argv)

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from benchmarks.quickstart_study import apply_sets  # noqa: PLC0415
  from benchmarks.train_throughput import load_config  # noqa: PLC0415
  from edit_jax import sharding, train  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415

  config = apply_sets(load_config("configs/quickstart.py"), args.sets)
  sample_cfg = config.sample.to_dict()
  with config.unlocked():
    config.sample.every = 0          # time training only; the samples are drawn below
  wd = pathlib.Path(args.workdir)
  if wd.exists():
    shutil.rmtree(wd)
  digits.load_or_train_classifier()  # cached before timing (first use trains it)
  load_before = os.getloadavg()
  t0, c0 = time.perf_counter(), time.process_time()
  result = train.train_and_evaluate(config, str(wd))
  train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
  load_after = os.getloadavg()

  with config.unlocked():
    config.sample.update(sample_cfg)
  model = train.get_model(config)
  mesh = sharding.make_mesh(config.mesh_shape, tuple(config.mesh_axes))
  _, shardings = train.state_shardings(model, train.make_optimizer(config)[0], mesh,
                                       sharding.rules_from_config(config), config.fsdp_min_size)
  sampler = train.make_sampler(config, model, train.get_transport(config), mesh,
                               shardings.ema_params)
  labels = np.resize(np.repeat(np.arange(10), max(args.samples // 10, 1)),
                     args.samples).astype(np.int32)
  key = jax.random.key(config.sample.seed)
  x0 = np.asarray(jax.random.normal(key, (args.samples, config.data.image_size,
                                          config.data.image_size, config.data.channels)))
  s0 = time.perf_counter()
  with jax.set_mesh(mesh):
    x = np.clip(np.asarray(jax.device_get(sampler(result["state"].ema_params, x0, labels, key))),
                -1, 1)
  sample_wall = time.perf_counter() - s0
  acc = digits.conditional_accuracy(x, labels)
  per = digits.per_class_accuracy(x, labels)
  record = {
      "command": " ".join(["python benchmarks/quickstart_run.py"] + list(argv or sys.argv[1:])),
      "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
      "config": "configs/quickstart.py", "overrides": args.sets,
      "step": result["step"], "num_train_steps": int(config.num_train_steps),
      "final_loss": result["loss"],
      "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
      "train_minutes": round(train_wall / 60, 2),
      "loadavg_before": [round(v, 2) for v in load_before],
      "loadavg_after": [round(v, 2) for v in load_after],
      "sampler": {k: sample_cfg[k] for k in ("method", "num_steps", "cfg_scale", "guide_channels")},
      "num_samples": int(args.samples), "accuracy": acc,
      "per_class_accuracy": {str(k): round(v, 3) for k, v in per.items()},
      "sample_wall_s": round(sample_wall, 1),
  }
  print(json.dumps(record, indent=2))
  if args.json:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
  return record


if __name__ == "__main__":
  main()
