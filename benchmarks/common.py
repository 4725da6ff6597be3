"""Shared helpers for benchmark scripts: timing, device description, table and JSON output."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import jax
import numpy as np


def device_description() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  cpu = platform.processor() or platform.machine()
  return f"{d.platform}:{kind} x{jax.device_count()} ({os.cpu_count()} host cores, {cpu}), jax {jax.__version__}"


def time_fn(fn, *args, warmup: int = 1, repeats: int = 5, min_time: float = 0.0,
            inner: int = 1, max_time: float = float("inf")) -> dict:
  """Median/min wall-clock seconds per call of `fn(*args)`. Compiles in warmup.

  Each of the `repeats` samples runs `inner` back-to-back calls and blocks on the last result only
  (so sub-millisecond device work is not hidden behind dispatch latency), divided by `inner`.
  Sampling continues until `min_time` has passed and stops early once `max_time` has (at least
  one sample). "first_s" is the first warm-up call (compilation included).
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start) < min_time:
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
    if time.perf_counter() - start > max_time:
      break
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "runs": len(times),
          "inner": inner, "first_s": first if warmup else float("nan")}


def print_table(rows: list[dict], cols: list[str]) -> str:
  widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
  lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
           "-|-".join("-" * w for w in widths)]
  lines += [" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
  text = "\n".join(lines)
  print(text)
  return text


def write_json(path, payload: dict):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"device": device_description(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
  path.write_text(json.dumps(payload, indent=2))
  print(f"wrote {path}")


def layout_rows(name: str, dims: tuple[str, str], fns: dict, args, ct,
                repeats: int) -> list[dict]:
  """Two implementations of one function, side by side: forward and forward+backward.

  dims: (column name, value), e.g. ("B,N,h,hd", "8,256,6,64"); fns: {label: f} with exactly two
  entries (the old form first); ct: the cotangent of f's output.
  Each program is jitted and warmed up, then all are timed interleaved ``repeats`` times (min
  wall time kept). Returns one row per part with both times, the speed-up old/new and the
  largest forward difference.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  (old, f_old), (new, f_new) = fns.items()
  prog = {}
  for label, f in fns.items():
    prog[(label, "fwd")] = jax.jit(f)
    prog[(label, "fwd+bwd")] = jax.jit(lambda *a, f=f: jax.vjp(f, *a)[1](ct))
  best = {key: float("inf") for key in prog}
  for p in prog.values():
    jax.block_until_ready(p(*args))
  for _ in range(repeats):
    for key, p in prog.items():
      t0 = time.perf_counter()
      jax.block_until_ready(p(*args))
      best[key] = min(best[key], time.perf_counter() - t0)
  diff = float(jnp.abs(prog[(old, "fwd")](*args) - prog[(new, "fwd")](*args)).max())
  return [{"shape": name, dims[0]: dims[1], "part": part,
           f"{old} ms": round(1e3 * best[(old, part)], 3),
           f"{new} ms": round(1e3 * best[(new, part)], 3),
           "speed-up": round(best[(old, part)] / best[(new, part)], 2), "max |diff|": diff}
          for part in ("fwd", "fwd+bwd")]


def layout_main(argv, doc: str, script: str, default_json: str, run) -> list[dict]:
  """CLI of a `layout_rows` benchmark: --repeats, --json; prints the table, writes the JSON."""
  import argparse  # noqa: PLC0415
  import os  # noqa: PLC0415
  import sys  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--json", default=default_json)
  args = ap.parse_args(argv)
  print(device_description())
  rows = run(args.repeats)
  print_table(rows, list(rows[0]))
  if args.json:
    write_json(args.json, {"command": f"python {script} " + " ".join(argv or sys.argv[1:]),
                           "load_average": os.getloadavg(), "rows": rows})
  return rows
