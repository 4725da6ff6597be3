"""Cost of the backward pass: gradient vs forward time, compiled FLOPs, per-module profile (issue 15).

    python benchmarks/backward_cost.py                           # S/2 and B/2, full and mediators
    python benchmarks/backward_cost.py --cases=S2 --variants=current,legacy --profile
    python benchmarks/backward_cost.py --cases=quickstart --profile --json=/tmp/q.json

For each case (model, mediators, batch) it compiles the forward (``model.apply``, t = 0.5) and the
gradient of the training loss (``jax.grad`` of ``transport.make_loss_fn``: noise, interpolation,
forward, backward) and reports:

* time: wall and process-CPU seconds per call, min and median over ``--repeats`` calls, the
  variants and the forward/gradient calls interleaved (the machine may be shared);
* ``grad/fwd``: the ratio of the best wall times and of the best CPU times (~3 is the norm:
  the backward does two matmuls per forward matmul);
* FLOPs: XLA cost analysis of the compiled CPU programs (gradient / forward), and of the
  unoptimized HLO lowered for CUDA and TPU (no device needed), with remat off and on;
* ``--profile``: a ``jax.profiler`` trace of the compiled gradient. Every XLA op (thunk) is
  attributed through its HLO metadata to a module (patch embed, adaLN, qkv, attention core,
  depthwise conv, proj, fc1, GELU, fc2, norm/modulate/gate, final layer, loss) and to the forward
  part (``jvp``) or the backward part (``transpose``) of the gradient program; the table gives
  per-op-minimum milliseconds over ``--profile_repeats`` traced calls, and bwd/fwd per module.

Variants: ``current`` is the model as it is; ``legacy`` rebuilds the model as before issue 15
(no cotangent materialization at block inputs, Dense on (B, N, D) tokens) by patching
``edit_jax.models`` in-process, to measure the fix on the same machine.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from edit_jax import models  # noqa: E402
from edit_jax.diffusion import transport  # noqa: E402
from edit_jax.models import attention, sit  # noqa: E402

# name -> (model name or None, build overrides, batch)
CASES = {
    "S2": ("SiT-S/2", dict(input_size=32), 8),
    "S2-med16": ("SiT-S/2", dict(input_size=32, mediator_num=16), 8),
    "B2": ("SiT-B/2", dict(input_size=32), 8),
    "B2-med64": ("SiT-B/2", dict(input_size=32, mediator_num=64), 8),
    "quickstart": ("", dict(input_size=32, in_channels=1, num_classes=10, patch_size=4,
                            hidden_size=128, depth=4, num_heads=4, mediator_num=16,
                            learn_sigma=False), 32),
}
DEFAULT_CASES = ("S2", "S2-med16", "B2", "B2-med64")


# --------------------------------------------------------------------------- variants
def _legacy_dense(features, name, axes, dtype, kernel_init=None, bias_init=None, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(
                      kernel_init or attention.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(
                      bias_init or nn.initializers.zeros_init(), axes[-1:]))


_CURRENT = {"materialize": sit.materialize_cotangent, "dense": attention.dense}


@contextlib.contextmanager
def variant(name: str):
  """Patches edit_jax.models while tracing: "current" (as is) or "legacy" (before issue 15)."""
  if name not in ("current", "legacy"):
    raise ValueError(f"unknown variant {name!r}: expected current or legacy")
  if name == "legacy":
    sit.materialize_cotangent = lambda x: x
    attention.dense = _legacy_dense
  try:
    yield
  finally:
    sit.materialize_cotangent = _CURRENT["materialize"]
    attention.dense = _CURRENT["dense"]


def build(case: str, **extra):
  name, overrides, batch = CASES[case]
  return models.build_model(name or None, **overrides, **extra), batch


# --------------------------------------------------------------------------- programs
def programs(case: str, var: str, remat: bool = False):
  """(forward, gradient) jitted functions, their args, and the model."""
  model, batch = build(case, remat=remat)
  params = models.init_params(model, jax.random.key(0))
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (batch, model.input_size, model.input_size, model.in_channels))
  y = jax.random.randint(k2, (batch,), 0, model.num_classes)
  loss = transport.make_loss_fn(model, transport.create_transport("Linear", "velocity"))
  with variant(var):
    fwd = jax.jit(lambda p, x, y: model.apply({"params": p}, x, jnp.full(x.shape[:1], 0.5), y))
    grad = jax.jit(jax.grad(lambda p, x, y, r: loss(p, x, y, r)[0]))
    fwd_t = fwd.trace(params, x, y)
    grad_t = grad.trace(params, x, y, jax.random.key(2))
  return model, (fwd_t, (params, x, y)), (grad_t, (params, x, y, jax.random.key(2)))


def flops_ratios(case: str, var: str) -> dict:
  out = {}
  for remat in (False, True):
    _, (ft, _), (gt, _) = programs(case, var, remat)
    tag = "remat" if remat else "no_remat"
    out[f"cpu_compiled_{tag}"] = (gt.lower().compile().cost_analysis()["flops"]
                                  / ft.lower().compile().cost_analysis()["flops"])
    for plat in ("cuda", "tpu"):
      g = gt.lower(lowering_platforms=(plat,)).cost_analysis()["flops"]
      f = ft.lower(lowering_platforms=(plat,)).cost_analysis()["flops"]
      out[f"{plat}_lowered_{tag}"] = g / f
  return out


def time_interleaved(compiled: dict, repeats: int) -> dict:
  """compiled: key -> (fn, args). Returns key -> {wall_min, wall_median, cpu_min, cpu_median}."""
  for fn, args in compiled.values():
    jax.block_until_ready(fn(*args))
  samples = {k: [] for k in compiled}
  for _ in range(repeats):
    for k, (fn, args) in compiled.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      samples[k].append((time.perf_counter() - t0, time.process_time() - c0))
  out = {}
  for k, s in samples.items():
    a = np.asarray(s)
    out[k] = {"wall_min": float(a[:, 0].min()), "wall_median": float(np.median(a[:, 0])),
              "cpu_min": float(a[:, 1].min()), "cpu_median": float(np.median(a[:, 1]))}
  return out


# --------------------------------------------------------------------------- profile
MODULE_RULES = (  # (regex on the op's module path, module label); first match wins
    (r"x_embedder", "patch embed"), (r"[ty]_embedder", "t/y embed"),
    (r"final_layer", "final layer"), (r"adaLN_modulation", "adaLN"),
    (r"attn/qkv", "attn qkv"), (r"attn/proj", "attn proj"), (r"attn/dwc", "attn dwc"),
    (r"attn", "attn core"), (r"mlp/fc1", "mlp fc1"), (r"mlp/fc2", "mlp fc2"),
    (r"mlp", "mlp gelu"), (r"blocks_\d+/cond", "materialize"),
    (r"blocks_\d+", "norm/modulate/gate"), (r"SiT", "embed/unpatchify"), (r"", "loss/other"))


def _op_table(hlo_text: str) -> dict:
  ops = {}
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ [\w\-]+\(", line)
    if m:
      on = re.search(r'op_name="([^"]+)"', line)
      ops[m.group(1)] = on.group(1).split(";")[0] if on else ""
  return ops


def classify(op_name: str) -> tuple[str, str]:
  part = "bwd" if "transpose(" in op_name else "fwd"
  for pat, label in MODULE_RULES:
    if re.search(pat, op_name):
      return label, part
  return "loss/other", part


def profile(fn, args, repeats: int) -> dict:
  """Per-module {fwd_ms, bwd_ms} of one compiled gradient call (per-op min over repeats)."""
  from jax._src.lib import _profile_data  # noqa: PLC0415
  ops = _op_table(fn.as_text())
  jax.block_until_ready(fn(*args))
  per_op = collections.defaultdict(list)
  with tempfile.TemporaryDirectory() as d:
    for _ in range(repeats):
      sub = os.path.join(d, str(len(os.listdir(d))))
      with jax.profiler.trace(sub):
        jax.block_until_ready(fn(*args))
      pb = glob.glob(f"{sub}/**/*.xplane.pb", recursive=True)[0]
      seen = collections.Counter()
      for plane in _profile_data.ProfileData.from_file(pb).planes:
        for line in plane.lines:
          for ev in line.events:
            if ev.name in ops:
              seen[ev.name] += ev.duration_ns
      for k, v in seen.items():
        per_op[k].append(v)
  table = collections.defaultdict(lambda: {"fwd_ms": 0.0, "bwd_ms": 0.0})
  for k, v in per_op.items():
    label, part = classify(ops[k])
    table[label][f"{part}_ms"] += min(v) / 1e6
  return dict(table)


# --------------------------------------------------------------------------- main
def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"from {sorted(CASES)}")
  ap.add_argument("--variants", default="current,legacy")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--profile", action="store_true", help="per-module table of the gradient")
  ap.add_argument("--profile_repeats", type=int, default=3)
  ap.add_argument("--no_flops", action="store_true")
  ap.add_argument("--json", default="benchmarks/results/backward_cost.json")
  args = ap.parse_args(argv)
  cases = [c for c in args.cases.split(",") if c]
  variants = [v for v in args.variants.split(",") if v]
  for c in cases:
    if c not in CASES:
      ap.error(f"unknown case {c!r}: expected one of {sorted(CASES)}")
  print(common.device_description())
  rows, profiles = [], {}
  for case in cases:
    compiled, models_ = {}, {}
    for var in variants:
      model, (ft, fa), (gt, ga) = programs(case, var)
      compiled[(var, "fwd")] = (ft.lower().compile(), fa)
      compiled[(var, "grad")] = (gt.lower().compile(), ga)
      models_[var] = model
    times = time_interleaved(compiled, args.repeats)
    for var in variants:
      f, g = times[(var, "fwd")], times[(var, "grad")]
      row = {"case": case, "variant": var, "batch": CASES[case][2],
             "fwd_wall_min_s": f["wall_min"], "fwd_wall_median_s": f["wall_median"],
             "fwd_cpu_min_s": f["cpu_min"],
             "grad_wall_min_s": g["wall_min"], "grad_wall_median_s": g["wall_median"],
             "grad_cpu_min_s": g["cpu_min"],
             "ratio_wall": g["wall_min"] / f["wall_min"], "ratio_cpu": g["cpu_min"] / f["cpu_min"]}
      if not args.no_flops:
        row["flops_ratio"] = flops_ratios(case, var)
      rows.append(row)
      if args.profile:
        profiles[f"{case}/{var}"] = profile(*compiled[(var, "grad")], args.profile_repeats)
  cols = ["case", "variant", "batch", "fwd s", "grad s", "grad/fwd wall", "grad/fwd cpu",
          "FLOPs cpu", "FLOPs cuda/tpu", "FLOPs remat cpu/tpu"]
  table = []
  for r in rows:
    fr = r.get("flops_ratio", {})
    table.append({
        "case": r["case"], "variant": r["variant"], "batch": r["batch"],
        "fwd s": f"{r['fwd_wall_min_s']:.3f} / {r['fwd_wall_median_s']:.3f}",
        "grad s": f"{r['grad_wall_min_s']:.3f} / {r['grad_wall_median_s']:.3f}",
        "grad/fwd wall": f"{r['ratio_wall']:.2f}", "grad/fwd cpu": f"{r['ratio_cpu']:.2f}",
        "FLOPs cpu": f"{fr['cpu_compiled_no_remat']:.2f}" if fr else "",
        "FLOPs cuda/tpu": (f"{fr['cuda_lowered_no_remat']:.2f} / {fr['tpu_lowered_no_remat']:.2f}"
                           if fr else ""),
        "FLOPs remat cpu/tpu": (f"{fr['cpu_compiled_remat']:.2f} / {fr['tpu_lowered_remat']:.2f}"
                                if fr else "")})
  print("\ntimes: min / median seconds per call; ratios of the minima")
  common.print_table(table, cols)
  for key, prof in profiles.items():
    print(f"\nper-module profile of the gradient, {key} (ms, per-op min over "
          f"{args.profile_repeats} traced calls)")
    prows = []
    tot_f = sum(v["fwd_ms"] for v in prof.values())
    tot_b = sum(v["bwd_ms"] for v in prof.values())
    for label in dict.fromkeys(label for _, label in MODULE_RULES):
      if label in prof and prof[label]["fwd_ms"] + prof[label]["bwd_ms"] > 0:
        v = prof[label]
        prows.append({"module": label, "fwd ms": f"{v['fwd_ms']:.1f}", "bwd ms": f"{v['bwd_ms']:.1f}",
                      "bwd/fwd": f"{v['bwd_ms'] / v['fwd_ms']:.2f}" if v["fwd_ms"] > 0.05 else "-"})
    prows.append({"module": "total", "fwd ms": f"{tot_f:.1f}", "bwd ms": f"{tot_b:.1f}",
                  "bwd/fwd": f"{tot_b / tot_f:.2f}"})
    common.print_table(prows, ["module", "fwd ms", "bwd ms", "bwd/fwd"])
  if args.json:
    common.write_json(args.json, {
        "command": "python benchmarks/backward_cost.py " + " ".join(argv or sys.argv[1:]),
        "load_average": os.getloadavg(), "rows": rows, "profiles": profiles})
  return rows, profiles


if __name__ == "__main__":
  main()
