"""float32 matmul throughput of SiT-S/2's training shapes: XLA:CPU vs PyTorch on the same cores.

    python benchmarks/matmul_shapes.py --torch_python=/work/venvs/torch_i15/bin/python \
        --json benchmarks/results/matmul_shapes.json

What limits our CPU training step against the PyTorch reference once the step does the same work
(issue 15): the GFLOP/s each library reaches on the products the step is made of, at batch 8 and
256 tokens (M = 2048 token rows): qkv (2048 x 384 x 1152), fc1 (2048 x 384 x 1536), fc2
(2048 x 1536 x 384), a weight gradient (384 x 2048 x 1536: contraction over the token rows) and
the per-head attention product (48 x 256 x 64 x 256, batched). Each side runs in its own
process, on one core (``taskset -c 0``) and on all cores; the minimum over ``--repeats`` calls
after a warm-up. Without a torch Python only the XLA side is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# name -> (batch or 0, m, k, n)
SHAPES = {"qkv": (0, 2048, 384, 1152), "fc1": (0, 2048, 384, 1536), "fc2": (0, 2048, 1536, 384),
          "weight grad": (0, 384, 2048, 1536), "attention q k^T": (48, 256, 64, 256)}

JAX_WORKER = r'''
import json, sys, time
import edit_jax  # allocator settings, as in training
import jax, jax.numpy as jnp, numpy as np
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for name, (b, m, k, n) in shapes.items():
  rng = np.random.default_rng(0)
  lead = (b,) if b else ()
  a = jnp.asarray(rng.standard_normal(lead + (m, k), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal(lead + (k, n), dtype=np.float32))
  f = jax.jit(jnp.matmul)
  f(a, w).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter(); f(a, w).block_until_ready(); best = min(best, time.perf_counter() - t0)
  out[name] = 2 * max(b, 1) * m * k * n / best / 1e9
print(json.dumps(out))
'''

TORCH_WORKER = r'''
import json, os, sys, time
import torch
torch.set_num_threads(len(os.sched_getaffinity(0)))
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for name, (b, m, k, n) in shapes.items():
  torch.manual_seed(0)
  lead = (b,) if b else ()
  a, w = torch.randn(lead + (m, k)), torch.randn(lead + (k, n))
  torch.matmul(a, w)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter(); torch.matmul(a, w); best = min(best, time.perf_counter() - t0)
  out[name] = 2 * max(b, 1) * m * k * n / best / 1e9
print(json.dumps(out))
'''


def measure(python: str, worker: str, cores: str | None, repeats: int) -> dict:
  cmd = [python, "-c", worker, json.dumps(SHAPES), str(repeats)]
  if cores:
    cmd = ["taskset", "-c", cores] + cmd
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON",
                                                           "/work/venvs/torch_i15/bin/python"))
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--json", default="benchmarks/results/matmul_shapes.json")
  args = ap.parse_args(argv)
  from benchmarks import common  # noqa: PLC0415
  from benchmarks.torch_reference import torch_available  # noqa: PLC0415
  print(common.device_description())
  have_torch = torch_available(args.torch_python) is None
  ncores = len(os.sched_getaffinity(0))
  rows = []
  for cores, label in (("0", "1"), (None, str(ncores))):
    xla = measure(sys.executable, JAX_WORKER, cores, args.repeats)
    tch = measure(args.torch_python, TORCH_WORKER, cores, args.repeats) if have_torch else {}
    for name, (b, m, k, n) in SHAPES.items():
      row = {"product": name, "shape": (f"{b} x " if b else "") + f"{m} x {k} x {n}",
             "cores": label, "XLA:CPU GFLOP/s": round(xla[name], 1)}
      if tch:
        row.update({"PyTorch GFLOP/s": round(tch[name], 1),
                    "XLA / PyTorch": round(xla[name] / tch[name], 2)})
      rows.append(row)
  common.print_table(rows, list(rows[0]))
  if args.json:
    torch_version = None
    if have_torch:
      torch_version = subprocess.run([args.torch_python, "-c", "import torch; print(torch.__version__)"],
                                     capture_output=True, text=True).stdout.strip()
    common.write_json(args.json, {
        "command": "python benchmarks/matmul_shapes.py " + " ".join(argv or sys.argv[1:]),
        "load_average": os.getloadavg(), "torch": torch_version, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
