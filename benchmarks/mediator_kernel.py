"""Mediator-attention core: Pallas kernel vs the XLA reference vs full attention.

    python benchmarks/mediator_kernel.py [--quick] [--out benchmarks/results/mediator_kernel.json]
        [--tokens 256,1024,4096,16384] [--mediators 16,64] [--head-dims 64,72]
        [--batch 4] [--heads 16] [--modes fwd,fwdbwd] [--repeats 10] [--tune]

Implementations (bf16 inputs, float32 biases, all jitted):
  pallas  `mediator_attention_pallas` (on CPU: interpret mode, labelled "interpret, not a timing")
  xla     `mediator_attention_reference`
  full    `jax.nn.dot_product_attention`, implementation="cudnn" on GPU, "xla" elsewhere
"err" (pallas rows): max relative error vs the XLA reference on the same device (output for fwd,
every gradient for fwdbwd); bf16, so ~1e-2 is expected.
Modes: fwd = forward only; fwdbwd = value and gradients (w.r.t. q, k, v, m, bias1, bias2 for the
mediator core, q, k, v for full attention) of sum(out * w).

Counting (per call):
  FLOPs (1 multiply-add = 2 FLOPs, model FLOPs, recomputation not counted):
    mediator fwd 4 * 2*B*h*n*N*hd, bwd twice that;  full fwd 2 * 2*B*h*N*N*hd, bwd twice that.
  Bytes (the memory floor: every tensor the pass must read or write, once):
    mediator fwd: q, k, v, m, bias1, bias2, out;  bwd: the same inputs + dout, and the six grads.
    full fwd: q, k, v, out;  bwd: q, k, v, out, dout, dq, dk, dv.
  roofline time = max(FLOPs / peak FLOP/s, bytes / peak B/s) from PEAKS below;
  "roofline" column = roofline time / measured time (1.0 = at the roofline);
  "bw_frac" = (floor bytes / peak B/s) / measured time: fraction of the bandwidth floor reached.
--quick: a tiny CPU-sized sweep (B=1, h=2, N in 256, 1024) to check the script end to end.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import print_table, time_fn, write_json  # noqa: E402
from edit_jax.kernels.mediator_attention import mediator_attention_reference  # noqa: E402
from edit_jax.kernels.mediator_pallas import (  # noqa: E402
    block_size_candidates, mediator_attention_pallas, pallas_available)

# Dense bf16 peak FLOP/s and HBM bytes/s per device kind (vendor datasheets; substring match on
# jax's device_kind, first match wins).
PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.039e12),
    ("L4", 121e12, 0.3e12),
    ("TPU v6", 918e12, 1.64e12),
    ("TPU v5p", 459e12, 2.765e12),
    ("TPU v5", 197e12, 0.819e12),     # v5e / "TPU v5 lite"
    ("TPU v4", 275e12, 1.2e12),
)


def device_peaks():
  kind = getattr(jax.devices()[0], "device_kind", "")
  for key, flops, bw in PEAKS:
    if key.lower() in kind.lower():
      return kind, flops, bw
  return kind, None, None


def _nbytes(*shapes_dtypes):
  return sum(int(jnp.prod(jnp.array(s))) * jnp.dtype(d).itemsize for s, d in shapes_dtypes)


def counts(kind, mode, B, N, h, hd, n, dtype):
  """(FLOPs, floor bytes) of one call; see the module docstring."""
  tok = ((B, N, h, hd), dtype)
  if kind == "full":
    flops = 4 * B * h * N * N * hd
    fwd_bytes = _nbytes(tok, tok, tok, tok)
    bwd_bytes = _nbytes(*[tok] * 8)
  else:
    flops = 8 * B * h * n * N * hd
    med, bias = ((B, n, h, hd), dtype), ((h, n, N), jnp.float32)
    fwd_bytes = _nbytes(tok, tok, tok, med, bias, bias, tok)
    bwd_bytes = _nbytes(tok, tok, tok, med, bias, bias, tok) + _nbytes(tok, tok, tok, med, bias,
                                                                        bias)
  if mode == "fwd":
    return flops, fwd_bytes
  return 3 * flops, fwd_bytes + bwd_bytes


def make_fn(kind, mode, interpret, block_sizes=None):
  """Jitted `f(w, q, k, v, m, b1, b2)` of one implementation: the output (mode "fwd") or
  (sum(out * w), grads) (mode "fwdbwd"; grads w.r.t. q, k, v, m, b1, b2, or q, k, v for "full")."""
  backend = jax.default_backend()
  if kind == "pallas":
    core = lambda q, k, v, m, b1, b2: mediator_attention_pallas(  # noqa: E731
        q, k, v, m, b1, b2, interpret=interpret, block_sizes=block_sizes)
  elif kind == "xla":
    core = mediator_attention_reference
  else:
    impl = "cudnn" if backend == "gpu" else "xla"
    core = lambda q, k, v, m, b1, b2: jax.nn.dot_product_attention(q, k, v,  # noqa: E731
                                                                   implementation=impl)
  if mode == "fwd":
    return jax.jit(lambda w, *a: core(*a))
  argnums = (1, 2, 3) if kind == "full" else (1, 2, 3, 4, 5, 6)
  loss = lambda w, *a: jnp.sum(core(*a).astype(jnp.float32) * w)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def rel_errs(got, want):
  """max|got - want| / max|want| per leaf (lists of arrays, same structure)."""
  return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-30))
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]


def max_rel_err(got, want):
  """Largest max|got - want| / max|want| over the leaves (output, or loss and gradients)."""
  return float(f"{max(rel_errs(got, want)):.2e}")


def inputs(B, N, h, hd, n, dtype, seed=0, bias_scale=0.02):
  """(w, q, k, v, m, bias1, bias2): q, k, v (B, N, h, hd), m (B, n, h, hd) in dtype ~ N(0, 1);
  biases (h, n, N), (h, N, n) f32 ~ N(0, bias_scale^2); w (B, N, h, hd) f32 loss weights."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q, k, v = (jax.random.normal(ks[i], (B, N, h, hd), dtype) for i in range(3))
  m = jax.random.normal(ks[3], (B, n, h, hd), dtype)
  b1 = bias_scale * jax.random.normal(ks[4], (h, n, N), jnp.float32)
  b2 = bias_scale * jax.random.normal(ks[5], (h, N, n), jnp.float32)
  w = jax.random.normal(ks[6], (B, N, h, hd), jnp.float32)
  return w, q, k, v, m, b1, b2


