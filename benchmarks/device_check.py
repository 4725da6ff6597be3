"""One prepared GPU check: every GPU number of the project in one short, budgeted run.

    bash benchmarks/device_check.sh                       # on the GPU machine, writes to $OUT
    python benchmarks/device_check.py [--out DIR] [--budget-s 420] [--sections a,b] [--match RE]
    python benchmarks/device_check.py --dry-run --out /tmp/dc   # CPU, tiny, kernel interpreted

Sections, in order (each item is recorded on its own; one failure never loses the rest):
  env          jax / jaxlib / CUDA / cuDNN versions, device kind, compute capability, memory,
               package versions, which optional modules are missing.
  peak         measured dense matmul peak, bf16 and fp32 (the default precision: TF32 tensor cores
               on recent NVIDIA GPUs), and measured memory bandwidth (`edit_jax.metrics`).
  correctness  the Pallas kernel COMPILED for the device (never interpreted, except in --dry-run):
               forward and all six gradients vs the exact answer, n in {16, 64}, N in {1024, 4096,
               16384}, head dims 64 / 72, bf16 (then f32 at N <= 4096 while time allows);
               criterion in `benchmarks.mediator_kernel.correctness`.
  kernel       kernel vs XLA reference vs full attention (cuDNN flash on GPU), fwd and fwd+bwd:
               ms, TFLOP/s, GB/s, roofline and fraction of the bandwidth floor (`bench_row`).
  autotune     a time-boxed sweep over `block_size_candidates("gpu")` (fwd+bwd, B 4, h 16,
               N 4096, hd 64, n 64); the best configuration is reported, not applied.
  model        SiT forward, full attention (cuDNN in bf16) vs n = 64 mediators (XLA and Pallas):
               SiT-B/2 at 256 / 512 / 1024 px and SiT-XL/2 at 256 / 512, bf16 then fp32; time ratio
               beside the FLOPs ratio (`edit_jax.flops`).
  train        the trainer's own jitted step (`edit_jax.train.make_train_step`: AdamW + EMA, fp32
               master weights, bf16 compute) of SiT-B/2 and SiT-XL/2 @ 256, full and n = 64:
               images/s, TFLOP/s and MFU against the measured bf16 matmul peak.
  sample       Euler ODE, 50 grid points, CFG scale 4 (batch doubled), SiT-XL/2 and SiT-B/2 @ 256,
               full and n = 64: images/s.
  edt          EDT-S/2 vs SiT-S/2 forward at 256 px (bf16 and fp32): EDT without AMM, with AMM in
               the official blocks 7 and 10 as the official post-softmax product and as the
               log_bias form (`edit_jax.models.amm`; cuDNN-eligible in bf16), beside the FLOPs.

Budget. `--budget-s` (default 420 s, from process start, compiles included) is shared by the
sections in proportion to their weights; time a section leaves unused goes to the later ones.
Before each item its cost is estimated (a guess per item, scaled by how far the earlier items of
its section were off) and the item is skipped, with the reason recorded, when it would not fit.
Results are written after every item (JSON written atomically, plus a markdown table), so a kill
at any point leaves a valid JSON with everything finished so far; SIGTERM / SIGINT mark it
"terminated" and exit at once. Exit status: 0 when every item that ran passed, 1 when any errored
or failed its check or when jax sees no accelerator (then only env runs; --dry-run is the CPU
check), 2 for bad arguments, 143 / 130 after SIGTERM / SIGINT. The machine needs
jax, flax, optax and numpy only (no ml_collections, grain, clu or tensorboardX: nothing here
imports them).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import pathlib
import platform
import re
import signal
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()
MEDIATORS = 64
OPTIONAL_MODULES = ("ml_collections", "grain", "clu", "tensorboardX")


def sig(x: float, digits: int = 4) -> float:
  """x rounded to `digits` significant figures (tiny dry-run figures keep their precision)."""
  return float(f"{x:.{digits}g}")


def log(msg: str):
  print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# What to run: the real plan (one H100/H200) and the dry-run plan (CPU, tiny, seconds).


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of every section. Guesses (`*_est`) are seconds per item, compiles included."""
  dry: bool
  matmul_size: int
  matmul_chain: int
  bw_bytes: int
  check_cases: tuple          # (B, N, h, hd, n, dtype), priority order
  check_est: float
  kernel_B: int
  kernel_h: int
  kernel_cases: tuple         # (N, hd, n), priority order; each: pallas / xla / full x modes
  kernel_modes: tuple
  kernel_est: float
  tune_shape: tuple           # (B, N, h, hd, n)
  tune_mode: str
  tune_est: float
  model_cases: tuple          # (model name, resolution, batch), priority order
  model_dtypes: tuple
  model_est: dict             # model name -> seconds
  train_cases: tuple          # (model name, resolution, batch, mediators)
  train_est: dict
  sample_cases: tuple         # (model name, resolution, batch, mediators)
  sample_est: dict
  sample_steps: int
  edt_cases: tuple            # (model name, resolution, batch), priority order
  edt_est: float
  edt_kw: dict                # overrides of every EDT (dry run: a tiny one)
  edt_amm: str                # AMM blocks of the AMM variants
  compute_dtype: str          # of the train and sample sections
  model_kw: dict              # overrides of every SiT (dry run: a tiny one)
  mediators: int
  repeats: int
  timed_s: float              # target seconds of timed runs per item (after compile)


