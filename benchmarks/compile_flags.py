"""XLA:CPU compile time of a small SiT under compile-speed flag sets (the test suite's setting).

    python benchmarks/compile_flags.py --json benchmarks/results/compile_flags.json

The test suite is ~85 % XLA:CPU compilation of tiny programs (per-test compile log of a full run),
so tests/conftest.py sets flags that compile faster. This script measures them: for each flag set,
in a fresh process (nothing cached), the CPU seconds of `.compile()` of a 2-block SiT (D 64,
2 heads, 8 x 8 tokens, batch 4) forward and gradient, full attention and n = 4 mediators; the
gradient's run time (median of `--repeats` calls after a warm-up); and its largest difference
from the default flags' gradient, relative to the largest entry (float rounding only expected).
`--rounds` alternates the flag sets and keeps each figure's median.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

FLAG_SETS = {
    "default": "",
    "O0": "--xla_backend_optimization_level=0",
    "fusion emitters off": "--xla_cpu_use_fusion_emitters=false",
    "O0 + fusion emitters off (tests)": ("--xla_backend_optimization_level=0 "
                                         "--xla_cpu_use_fusion_emitters=false"),
}

CHILD = r"""
import json, sys, time
import numpy as np
import edit_jax  # noqa: F401  (allocator settings before the backend starts)
import jax, jax.numpy as jnp
from edit_jax import models
repeats, out_npz = int(sys.argv[1]), sys.argv[2]
res, grads = {}, {}
for n in (0, 4):
  m = models.build_model("SiT-S/2", input_size=16, depth=2, hidden_size=64, num_heads=2,
                         num_classes=10, mediator_num=n)
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                   models.abstract_params(m))
  x = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
  t, y = np.linspace(0.1, 0.9, 4).astype(np.float32), np.arange(4, dtype=np.int32)
  fwd = jax.jit(lambda p, x, t, y: m.apply({"params": p}, x, t, y))
  grad = jax.jit(jax.grad(lambda p, x, t, y: jnp.mean(m.apply({"params": p}, x, t, y) ** 2)))
  for name, fn in (("forward", fwd), ("gradient", grad)):
    lowered = fn.lower(p, x, t, y)
    t0 = time.process_time()
    compiled = lowered.compile()
    res[f"{name} compile n={n}"] = time.process_time() - t0
  jax.block_until_ready(compiled(p, x, t, y))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    g = jax.block_until_ready(compiled(p, x, t, y))
    times.append(time.perf_counter() - t0)
  res[f"gradient run n={n}"] = float(np.median(times))
  for i, leaf in enumerate(jax.tree.leaves(g)):
    grads[f"n{n}_{i}"] = np.asarray(leaf)
np.savez(out_npz, **grads)
print("RESULT", json.dumps(res))
"""


def run_child(flags: str, repeats: int, out_npz: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # nothing cached: every compile is measured
  out = subprocess.run([sys.executable, "-c", CHILD, str(repeats), out_npz], env=env,
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.split("RESULT ", 1)[1].splitlines()[0])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  import numpy as np  # noqa: PLC0415
  runs = {name: [] for name in FLAG_SETS}
  diffs = dict.fromkeys(FLAG_SETS, 0.0)
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):  # flag sets alternate within each round
      npz = {name: os.path.join(tmp, f"round{r}_{i}.npz") for i, name in enumerate(FLAG_SETS)}
      for name, flags in FLAG_SETS.items():
        runs[name].append(run_child(flags, args.repeats, npz[name]))
        print(f"round {r} {name}: {runs[name][-1]}", flush=True)
      ref = np.load(npz["default"])
      for name in FLAG_SETS:
        got = np.load(npz[name])
        diffs[name] = max(diffs[name], *(
            float(np.abs(got[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30))
            for k in ref.files))
  rows = []
  for name, rs in runs.items():
    med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
    rows.append({"flags": name, "XLA_FLAGS": FLAG_SETS[name] or "(none)",
                 **{k: round(v, 3) for k, v in med.items() if "compile" in k},
                 "compile total s": round(sum(v for k, v in med.items() if "compile" in k), 2),
                 **{f"{k} ms": round(1e3 * v, 3) for k, v in med.items() if "run" in k},
                 "grad max rel diff vs default": float(f"{diffs[name]:.2e}")})
  for row in rows:
    row["compile speed-up"] = round(rows[0]["compile total s"] / row["compile total s"], 2)
  common.print_table(rows, ["flags", "compile total s", "compile speed-up", "gradient run n=0 ms",
                            "gradient run n=4 ms", "grad max rel diff vs default"])
  if args.json:
    common.write_json(args.json, {"rounds": args.rounds, "repeats": args.repeats, "rows": rows,
                                  "command": "python benchmarks/compile_flags.py "
                                             + " ".join(sys.argv[1:] if argv is None else argv)})


if __name__ == "__main__":
  main()