def peaks_for_device(measured_tflops=None, measured_gbs=None):
  """{"kind", "flops", "bw", "source"}: peak FLOP/s and bytes/s for the roofline columns.
  Measured values (device_check's microbenchmarks) win over the datasheet table PEAKS."""
  kind, flops, bw = device_peaks()
  src = "datasheet" if flops else "none"
  if measured_tflops:
    flops, src = measured_tflops * 1e12, "measured"
  if measured_gbs:
    bw = measured_gbs * 1e9
  return {"kind": kind, "flops": flops, "bw": bw, "source": src}


def bench_row(impl, mode, B, N, h, hd, n, *, dtype=jnp.bfloat16, interpret=False, peaks=None,
              repeats=10, block_sizes=None, check=True, inner=1, max_time=float("inf")):
  """Time one (implementation, mode, shape); returns a table row (see the module docstring).

  Errors (OOM, unsupported shape) are recorded in the row ("ms": "error") instead of raised.
  check: for "pallas" rows, also the max relative error vs the XLA reference on this device.
  """
  row = {"impl": impl, "mode": mode, "B": B, "N": N, "h": h, "hd": hd,
         "n": "-" if impl == "full" else n}
  if block_sizes is not None and impl == "pallas":
    row["blocks"] = block_label(block_sizes)
  note = "interpret, not a timing" if (impl == "pallas" and interpret) else ""
  if jax.default_backend() == "cpu" and not note:
    note = "cpu"
  try:
    data = inputs(B, N, h, hd, n, dtype)
    fn = make_fn(impl, mode, interpret, block_sizes)
    tm = time_fn(fn, *data, warmup=1, repeats=repeats, inner=inner, max_time=max_time)
    t = tm["median_s"]
    row["compile_s"] = round(tm["first_s"], 2)
    if impl == "pallas" and check:   # correctness on this device: max rel. error vs the reference
      got, want = fn(*data), make_fn("xla", mode, interpret)(*data)
      if mode == "fwdbwd":   # gradients only (the scalar loss is a cancelling sum)
        got, want = got[1], want[1]
      row["err"] = max_rel_err(got, want)
  except Exception as e:  # noqa: BLE001 - record OOM / unsupported shapes and go on
    first = str(e).splitlines()[0][:160] if str(e) else ""
    row.update(ms="error", note=f"{type(e).__name__}: {first}")
    return row
  flops, nbytes = counts(impl, mode, B, N, h, hd, n, dtype)
  row.update(ms=round(t * 1e3, 4), tflops=round(flops / t / 1e12, 3),
             gbs=round(nbytes / t / 1e9, 1), note=note, flops=flops, floor_bytes=nbytes)
  peaks = peaks or {}
  if peaks.get("flops") and peaks.get("bw"):
    pf, pb = peaks["flops"], peaks["bw"]
    floor_t = max(flops / pf, nbytes / pb)
    row.update(roofline=float(f"{floor_t / t:.3g}"), floor_ms=float(f"{floor_t * 1e3:.4g}"),
               bw_frac=float(f"{nbytes / pb / t:.3g}"),
               bound="compute" if flops / pf > nbytes / pb else "memory")
  return row