REAL = Plan(
    dry=False, matmul_size=8192, matmul_chain=8, bw_bytes=1 << 30,
    check_cases=tuple((2, N, 4, hd, n, "bfloat16") for N in (1024, 4096, 16384)
                      for n in (16, 64) for hd in (64, 72))
    + tuple((2, N, 4, hd, n, "float32") for N in (1024, 4096) for n in (16, 64) for hd in (64, 72)),
    check_est=5.0,
    kernel_B=4, kernel_h=16,
    kernel_cases=((16384, 64, 64), (4096, 64, 64), (16384, 72, 64), (4096, 72, 64),
                  (16384, 64, 16), (4096, 64, 16), (1024, 64, 64), (1024, 72, 64),
                  (16384, 72, 16), (4096, 72, 16), (1024, 64, 16), (1024, 72, 16)),
    kernel_modes=("fwd", "fwdbwd"), kernel_est=4.0,
    tune_shape=(4, 4096, 16, 64, 64), tune_mode="fwdbwd", tune_est=8.0,
    # B/2 @1024 at batch 2: fp32 full attention (XLA) materialises 2 x 12 x 16384^2 logits.
    model_cases=(("SiT-B/2", 512, 16), ("SiT-B/2", 1024, 2), ("SiT-XL/2", 256, 32),
                 ("SiT-XL/2", 512, 8), ("SiT-B/2", 256, 64)),
    model_dtypes=("bfloat16", "float32"),
    model_est={"SiT-B/2": 8.0, "SiT-XL/2": 20.0},
    train_cases=(("SiT-XL/2", 256, 32, 0), ("SiT-B/2", 256, 128, 0),
                 ("SiT-XL/2", 256, 32, MEDIATORS), ("SiT-B/2", 256, 128, MEDIATORS)),
    train_est={"SiT-B/2": 30.0, "SiT-XL/2": 60.0},
    sample_cases=(("SiT-XL/2", 256, 32, 0), ("SiT-XL/2", 256, 32, MEDIATORS),
                  ("SiT-B/2", 256, 64, 0), ("SiT-B/2", 256, 64, MEDIATORS)),
    sample_est={"SiT-B/2": 15.0, "SiT-XL/2": 30.0},
    sample_steps=50, edt_cases=(("EDT-S/2", 256, 64),), edt_est=10.0, edt_kw={},
    edt_amm="official", compute_dtype="bfloat16", model_kw={}, mediators=MEDIATORS, repeats=10,
    timed_s=2.0)

# Tiny everything, one item per code path (the dry-run test keeps CI time low): a 1-block SiT
# with hidden 64 on an 8x8 latent (64 px, 16 tokens, n = 4), float32 (bf16 compiles several times
# slower on XLA:CPU), the train step with full attention (its compile is half the mediator
# model's on XLA:CPU; the model section runs the mediator paths); N = 48 kernel tokens (not a
# block multiple: the padding path). The kernel section runs fwd+bwd, the sweep the fwd path.
DRY = Plan(
    dry=True, matmul_size=128, matmul_chain=2, bw_bytes=1 << 20,
    check_cases=((2, 48, 2, 64, 4, "bfloat16"),), check_est=1.0,
    kernel_B=1, kernel_h=2, kernel_cases=((48, 64, 4),), kernel_modes=("fwdbwd",),
    kernel_est=1.0,
    tune_shape=(1, 48, 2, 64, 4), tune_mode="fwd", tune_est=1.0,
    model_cases=(("SiT-B/2", 64, 2),), model_dtypes=("float32",), model_est={"SiT-B/2": 1.0},
    train_cases=(("SiT-B/2", 64, 2, 0),), train_est={"SiT-B/2": 1.0},
    sample_cases=(("SiT-B/2", 64, 2, 4),), sample_est={"SiT-B/2": 1.0},
    sample_steps=3, edt_cases=(("EDT-S/2", 64, 2),), edt_est=1.0,
    edt_kw=dict(stage_depths=(1, 1, 1), stage_dims=(16, 24, 16), stage_heads=(2, 2, 2),
                num_classes=10),
    edt_amm="1,2", compute_dtype="float32",
    model_kw=dict(depth=1, hidden_size=64, num_heads=2, num_classes=10),
    mediators=4, repeats=2, timed_s=0.0)


# ------------------------------------------------------------------------------------------------
# Budget, items and incremental output.


