"""Mediator-attention core: Pallas kernel vs the XLA reference vs full attention.

    python benchmarks/mediator_kernel.py [--quick] [--out benchmarks/results/mediator_kernel.json]
        [--tokens 256,1024,4096,16384] [--mediators 16,64] [--head-dims 64,72]
        [--batch 4] [--heads 16] [--modes fwd,fwdbwd] [--repeats 10]

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
  "roofline" column = roofline time / measured time (1.0 = at the roofline).
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
    mediator_attention_pallas, pallas_available)

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


def make_fn(kind, mode, interpret):
  backend = jax.default_backend()
  if kind == "pallas":
    core = lambda q, k, v, m, b1, b2: mediator_attention_pallas(q, k, v, m, b1, b2,  # noqa: E731
                                                                 interpret=interpret)
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


def max_rel_err(got, want):
  """Largest max|got - want| / max|want| over the leaves (output, or loss and gradients)."""
  errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-30))
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  return float(f"{max(errs):.2e}")


def inputs(B, N, h, hd, n, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  q, k, v = (jax.random.normal(ks[i], (B, N, h, hd), dtype) for i in range(3))
  m = jax.random.normal(ks[3], (B, n, h, hd), dtype)
  b1 = 0.02 * jax.random.normal(ks[4], (h, n, N), jnp.float32)
  b2 = 0.02 * jax.random.normal(ks[5], (h, N, n), jnp.float32)
  w = jax.random.normal(ks[6], (B, N, h, hd), jnp.float32)
  return w, q, k, v, m, b1, b2


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
  ap.add_argument("--out", default="benchmarks/results/mediator_kernel.json")
  args = ap.parse_args(argv)
  if args.quick:
    args.tokens, args.batch, args.heads, args.repeats = "256,1024", 1, 2, 3
  backend = jax.default_backend()
  interpret = backend == "cpu"
  if not pallas_available(backend):
    print(f"note: no Pallas lowering on {backend!r}; the 'pallas' rows time the XLA fallback")
  kind, peak_flops, peak_bw = device_peaks()
  dtype = jnp.bfloat16
  rows = []
  for N in map(int, args.tokens.split(",")):
    for hd in map(int, args.head_dims.split(",")):
      for n in map(int, args.mediators.split(",")):
        data = inputs(args.batch, N, args.heads, hd, n, dtype)
        for mode in args.modes.split(","):
          for impl in args.impls.split(","):
            if impl == "full" and n != int(args.mediators.split(",")[0]):
              continue   # full attention does not depend on n: time it once per (N, hd)
            row = {"impl": impl, "mode": mode, "B": args.batch, "N": N, "h": args.heads,
                   "hd": hd, "n": "-" if impl == "full" else n}
            note = "interpret, not a timing" if (impl == "pallas" and interpret) else ""
            if backend == "cpu" and not note:
              note = "cpu"
            try:
              fn = make_fn(impl, mode, interpret)
              t = time_fn(fn, *data, warmup=1, repeats=args.repeats)["median_s"]
              if impl == "pallas":   # correctness on this device: max rel. error vs the reference
                got, want = fn(*data), make_fn("xla", mode, interpret)(*data)
                if mode == "fwdbwd":   # gradients only (the scalar loss is a cancelling sum)
                  got, want = got[1], want[1]
                row["err"] = max_rel_err(got, want)
            except Exception as e:  # noqa: BLE001 - record OOM / unsupported shapes and go on
              row.update(ms="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
              rows.append(row)
              continue
            flops, nbytes = counts(impl, mode, args.batch, N, args.heads, hd, n, dtype)
            row.update(ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 3),
                       gbs=round(nbytes / t / 1e9, 1), note=note,
                       flops=flops, floor_bytes=nbytes)
            if peak_flops:
              floor_t = max(flops / peak_flops, nbytes / peak_bw)
              row.update(roofline=round(floor_t / t, 3), floor_ms=round(floor_t * 1e3, 4),
                         bound="compute" if flops / peak_flops > nbytes / peak_bw else "memory")
            rows.append(row)
            print(row, flush=True)
  print(f"\ndevice kind: {kind!r}; peaks: "
        + (f"{peak_flops / 1e12:.0f} TFLOP/s, {peak_bw / 1e12:.2f} TB/s" if peak_flops
           else "unknown (no roofline column)"))
  table = print_table(rows, ["impl", "mode", "B", "N", "h", "hd", "n", "ms", "tflops", "gbs",
                             "roofline", "bound", "err", "note"])
  write_json(args.out, {"args": vars(args), "device_kind": kind, "peak_flops": peak_flops,
                        "peak_bytes_per_s": peak_bw, "rows": rows, "table": table})


if __name__ == "__main__":
  main()