# Correctness against the exact answer. Additive slack per dtype on top of 2x the reference's own
# error (bf16: as tests/test_mediator_kernel.py; f32: Triton runs f32 dots on TF32 tensor cores at
# the default precision, XLA's reference may too).
CHECK_SLACK = {"bfloat16": 4e-3, "float32": 1e-3}
CHECK_NAMES = ("out", "dq", "dk", "dv", "dm", "dbias1", "dbias2")


def correctness(B, N, h, hd, n, dtype=jnp.bfloat16, *, interpret=False, block_sizes=None, seed=0):
  """Kernel forward and all six gradients vs the exact answer on this device.

  The exact answer is the jnp reference on the same inputs cast to f32 at HIGHEST matmul
  precision. The kernel passes when, for the output and every gradient,
  err_kernel <= 2 * err_reference + CHECK_SLACK[dtype], where err_reference is the error of the
  jnp reference run in `dtype` at the default precision (the XLA path the model would use).
  Returns {"shape", "dtype", "errs": {name: kernel err}, "ref_errs": {...}, "ok": bool, "worst"}.
  """
  w, *args = inputs(B, N, h, hd, n, dtype, seed=seed, bias_scale=0.5)
  args = tuple(args)

  def fwd_and_grads(fn, a):
    def both(w, *a):
      out, vjp = jax.vjp(fn, *a)
      return out, vjp(w.astype(out.dtype))
    return jax.jit(both)(w, *a)

  kern = fwd_and_grads(lambda *a: mediator_attention_pallas(
      *a, interpret=interpret, block_sizes=block_sizes), args)
  ref = fwd_and_grads(mediator_attention_reference, args)
  with jax.default_matmul_precision("highest"):
    exact = fwd_and_grads(mediator_attention_reference, tuple(a.astype(jnp.float32) for a in args))
  flat = lambda r: [r[0], *r[1]]  # noqa: E731
  for a, b in zip(flat(kern), flat(ref)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise AssertionError(f"kernel result {a.shape} {a.dtype} != reference {b.shape} {b.dtype}")
  ek, er = rel_errs(flat(kern), flat(exact)), rel_errs(flat(ref), flat(exact))
  slack = CHECK_SLACK[jnp.dtype(dtype).name]
  bad = [nm for nm, a, b in zip(CHECK_NAMES, ek, er) if not a <= 2 * b + slack]
  return {"shape": {"B": B, "N": N, "h": h, "hd": hd, "n": n}, "dtype": jnp.dtype(dtype).name,
          "errs": {nm: float(f"{e:.3e}") for nm, e in zip(CHECK_NAMES, ek)},
          "ref_errs": {nm: float(f"{e:.3e}") for nm, e in zip(CHECK_NAMES, er)},
          "worst": float(f"{max(ek):.3e}"), "failed": bad, "ok": not bad}


def block_label(bs) -> str:
  """Short label of a BlockSizes: q/k/kmaj/qb/kb/b/bb/warps/stages."""
  return (f"q{bs.block_q} k{bs.block_k} km{bs.block_k_major} qb{bs.block_q_bwd} "
          f"kb{bs.block_k_bwd} b{bs.block_b} bb{bs.block_b_bwd} w{bs.num_warps} s{bs.num_stages}")


def autotune(B, N, h, hd, n, candidates, *, dtype=jnp.bfloat16, interpret=False, mode="fwdbwd",
             repeats=5, inner=1, deadline=None, peaks=None, log=print):
  """Time `mode` for each BlockSizes in `candidates` (stops starting new ones after `deadline`,
  a time.perf_counter() value). Each row carries its error vs the reference; the best is the
  fastest row whose error is below 5e-2 (bf16). Returns {"rows", "best", "skipped"}."""
  import time  # noqa: PLC0415
  rows, skipped = [], []
  for bs in candidates:
    if deadline is not None and time.perf_counter() > deadline:
      skipped.append(block_label(bs))
      continue
    row = bench_row("pallas", mode, B, N, h, hd, n, dtype=dtype, interpret=interpret, peaks=peaks,
                    repeats=repeats, block_sizes=bs, inner=inner)
    rows.append(row)
    log(f"autotune {row.get('blocks')}: {row.get('ms')} ms, err {row.get('err')}")
  return {"rows": rows, "best": pick_best(rows), "skipped": skipped}


def pick_best(rows):
  """The fastest timed row whose error vs the reference is below 5e-2 (bf16), or None."""
  ok = [r for r in rows if isinstance(r.get("ms"), float) and r.get("err", 1.0) < 5e-2]
  return min(ok, key=lambda r: r["ms"]) if ok else None


TABLE_COLS = ["impl", "mode", "B", "N", "h", "hd", "n", "ms", "tflops", "gbs", "roofline",
              "bw_frac", "bound", "err", "note"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="tiny sizes (runs on CPU)")
  ap.add_argument("--tokens", default="256,1024,4096,16384")
  ap.add_argument("--mediators", default="16,64")
  ap.add_argument("--head-dims", default="64,72")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--modes", default="fwd,fwdbwd")
  ap.add_argument("--impls", default="pallas,xla,full")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--tune", action="store_true",
                  help="instead of the sweep: time block_size_candidates() at the first "
                       "(N, hd, n), mode fwdbwd, and print the best")
  ap.add_argument("--out", default="benchmarks/results/mediator_kernel.json")
  args = ap.parse_args(argv)
  if args.quick:
    args.tokens, args.batch, args.heads, args.repeats = "256,1024", 1, 2, 3
  backend = jax.default_backend()
  interpret = backend == "cpu"
  if not pallas_available(backend):
    print(f"note: no Pallas lowering on {backend!r}; the 'pallas' rows time the XLA fallback")
  kind, peak_flops, peak_bw = device_peaks()
  peaks = {"flops": peak_flops, "bw": peak_bw}
  dtype = jnp.bfloat16
  if args.tune:
    N, hd, n = (int(x.split(",")[0]) for x in (args.tokens, args.head_dims, args.mediators))
    res = autotune(args.batch, N, args.heads, hd, n, block_size_candidates(backend),
                   interpret=interpret, repeats=args.repeats, peaks=peaks)
    print_table(res["rows"], ["blocks", "mode", "N", "n", "ms", "tflops", "gbs", "err", "note"])
    print("best:", res["best"] and res["best"]["blocks"])
    write_json(args.out, {"args": vars(args), "device_kind": kind, **res})
    return
  rows = []
  for N in map(int, args.tokens.split(",")):
    for hd in map(int, args.head_dims.split(",")):
      for n in map(int, args.mediators.split(",")):
        for mode in args.modes.split(","):
          for impl in args.impls.split(","):
            if impl == "full" and n != int(args.mediators.split(",")[0]):
              continue   # full attention does not depend on n: time it once per (N, hd)
            row = bench_row(impl, mode, args.batch, N, args.heads, hd, n, dtype=dtype,
                            interpret=interpret, peaks=peaks, repeats=args.repeats)
            rows.append(row)
            print(row, flush=True)
  print(f"\ndevice kind: {kind!r}; peaks: "
        + (f"{peak_flops / 1e12:.0f} TFLOP/s, {peak_bw / 1e12:.2f} TB/s" if peak_flops
           else "unknown (no roofline column)"))
  table = print_table(rows, TABLE_COLS)
  write_json(args.out, {"args": vars(args), "device_kind": kind, "peak_flops": peak_flops,
                        "peak_bytes_per_s": peak_bw, "rows": rows, "table": table})


if __name__ == "__main__":
  main()