class Runner:
  """Runs items under the time budget, records them, and rewrites the outputs after each one."""

  def __init__(self, out_dir: pathlib.Path, budget_s: float, meta: dict, match: str | None,
               clock=time.perf_counter, t_start: float | None = None, reserve_s: float = 5.0):
    self.out = pathlib.Path(out_dir)
    self.out.mkdir(parents=True, exist_ok=True)
    self.clock = clock
    self.t_start = T0 if t_start is None else t_start
    self.deadline = self.t_start + budget_s - reserve_s
    self.match = re.compile(match) if match else None
    self.results = {"meta": {**meta, "status": "running", "budget_s": budget_s},
                    "sections": {}, "peaks": {}}
    self.section_name = None
    self.section_deadline = self.deadline
    self._ratios: list[float] = []

  # -- sections ------------------------------------------------------------------------------
  def start_section(self, name: str, weight: float, remaining_weight: float):
    """Allowance = time left x weight / (weight of this and the later sections)."""
    now = self.clock()
    left = max(0.0, self.deadline - now)
    allowance = left * weight / remaining_weight if remaining_weight > 0 else left
    self.section_name = name
    self.section_deadline = now + allowance
    self._ratios = []
    self.results["sections"][name] = {"allowance_s": round(allowance, 1), "items": [],
                                      "started_s": round(now - self.t_start, 1)}
    log(f"== section {name}: allowance {allowance:.0f} s of {left:.0f} s left")
    self.save()

  def end_section(self):
    sec = self.results["sections"][self.section_name]
    sec["elapsed_s"] = round(self.clock() - self.t_start - sec["started_s"], 1)
    self.save()

  def section_left(self) -> float:
    return min(self.section_deadline, self.deadline) - self.clock()

  def estimate(self, guess: float) -> float:
    """The guess scaled by the median (actual / guess) of this section's items so far, leaving
    out the section's first item (it pays the one-time costs: imports, first compiles)."""
    ratios = self._ratios[1:]
    if not ratios:
      return guess
    r = sorted(ratios)[len(ratios) // 2]
    return guess * min(4.0, max(0.3, r))

  # -- items ---------------------------------------------------------------------------------
  def item(self, name: str, guess_s: float, fn, *, check=None, force: bool = False):
    """Run `fn()` if its estimate fits (or `force`); record ok / failed / error / skipped.
    Returns the result (None when skipped or errored). `check(result) -> list of problems`
    marks it failed."""
    sec = self.results["sections"][self.section_name]
    rec = {"name": name, "est_s": round(self.estimate(guess_s), 1)}
    if self.match and not self.match.search(f"{self.section_name}/{name}"):
      return None
    left = self.section_left()
    if rec["est_s"] > left and not force:
      rec.update(status="skipped", reason=f"would not fit: estimated {rec['est_s']:.0f} s, "
                 f"{max(left, 0):.0f} s left in section {self.section_name}")
      sec["items"].append(rec)
      log(f"   skip {name}: {rec['reason']}")
      self.save()
      return None
    self.results["meta"]["current"] = f"{self.section_name}/{name}"
    self.save()
    log(f"   run  {name} (est {rec['est_s']:.0f} s, {left:.0f} s left)")
    t0, c0 = self.clock(), time.process_time()
    result = None
    try:
      result = fn()
      problems = check(result) if check else []
      rec["status"] = "failed" if problems else "ok"
      if problems:
        rec["problems"] = problems
    except Exception as e:  # noqa: BLE001 - one item's failure must not lose the others
      rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:2000]}",
                 traceback=traceback.format_exc()[-3000:])
    gc.collect()   # free the item's device buffers before the next one
    dt = self.clock() - t0
    rec["elapsed_s"] = round(dt, 2)
    rec["cpu_s"] = round(time.process_time() - c0, 2)
    if result is not None:
      rec["result"] = result
    if guess_s > 0 and rec["status"] != "error":
      self._ratios.append(dt / guess_s)
    sec["items"].append(rec)
    self.results["meta"].pop("current", None)
    msg = rec.get("error") or rec.get("problems") or ""
    log(f"   {rec['status']:7s}{name} in {dt:.1f} s (cpu {rec['cpu_s']:.1f} s) {str(msg)[:300]}")
    self.save()
    return result if rec["status"] != "error" else None

  # -- output --------------------------------------------------------------------------------
  def save(self):
    meta = self.results["meta"]
    meta["elapsed_s"] = round(self.clock() - self.t_start, 1)
    meta["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    tmp = self.out / "device_check.json.tmp"
    tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
    os.replace(tmp, self.out / "device_check.json")
    tmp = self.out / "device_check.md.tmp"
    tmp.write_text(markdown(self.results))
    os.replace(tmp, self.out / "device_check.md")

  def all_items(self):
    for sec in self.results["sections"].values():
      yield from sec["items"]


def _json_default(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


# ------------------------------------------------------------------------------------------------
# Sections.


def section_env(run: Runner, plan: Plan):
  def env():
    import importlib.metadata as md  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415
    from edit_jax.kernels.mediator_pallas import pallas_available  # noqa: PLC0415
    d = jax.devices()[0]
    info = {"python": sys.version.split()[0], "host": platform.node(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "device_count": jax.device_count(),
            "device_kind": getattr(d, "device_kind", d.platform), "platform": d.platform,
            "platform_version": str(getattr(d.client, "platform_version", "")),
            "compute_capability": str(getattr(d, "compute_capability", "")),
            "pallas_available": pallas_available()}
    try:
      stats = d.memory_stats() or {}
      info["memory_gib"] = round(stats.get("bytes_limit", 0) / 2 ** 30, 2)
    except Exception as e:  # noqa: BLE001 - CPU devices may not report memory
      info["memory_gib"] = f"n/a ({type(e).__name__})"
    try:
      from jax._src.lib import cuda_versions  # noqa: PLC0415
      if cuda_versions is not None:
        for fn in sorted(dir(cuda_versions)):
          if fn.endswith("_get_version"):
            try:
              info[fn.replace("_get_version", "")] = getattr(cuda_versions, fn)()
            except Exception as e:  # noqa: BLE001
              info[fn.replace("_get_version", "")] = f"n/a ({type(e).__name__})"
    except ImportError:
      pass
    pkgs = {}
    for p in ("flax", "optax", "numpy", "orbax-checkpoint", "chex", "diffrax", "jax-cuda13-plugin",
              "jax-cuda12-plugin", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "torch"):
      try:
        pkgs[p] = md.version(p)
      except md.PackageNotFoundError:
        pass
    info["packages"] = pkgs
    def missing(m):
      try:
        return importlib.util.find_spec(m) is None
      except (ImportError, ValueError):
        return True
    info["missing_optional_modules"] = [m for m in OPTIONAL_MODULES if missing(m)]
    for mod in ("jax.experimental.pallas.triton", "jax.experimental.pallas.mosaic_gpu"):
      try:
        importlib.import_module(mod)
        info[mod.rsplit(".", 1)[1] + "_importable"] = True
      except Exception as e:  # noqa: BLE001
        info[mod.rsplit(".", 1)[1] + "_importable"] = f"no ({type(e).__name__})"
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("XLA_", "JAX_", "CUDA_VISIBLE", "TF_"))}
    if shutil.which("nvidia-smi"):
      try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,"
             "power.limit,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
      except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = f"n/a ({type(e).__name__})"
    return info

  res = run.item("environment", 2.0, env, force=True)
  if res:
    run.results["env"] = res
    for k, v in res.items():
      if k not in ("env", "packages"):
        log(f"   {k}: {v}")
    log(f"   packages: {res.get('packages')}")
    log(f"   environment variables: {res.get('env')}")


def section_peak(run: Runner, plan: Plan):
  from edit_jax import metrics  # noqa: PLC0415
  s, c = plan.matmul_size, plan.matmul_chain
  for dtype in ("bfloat16", "float32"):
    r = run.item(f"matmul {dtype} {s}^3 x{c}", 5.0,    # forced: MFU and rooflines need them
                 lambda dtype=dtype: metrics.measure_matmul_tflops(dtype, size=s, chain=c),
                 force=True)
    if r:
      run.results["peaks"][f"matmul_tflops_{dtype}"] = sig(r["tflops"])
  r = run.item(f"bandwidth {plan.bw_bytes >> 20} MiB", 3.0,
               lambda: metrics.measure_bandwidth_gbs(plan.bw_bytes), force=True)
  if r:
    run.results["peaks"]["bandwidth_gbs"] = sig(r["gbs"])
  kind = run.results.get("env", {}).get("device_kind", "")
  run.results["peaks"]["datasheet_tflops_bf16"] = metrics.peak_tflops_per_device()
  log(f"   peaks: {run.results['peaks']} ({kind})")


def _kernel_peaks(run: Runner):
  from benchmarks.mediator_kernel import peaks_for_device  # noqa: PLC0415
  p = run.results["peaks"]
  return peaks_for_device(p.get("matmul_tflops_bfloat16"), p.get("bandwidth_gbs"))


def section_correctness(run: Runner, plan: Plan):
  import jax.numpy as jnp  # noqa: PLC0415
  from benchmarks.mediator_kernel import correctness  # noqa: PLC0415
  interpret = plan.dry
  for B, N, h, hd, n, dt in plan.check_cases:
    run.item(f"{dt} B{B} N{N} h{h} hd{hd} n{n}", plan.check_est,
             lambda B=B, N=N, h=h, hd=hd, n=n, dt=dt: correctness(
                 B, N, h, hd, n, jnp.dtype(dt), interpret=interpret),
             check=lambda r: [f"{nm}: kernel {r['errs'][nm]:.2e} vs reference "
                              f"{r['ref_errs'][nm]:.2e}" for nm in r["failed"]])


def _row_problems(row):
  return [row.get("note", "error")] if row.get("ms") == "error" else []


def section_kernel(run: Runner, plan: Plan):
  from benchmarks.mediator_kernel import bench_row  # noqa: PLC0415
  peaks = _kernel_peaks(run)
  run.results["sections"]["kernel"]["peaks"] = peaks
  B, h = plan.kernel_B, plan.kernel_h
  for N, hd, n in plan.kernel_cases:
    for mode in plan.kernel_modes:
      for impl in ("pallas", "xla", "full"):
        if impl == "full" and any(
            it.get("result", {}).get("impl") == "full" and it["result"]["N"] == N
            and it["result"]["hd"] == hd and it["result"]["mode"] == mode
            for it in run.results["sections"]["kernel"]["items"] if it.get("result")):
          continue   # full attention does not depend on n: once per (N, hd, mode)
        run.item(f"{impl} {mode} B{B} N{N} h{h} hd{hd} n{n}", plan.kernel_est,
                 lambda impl=impl, mode=mode, N=N, hd=hd, n=n: bench_row(
                     impl, mode, B, N, h, hd, n, interpret=plan.dry, peaks=peaks,
                     repeats=plan.repeats, inner=1 if plan.dry else 5,
                     max_time=max(plan.timed_s, 0.5)),
                 check=_row_problems)


def section_autotune(run: Runner, plan: Plan):
  import jax  # noqa: PLC0415
  from benchmarks.mediator_kernel import bench_row, block_label, pick_best  # noqa: PLC0415
  from edit_jax.kernels.mediator_pallas import block_size_candidates  # noqa: PLC0415
  peaks = _kernel_peaks(run)
  B, N, h, hd, n = plan.tune_shape
  rows = []
  for bs in block_size_candidates(jax.default_backend()):
    r = run.item(f"{plan.tune_mode} B{B} N{N} h{h} hd{hd} n{n} [{block_label(bs)}]",
                 plan.tune_est,
                 lambda bs=bs: bench_row("pallas", plan.tune_mode, B, N, h, hd, n,
                                         interpret=plan.dry, peaks=peaks, repeats=plan.repeats,
                                         block_sizes=bs, inner=1 if plan.dry else 5,
                                         max_time=max(plan.timed_s, 0.5)),
                 check=_row_problems)
    if r:
      rows.append(r)
  best = pick_best(rows)
  run.results["sections"]["autotune"]["best"] = best and best["blocks"]
  run.results["sections"]["autotune"]["default_ms"] = rows[0]["ms"] if rows else None
  if best:
    log(f"   best blocks: {best['blocks']} at {best['ms']} ms")


def _model(plan: Plan, name, res, n, dtype, attention_impl="xla", full_impl=None):
  import jax.numpy as jnp  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  return flops.model_at(name, res, n, dtype=jnp.dtype(dtype), attention_impl=attention_impl,
                        full_attention_impl=full_impl, **plan.model_kw)


def _full_impl(dtype: str):
  """cuDNN flash attention for bf16 on GPU (it has no fp32 kernel); XLA otherwise."""
  import jax  # noqa: PLC0415
  return "cudnn" if jax.default_backend() == "gpu" and dtype == "bfloat16" else None


def section_model(run: Runner, plan: Plan):
  from benchmarks.attention_speed import forward_time  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  for dtype in plan.model_dtypes:
    for name, res, batch in plan.model_cases:
      for variant in ("full", "mediators-xla", "mediators-pallas"):
        n = 0 if variant == "full" else plan.mediators
        impl = "pallas" if variant == "mediators-pallas" else "xla"
        full_impl = _full_impl(dtype) if variant == "full" else None

        def fn(name=name, res=res, batch=batch, n=n, impl=impl, full_impl=full_impl,
               dtype=dtype, variant=variant):
          model = _model(plan, name, res, n, dtype, impl, full_impl)
          t = forward_time(model, batch, plan.repeats, max_time=max(plan.timed_s, 0.5))
          g = flops.gflops(model)
          return {"model": name, "res": res, "batch": batch, "dtype": dtype, "variant": variant,
                  "mediators": n, "attention": (full_impl or "xla") if n == 0 else impl,
                  "ms": sig(t["median_s"] * 1e3), "min_ms": sig(t["min_s"] * 1e3),
                  "compile_s": round(t["first_s"], 1), "runs": t["runs"],
                  "gflops_per_image": sig(g, 6),
                  "tflops": sig(2 * g * batch / t["median_s"] / 1e3)}

        run.item(f"{name} @{res} b{batch} {dtype} {variant}", plan.model_est.get(name, 20.0), fn)


def section_train(run: Runner, plan: Plan):
  peak = run.results["peaks"].get(f"matmul_tflops_{plan.compute_dtype}")
  for name, res, batch, n in plan.train_cases:
    run.item(f"{name} @{res} b{batch} {'n%d' % n if n else 'full'} {plan.compute_dtype}",
             plan.train_est.get(name, 60.0),
             lambda name=name, res=res, batch=batch, n=n: train_step_throughput(
                 plan, name, res, batch, n, peak))


def train_step_throughput(plan: Plan, name, res, batch, n, peak_tflops):
  """images/s, TFLOP/s and MFU of the trainer's jitted step (plan.compute_dtype compute, fp32
  master weights); MFU against the measured matmul peak of that dtype."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from edit_jax import metrics, sharding, train  # noqa: PLC0415
  from edit_jax.diffusion import transport  # noqa: PLC0415
  dt = plan.compute_dtype
  model = _model(plan, name, res, n, dt, "xla", _full_impl(dt) if n == 0 else None)
  lr = 1e-4   # the official recipe: AdamW, lr 1e-4, betas (0.9, 0.999), no weight decay
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0))
    loss_fn = transport.make_loss_fn(model, transport.create_transport())
    step = train.make_train_step(loss_fn, tx, optax.constant_schedule(lr), mesh, shardings,
                                 metrics_fn=dict)
    bsh = sharding.batch_sharding(mesh)
    s = model.input_size
    data = {"x": jax.device_put(jax.random.normal(jax.random.key(1), (batch, s, s,
                                                                      model.in_channels)), bsh),
            "y": jax.device_put(jnp.arange(batch, dtype=jnp.int32) % model.num_classes, bsh)}
    rng = jax.random.key(2)
    t0 = time.perf_counter()
    state, m = step(state, data, rng)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    state, m = step(state, data, rng)      # a second warm-up step (donated buffers settle)
    jax.block_until_ready(state)
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or (time.perf_counter() - t0 < plan.timed_s and steps < 200):
      state, m = step(state, data, rng)
      steps += 1
      if steps % 5 == 0:
        jax.block_until_ready(m["loss"])
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    loss = float(m["loss"])
  flops_img = metrics.train_flops_per_image(model)
  tp = metrics.throughput(steps, dt, batch, flops_img, 1, peak_tflops)
  datasheet = metrics.peak_tflops_per_device()
  return {"model": name, "res": res, "batch": batch, "mediators": n, "dtype": dt,
          "params_dtype": str(jax.tree.leaves(state.params)[0].dtype),
          "steps": steps, "step_ms": sig(1e3 * dt / steps), "compile_s": round(compile_s, 1),
          "images_per_s": sig(tp["images_per_sec"]),
          "tflops": sig(tp["tflops_per_device"]),
          "mfu_measured_peak": sig(tp["mfu"]) if math.isfinite(tp["mfu"]) else None,
          "mfu_datasheet": (sig(tp["tflops_per_device"] / datasheet) if datasheet else None),
          "train_gflops_per_image": sig(flops_img / 1e9), "loss": loss,
          "loss_finite": math.isfinite(loss)}


def section_sample(run: Runner, plan: Plan):
  for name, res, batch, n in plan.sample_cases:
    run.item(f"{name} @{res} b{batch} {'n%d' % n if n else 'full'} euler{plan.sample_steps} "
             f"cfg4 {plan.compute_dtype}",
             plan.sample_est.get(name, 30.0),
             lambda name=name, res=res, batch=batch, n=n: sample_throughput(
                 plan, name, res, batch, n))


def sample_throughput(plan: Plan, name, res, batch, n, cfg_scale: float = 4.0):
  """images/s of the jitted Euler sampler with classifier-free guidance (batch doubled)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from benchmarks.attention_speed import random_params  # noqa: PLC0415
  from benchmarks.common import time_fn  # noqa: PLC0415
  from edit_jax.diffusion import samplers, transport  # noqa: PLC0415
  dt = plan.compute_dtype
  model = _model(plan, name, res, n, dt, "xla", _full_impl(dt) if n == 0 else None)
  params = random_params(model)
  cfg = samplers.ODEConfig(method="euler", num_steps=plan.sample_steps)
  f = jax.jit(samplers.make_sample_fn(model, transport.create_transport(), cfg,
                                      cfg_scale=cfg_scale))
  s = model.input_size
  x0 = jax.random.normal(jax.random.key(1), (batch, s, s, model.in_channels))
  y = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
  t = time_fn(f, params, x0, y, warmup=1, repeats=3, max_time=max(plan.timed_s, 0.5))
  out = f(params, x0, y)
  finite = bool(jnp.all(jnp.isfinite(out.x if hasattr(out, "x") else out[0])))
  return {"model": name, "res": res, "batch": batch, "mediators": n, "dtype": dt,
          "steps": plan.sample_steps, "cfg_scale": cfg_scale,
          "forwards_per_image": 2 * (plan.sample_steps - 1),
          "seconds_per_batch": sig(t["median_s"]), "compile_s": round(t["first_s"], 1),
          "images_per_s": sig(batch / t["median_s"]), "finite": finite}


def section_edt(run: Runner, plan: Plan):
  import jax.numpy as jnp  # noqa: PLC0415
  from benchmarks.attention_speed import forward_time  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  for dtype in plan.model_dtypes:
    for name, res, batch in plan.edt_cases:
      variants = (("SiT-S/2", "full", {}), (name, "no AMM", dict(amm_layers="none")),
                  (name, "AMM post_softmax", dict(amm_layers=plan.edt_amm)),
                  (name, "AMM log_bias", dict(amm_layers=plan.edt_amm, amm_mode="log_bias")))
      for model_name, variant, kw in variants:
        def fn(model_name=model_name, variant=variant, kw=kw, dtype=dtype, res=res, batch=batch):
          if model_name.startswith("SiT"):
            model = flops.model_at(model_name, res, 0, dtype=jnp.dtype(dtype),
                                   full_attention_impl=_full_impl(dtype), **plan.model_kw)
          else:
            model = flops.model_at(model_name, res, dtype=jnp.dtype(dtype),
                                   full_attention_impl=_full_impl(dtype), **plan.edt_kw, **kw)
          t = forward_time(model, batch, plan.repeats, max_time=max(plan.timed_s, 0.5))
          g = flops.gflops(model)
          return {"model": model_name, "variant": variant, "res": res, "batch": batch,
                  "dtype": dtype, "amm_blocks": list(getattr(model, "amm_blocks", ())),
                  "ms": sig(t["median_s"] * 1e3), "min_ms": sig(t["min_s"] * 1e3),
                  "compile_s": round(t["first_s"], 1), "runs": t["runs"],
                  "gflops_per_image": sig(g, 6),
                  "tflops": sig(2 * g * batch / t["median_s"] / 1e3)}

        run.item(f"{model_name} @{res} b{batch} {dtype} {variant}", plan.edt_est, fn)


SECTIONS = (  # name, weight (share of the budget), function
    ("env", 1.0, section_env),
    ("peak", 3.0, section_peak),
    ("correctness", 16.0, section_correctness),
    ("kernel", 16.0, section_kernel),
    ("autotune", 8.0, section_autotune),
    ("model", 24.0, section_model),
    ("train", 20.0, section_train),
    ("sample", 10.0, section_sample),
    ("edt", 6.0, section_edt),
)


# ------------------------------------------------------------------------------------------------
# Markdown.


def _table(rows: list[dict], cols: list[str]) -> str:
  if not rows:
    return "(none)\n"
  out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    out.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
  return "\n".join(out) + "\n"


def _ok_results(res, section):
  return [it["result"] for it in res["sections"].get(section, {}).get("items", [])
          if it.get("status") in ("ok", "failed") and isinstance(it.get("result"), dict)]


def markdown(res: dict) -> str:
  meta, env, peaks = res["meta"], res.get("env", {}), res.get("peaks", {})
  lines = [f"# Device check: {env.get('device_kind', '?')}",
           "",
           f"Command: `{meta.get('command', '')}`  ",
           f"Started {meta.get('started', '')}, status **{meta.get('status')}**, "
           f"{meta.get('elapsed_s')} s of a {meta.get('budget_s')} s budget"
           + (" (dry run: CPU, tiny sizes, interpreted kernel; not timings)" if meta.get("dry_run")
              else "") + ".", ""]
  if env:
    keys = ["device_kind", "compute_capability", "memory_gib", "jax", "jaxlib", "python",
            "platform_version", "cuda_runtime", "cudnn", "cuda_driver", "pallas_available",
            "missing_optional_modules", "nvidia_smi"]
    lines += ["## Environment", "", _table([{"key": k, "value": env[k]} for k in keys if k in env],
                                           ["key", "value"])]
  if peaks:
    lines += ["## Measured peaks", "", _table([{"what": k, "value": v} for k, v in peaks.items()],
                                              ["what", "value"])]
  corr = []
  for r in _ok_results(res, "correctness"):
    corr.append({**r["shape"], "dtype": r["dtype"], "kernel worst": r["worst"],
                 "reference worst": max(r["ref_errs"].values()),
                 "ok": "yes" if r["ok"] else "NO: " + ", ".join(r["failed"])})
  lines += ["## Kernel correctness (compiled; errors vs the exact f32 answer)", "",
            _table(corr, ["dtype", "B", "N", "h", "hd", "n", "kernel worst", "reference worst",
                          "ok"])]
  from benchmarks.mediator_kernel import TABLE_COLS  # noqa: PLC0415
  lines += ["## Kernel timing", "", _table(_ok_results(res, "kernel"),
                                           TABLE_COLS[:-1] + ["compile_s", "note"])]
  tune = res["sections"].get("autotune", {})
  lines += ["## Block-size sweep", "",
            _table(_ok_results(res, "autotune"), ["blocks", "mode", "N", "n", "ms", "tflops",
                                                  "gbs", "err"]),
            f"Best: `{tune.get('best')}`" if tune.get("best") else "", ""]
  lines += ["## Model forward: full vs mediators", "", _table(_model_rows(res), [
      "model", "res", "batch", "dtype", "full ms", "med xla ms", "med pallas ms",
      "time ratio xla", "time ratio pallas", "FLOPs ratio", "full attention"])]
  lines += ["## Training step (fp32 master weights; compute dtype in the table)", "",
            _table(_ok_results(res, "train"), ["model", "res", "batch", "mediators", "dtype",
                                               "step_ms",
                                               "images_per_s", "tflops", "mfu_measured_peak",
                                               "mfu_datasheet", "compile_s", "loss"])]
  lines += ["## Sampling (Euler, CFG)", "",
            _table(_ok_results(res, "sample"), ["model", "res", "batch", "mediators", "steps",
                                                "cfg_scale", "seconds_per_batch", "images_per_s",
                                                "compile_s", "finite"])]
  lines += ["## EDT-S/2 vs SiT-S/2 forward", "",
            _table(_edt_rows(res), ["model", "variant", "res", "batch", "dtype", "ms",
                                    "time vs SiT", "gflops_per_image", "FLOPs vs SiT",
                                    "tflops", "compile_s"])]
  other = [{"section": s, "item": it["name"], "status": it["status"],
            "why": (it.get("reason") or it.get("error") or "; ".join(it.get("problems", [])))[:300]}
           for s, sec in res["sections"].items() for it in sec["items"]
           if it.get("status") != "ok"]
  lines += ["## Skipped, failed or errored items", "",
            _table(other, ["section", "item", "status", "why"])]
  return "\n".join(lines)


def _edt_rows(res):
  rows = [dict(r) for r in _ok_results(res, "edt")]
  for r in rows:
    sit = next((b for b in rows if b["model"].startswith("SiT") and b["dtype"] == r["dtype"]
                and b["batch"] == r["batch"]), None)
    if sit:
      r["time vs SiT"] = sig(r["ms"] / sit["ms"])
      r["FLOPs vs SiT"] = sig(r["gflops_per_image"] / sit["gflops_per_image"])
  return rows


def _model_rows(res):
  groups: dict = {}
  for r in _ok_results(res, "model"):
    key = (r["model"], r["res"], r["batch"], r["dtype"])
    groups.setdefault(key, {})[r["variant"]] = r
  rows = []
  for (name, reso, batch, dtype), g in groups.items():
    full, mx, mp = g.get("full"), g.get("mediators-xla"), g.get("mediators-pallas")
    row = {"model": name, "res": reso, "batch": batch, "dtype": dtype,
           "full ms": full and full["ms"], "med xla ms": mx and mx["ms"],
           "med pallas ms": mp and mp["ms"], "full attention": full and full["attention"]}
    if full:
      if mx:
        row["time ratio xla"] = sig(mx["ms"] / full["ms"])
      if mp:
        row["time ratio pallas"] = sig(mp["ms"] / full["ms"])
      med = mx or mp
      if med:
        row["FLOPs ratio"] = sig(med["gflops_per_image"] / full["gflops_per_image"])
    rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------------
# Entry point.


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Sections: " + ", ".join(s for s, _, _ in SECTIONS))
  ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/device_check",
                  help="output folder (device_check.json, device_check.md); default $OUT or "
                       "benchmarks/results/device_check")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="seconds from process start, compiles included (default 420; dry run 600)")
  ap.add_argument("--sections", default="all", help="comma-separated subset (env always runs)")
  ap.add_argument("--match", default=None,
                  help="only items whose 'section/item' name matches this regular expression")
  ap.add_argument("--dry-run", action="store_true",
                  help="CPU, tiny sizes, the kernel interpreted: checks the plumbing in seconds")
  args = ap.parse_args(argv)
  names = [s for s, _, _ in SECTIONS]
  if args.sections != "all":
    want = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in want if s not in names]
    if bad:
      ap.error(f"unknown section(s) {bad}: choose from {', '.join(names)}")
    args.sections = ["env"] + [s for s in names if s in want and s != "env"]
  else:
    args.sections = names
  if args.budget_s is None:
    args.budget_s = 600.0 if args.dry_run else 420.0
  if args.budget_s <= 0:
    ap.error(f"--budget-s={args.budget_s}: must be > 0 seconds")
  if args.match:
    try:
      re.compile(args.match)
    except re.error as e:
      ap.error(f"--match={args.match!r} is not a regular expression: {e}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.dry_run:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  plan = DRY if args.dry_run else REAL
  meta = {"command": "python benchmarks/device_check.py " + " ".join(
              sys.argv[1:] if argv is None else argv),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
          "sections": args.sections, "plan": dataclasses.asdict(plan)}
  run = Runner(pathlib.Path(args.out), args.budget_s, meta, args.match)

  def on_signal(signum, frame):  # noqa: ARG001
    # Write the results so far and leave at once. (Raising here instead would be unreliable:
    # the handler can run inside a gc callback, where exceptions are ignored.)
    where = run.results["meta"].get("current", run.section_name)
    run.results["meta"]["status"] = f"terminated ({signal.Signals(signum).name}) during {where}"
    run.results["meta"]["counts"] = _counts(run)
    run.save()
    log(f"{run.results['meta']['status']}: wrote {run.out / 'device_check.json'}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  log(f"device check: budget {args.budget_s:.0f} s, output {run.out}, sections "
      f"{','.join(args.sections)}{' (dry run)' if args.dry_run else ''}")
  try:
    todo = [s for s in SECTIONS if s[0] in args.sections]
    for i, (name, _, fn) in enumerate(todo):
      run.start_section(name, todo[i][1], sum(w for _, w, _ in todo[i:]))
      try:
        fn(run, plan)
      except Exception as e:  # noqa: BLE001 - a section's own setup failed: record, go on
        run.results["sections"][name]["error"] = f"{type(e).__name__}: {e}"
        run.results["sections"][name]["traceback"] = traceback.format_exc()[-3000:]
        log(f"   section {name} failed: {type(e).__name__}: {e}")
      run.end_section()
      backend = run.results.get("env", {}).get("backend")
      if name == "env" and not plan.dry and backend in ("cpu", None):
        why = (f"no accelerator: jax's backend is {backend!r} (check the CUDA plugin and "
               "nvidia-smi); use --dry-run for a CPU check")
        run.results["meta"].update(status=f"aborted: {why}", counts=_counts(run))
        run.save()
        log(f"aborted: {why}")
        return 1
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  counts = _counts(run)
  sec_errors = [s for s, sec in run.results["sections"].items() if "error" in sec]
  run.results["meta"].update(status="done", counts=counts)
  run.save()
  log(f"done: {counts}; section errors: {sec_errors or 'none'}; "
      f"wrote {run.out / 'device_check.json'} and {run.out / 'device_check.md'}")
  return 1 if counts["failed"] or counts["error"] or sec_errors else 0


def _counts(run: Runner) -> dict:
  items = list(run.all_items())
  return {k: sum(1 for it in items if it.get("status") == k)
          for k in ("ok", "failed", "error", "skipped")}


if __name__ == "__main__":
  sys.exit(main())
