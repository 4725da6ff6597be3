"""Fused Pallas kernels for the mediator-attention core, forward and backward.

Computes exactly what `mediator_attention_reference` computes (same layouts, same dtypes):

  q, k, v : (B, N, h, hd)   m : (B, n, h, hd)   bias1 : (h, n, N)   bias2 : (h, N, n)
  stage 1: A1 = softmax_N(scale * m k^T + bias1),  V_M = A1 v        (per batch, head)
  stage 2: A2 = softmax_n(scale * q m^T + bias2),  O   = A2 V_M      -> (B, N, h, hd)

without ever writing the (n, N) or (N, n) probability matrices to memory. Four `pallas_call`s:

  fwd1  grid (h, N / block_k_major, B / block_b): each program runs a flash-style online softmax of
        all n mediators over its key chunk (inner loop over `block_k` keys) and writes partial
        (row max, row sum, unnormalised V_M) statistics; XLA merges the chunks (an (n, hd) array per
        chunk) into V_M and the row log-sum-exp lse1.
  fwd2  grid (h, N / block_q, B / block_b): every query block attends over all n mediators at once
        (one block, so the softmax needs no online rescaling).
  bwd2  stage-2 backward per query block: recomputes A2 exactly (all mediators are in the block, so
        no statistics are needed), writes dq, and per-block partials of dV_M and dm (summed by XLA).
  bwd1  stage-1 backward per key block: recomputes A1 from lse1, writes dk, dv and dm partials.
  Bias gradients are summed over the batch inside the kernels: the batch is the innermost grid
  axis (TPU: sequential, the bias-gradient block stays resident and accumulates) and an in-kernel
  loop over `block_b` batch elements (GPU: one partial per batch group, summed by XLA). The bias tile is read
  once per program and reused for every batch element of the program.

Lowerings (`backend`): "gpu" = Pallas Triton (NVIDIA, sm80+), "tpu" = Mosaic TPU, "cpu" =
interpret mode only. `interpret=True` runs any backend's plan on CPU. Padding: the mediator count n
is padded (zero mediators, bias2 = -inf so they get zero weight; bias1 = 0 so their stage-1 softmax
stays finite), the token count N to a multiple of the blocks (bias1 = -inf for padded keys), and on
GPU the head dim to a power of two (zeros). Everything is sliced off again.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from edit_jax.kernels.reference import mediator_attention_reference

_F32 = jnp.float32
_NEG_INF = float("-inf")
_BACKENDS = ("cpu", "gpu", "tpu")


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the four kernels (token counts must be powers of two >= 8).

  block_q:        query tokens per program, stage-2 forward.
  block_k:        keys per inner online-softmax step, stage-1 forward.
  block_k_major:  keys per program, stage-1 forward (a multiple of block_k); the partial softmax
                  statistics of the chunks are merged by XLA.
  block_q_bwd:    query tokens per program, stage-2 backward.
  block_k_bwd:    keys per program, stage-1 backward.
  block_b:        batch elements per program (in-kernel loop), forward; None = the whole batch.
  block_b_bwd:    the same for the backward; the bias gradient is accumulated over them in-kernel.
  num_warps, num_stages: Triton launch parameters (GPU only).
  Blocks larger than the (padded) token count are clipped; block_b is clipped to a divisor of B.
  """
  block_q: int = 128
  block_k: int = 128
  block_k_major: int = 512
  block_q_bwd: int = 128
  block_k_bwd: int = 128
  block_b: int | None = 1
  block_b_bwd: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_k_major", "block_q_bwd", "block_k_bwd"):
      val = getattr(self, name)
      if not isinstance(val, int) or val < 8 or not _is_pow2(val):
        raise ValueError(f"BlockSizes.{name}={val!r}: must be a power of two >= 8 "
                         "(e.g. 128 or 512)")
    if self.block_k_major < self.block_k:
      raise ValueError(f"BlockSizes.block_k_major={self.block_k_major} must be >= block_k="
                       f"{self.block_k} (it is split into block_k steps)")
    for name in ("block_b", "block_b_bwd"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, int) or val < 1):
        raise ValueError(f"BlockSizes.{name}={val!r}: must be a positive int or None "
                         "(None = the whole batch)")
    for name in ("num_warps", "num_stages"):
      val = getattr(self, name)
      if not isinstance(val, int) or val < 1:
        raise ValueError(f"BlockSizes.{name}={val!r}: must be a positive int")

  @classmethod
  def get_default(cls, backend: str) -> "BlockSizes":
    """Defaults per backend: "gpu" (H100-sized Triton tiles), "tpu" (Mosaic), "cpu" (interpret).

    These are starting points chosen from the tile shapes, not tuned on hardware yet.
    """
    backend = _normalize_backend(backend)
    if backend == "gpu":
      return cls(block_q=128, block_k=64, block_k_major=512, block_q_bwd=128, block_k_bwd=128,
                 block_b=1, block_b_bwd=4, num_warps=4, num_stages=2)
    if backend == "tpu":
      return cls(block_q=512, block_k=512, block_k_major=2048, block_q_bwd=512, block_k_bwd=512,
                 block_b=1, block_b_bwd=1)
    # Interpret mode: few, large grid steps are what makes it fast.
    return cls(block_q=512, block_k=512, block_k_major=2048, block_q_bwd=512, block_k_bwd=512,
               block_b=None, block_b_bwd=None)


def block_size_candidates(backend: str) -> tuple[BlockSizes, ...]:
  """A handful of BlockSizes for a time-boxed autotuning sweep on `backend`, the default first.

  GPU (Triton): varies the query/key tiles (64-256), the stage-1 key chunk, the batch group of
  the backward's bias-gradient reduction, and num_warps / num_stages. TPU: tile sizes only. CPU:
  the interpret-mode default and one small-tile plan (exercises the sweep in dry runs).
  """
  backend = _normalize_backend(backend)
  default = BlockSizes.get_default(backend)
  if backend == "gpu":
    return (default,
            BlockSizes(block_q=64, block_k=64, block_k_major=1024, block_q_bwd=64, block_k_bwd=64,
                       block_b=1, block_b_bwd=4, num_warps=4, num_stages=3),
            BlockSizes(block_q=128, block_k=128, block_k_major=1024, block_q_bwd=128,
                       block_k_bwd=128, block_b=1, block_b_bwd=8, num_warps=8, num_stages=2),
            BlockSizes(block_q=256, block_k=64, block_k_major=2048, block_q_bwd=128,
                       block_k_bwd=64, block_b=1, block_b_bwd=2, num_warps=8, num_stages=3),
            BlockSizes(block_q=128, block_k=32, block_k_major=256, block_q_bwd=64,
                       block_k_bwd=128, block_b=2, block_b_bwd=1, num_warps=4, num_stages=4))
  if backend == "tpu":
    return (default,
            BlockSizes(block_q=256, block_k=256, block_k_major=1024, block_q_bwd=256,
                       block_k_bwd=256, block_b=1, block_b_bwd=1),
            BlockSizes(block_q=1024, block_k=512, block_k_major=4096, block_q_bwd=1024,
                       block_k_bwd=1024, block_b=1, block_b_bwd=1))
  return (default, BlockSizes(block_q=64, block_k=32, block_k_major=128, block_q_bwd=64,
                              block_k_bwd=64, block_b=2, block_b_bwd=2))


def _normalize_backend(backend: str) -> str:
  name = str(backend).lower()
  if name == "cuda":
    name = "gpu"
  if name not in _BACKENDS:
    raise ValueError(f"unknown Pallas backend {backend!r}: expected one of 'gpu' (Triton), "
                     "'tpu' (Mosaic) or 'cpu' (interpret mode)")
  return name


def _current_platform() -> str:
  """The platform of the default device ('cpu', 'gpu', 'tpu', or something else)."""
  return jax.default_backend()


def _gpu_is_supported() -> bool:
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return False
  if not devices:
    return False
  version = str(getattr(devices[0].client, "platform_version", "")).lower()
  if "rocm" in version or "hip" in version:
    return False
  try:
    from jax.experimental.pallas import triton as _plgpu  # noqa: F401, PLC0415
  except ImportError:
    return False
  for dev in devices:
    cc = getattr(dev, "compute_capability", None)
    try:
      major = int(str(cc).split(".")[0])
    except ValueError:
      return False
    if major < 8:  # bf16 tensor-core dots need Ampere or newer
      return False
  return True


def pallas_available(backend: str | None = None) -> bool:
  """True when the kernel can run on `backend` in this process.

  "cpu": always (interpret mode). "tpu": TPU devices present and Mosaic importable. "gpu"/"cuda":
  NVIDIA GPUs of compute capability >= 8.0 present and the Pallas Triton lowering importable.
  Anything else (ROCm, METAL, a backend with no devices here) is False. None = the default backend.
  """
  name = str(_current_platform() if backend is None else backend).lower()
  if name == "cuda":
    name = "gpu"
  if name == "cpu":
    return True
  if name == "gpu":
    return _gpu_is_supported()
  if name == "tpu":
    try:
      from jax.experimental.pallas import tpu as _pltpu  # noqa: F401, PLC0415
      return bool(jax.devices("tpu"))
    except (ImportError, RuntimeError):
      return False
  return False


# --------------------------------------------------------------------------------------------
# Static configuration of one call.


@dataclasses.dataclass(frozen=True)
class _Cfg:
  backend: str          # "cpu" | "gpu" | "tpu": which plan (padding, layout, compiler params)
  interpret: object     # False, True, or a pltpu.InterpretParams
  scale: float
  B: int
  h: int
  N_p: int              # padded token count
  n_p: int              # padded mediator count
  hd_p: int             # padded head dim
  layout: str           # "bnhd" (native) or "bhnd" (transposed, TPU) for q, k, v, o
  block_q: int
  block_k: int
  block_k_major: int
  block_q_bwd: int
  block_k_bwd: int
  block_b: int
  block_b_bwd: int
  accumulate_over_grid: bool   # bias grads accumulate across the (sequential) batch grid axis
  num_warps: int
  num_stages: int


def _largest_divisor_leq(n: int, cap: int) -> int:
  for d in range(min(n, cap), 0, -1):
    if n % d == 0:
      return d
  return 1


def _make_cfg(backend, interpret, scale, shapes, bs: BlockSizes) -> _Cfg:
  B, N, h, hd, n = shapes
  if backend == "gpu":   # Triton: every loaded tile needs power-of-two sizes, dots need >= 16
    n_p = max(16, _next_pow2(n))
    hd_p = max(16, _next_pow2(hd))
    align, layout, accumulate = 16, "bnhd", False
  elif backend == "tpu":  # Mosaic: full-dim blocks are legal for n and hd; bf16 packs 16 sublanes
    n_p = _round_up(n, 16)
    hd_p = hd
    align, layout, accumulate = 16, "bhnd", True
  else:                   # interpret mode on CPU
    n_p = _round_up(n, 8)
    hd_p = hd
    align, layout, accumulate = 8, "bnhd", False
  cap = max(align, _next_pow2(_round_up(N, align)))

  def clip(x):
    return max(align, min(x, cap))

  bq, bk, bqb, bkb = clip(bs.block_q), clip(bs.block_k), clip(bs.block_q_bwd), clip(bs.block_k_bwd)
  N_p = _round_up(N, max(bq, bk, bqb, bkb))
  # The largest power-of-two multiple of block_k that divides N_p and is <= block_k_major.
  bkm = bk
  while bkm * 2 <= bs.block_k_major and N_p % (bkm * 2) == 0:
    bkm *= 2
  bb = _largest_divisor_leq(B, B if bs.block_b is None else bs.block_b)
  bbb = _largest_divisor_leq(B, B if bs.block_b_bwd is None else bs.block_b_bwd)
  return _Cfg(backend=backend, interpret=interpret, scale=float(scale), B=B, h=h, N_p=N_p,
              n_p=n_p, hd_p=hd_p, layout=layout, block_q=bq, block_k=bk, block_k_major=bkm,
              block_q_bwd=bqb, block_k_bwd=bkb, block_b=bb, block_b_bwd=bbb,
              accumulate_over_grid=accumulate, num_warps=bs.num_warps, num_stages=bs.num_stages)


def _compiler_params(cfg: _Cfg, semantics):
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
    return pltpu.CompilerParams(dimension_semantics=semantics)
  return None


# --------------------------------------------------------------------------------------------
# Kernel bodies. Refs carry a leading batch-block dim; every tile below is 2-D.


def _dot(a, b, ca, cb):
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=_F32)


def _mm(a, b):       # a @ b
  return _dot(a, b, 1, 0)


def _mm_nt(a, b):    # a @ b.T
  return _dot(a, b, 1, 1)


def _mm_tn(a, b):    # a.T @ b
  return _dot(a, b, 0, 0)


def _batch_loop(block_b, body, init):
  if block_b == 1:
    return body(0, init)
  return lax.fori_loop(0, block_b, body, init)


def _store_bias_grad(db_ref, db, accumulate):
  if not accumulate:
    db_ref[...] = db
    return
  first = pl.program_id(2) == 0

  @pl.when(first)
  def _():
    db_ref[...] = db

  @pl.when(jnp.logical_not(first))
  def _():
    db_ref[...] += db


def _fwd1_kernel(m_ref, k_ref, v_ref, b1_ref, acc_ref, mx_ref, l_ref, *, scale, block_b,
                 block_k, n_sub):
  """m (bb,n_p,hd); k, v (bb,bkm,hd); bias1 (n_p,bkm) -> acc (bb,n_p,hd), max, sum (bb,n_p,1)."""
  n_p, hd = m_ref.shape[1], m_ref.shape[2]

  def per_batch(b, carry):
    med = m_ref[b]

    def step(t, c):
      mx, l, acc = c
      start = pl.multiple_of(t * block_k, block_k)
      kt = k_ref[b, pl.ds(start, block_k), :]
      vt = v_ref[b, pl.ds(start, block_k), :]
      s = _mm_nt(med, kt) * scale + b1_ref[:, pl.ds(start, block_k)].astype(_F32)
      mx_new = jnp.maximum(mx, jnp.max(s, axis=1, keepdims=True))
      # A chunk of padded keys only: max = -inf; keep exp() away from (-inf) - (-inf).
      safe = jnp.where(mx_new == _NEG_INF, 0.0, mx_new)
      p = jnp.exp(s - safe)
      alpha = jnp.exp(mx - safe)
      l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
      acc = alpha * acc + _mm(p.astype(vt.dtype), vt)
      return mx_new, l, acc

    init = (jnp.full((n_p, 1), _NEG_INF, _F32), jnp.zeros((n_p, 1), _F32),
            jnp.zeros((n_p, hd), _F32))
    mx, l, acc = step(0, init) if n_sub == 1 else lax.fori_loop(0, n_sub, step, init)
    acc_ref[b] = acc
    mx_ref[b] = mx
    l_ref[b] = l
    return carry

  _batch_loop(block_b, per_batch, 0)


def _fwd2_kernel(q_ref, m_ref, vm_ref, b2_ref, o_ref, *, scale, block_b):
  """q (bb,bq,hd); m, V_M (bb,n_p,hd); bias2 (bq,n_p) -> o (bb,bq,hd)."""
  b2 = b2_ref[...].astype(_F32)

  def per_batch(b, carry):
    s = _mm_nt(q_ref[b], m_ref[b]) * scale + b2
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    vm = vm_ref[b]
    o = _mm(p.astype(vm.dtype), vm) / jnp.sum(p, axis=1, keepdims=True)
    o_ref[b] = o.astype(o_ref.dtype)
    return carry

  _batch_loop(block_b, per_batch, 0)


def _bwd2_kernel(q_ref, m_ref, vm_ref, b2_ref, do_ref, dq_ref, dvm_ref, dm_ref, db_ref, *,
                 scale, block_b, accumulate):
  """Stage-2 backward for one query block; dV_M and dm are per-block partials (f32)."""
  b2 = b2_ref[...].astype(_F32)

  def per_batch(b, db):
    q = q_ref[b]
    med = m_ref[b]
    do = do_ref[b]
    s = _mm_nt(q, med) * scale + b2
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    dp = _mm_nt(do, vm_ref[b])
    ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
    dsc = ds.astype(q.dtype)
    dq_ref[b] = (_mm(dsc, med) * scale).astype(dq_ref.dtype)
    dvm_ref[b] = _mm_tn(p.astype(do.dtype), do)
    dm_ref[b] = _mm_tn(dsc, q) * scale
    return db + ds

  db = _batch_loop(block_b, per_batch, jnp.zeros(b2.shape, _F32))
  _store_bias_grad(db_ref, db, accumulate)


def _bwd1_kernel(m_ref, k_ref, v_ref, b1_ref, lse_ref, dvm_ref, dd_ref, dk_ref, dv_ref, dm_ref,
                 db_ref, *, scale, block_b, accumulate):
  """Stage-1 backward for one key block; dm is a per-block partial (f32)."""
  b1 = b1_ref[...].astype(_F32)

  def per_batch(b, db):
    med = m_ref[b]
    k = k_ref[b]
    dvm = dvm_ref[b]
    s = _mm_nt(med, k) * scale + b1
    p = jnp.exp(s - lse_ref[b])                    # exact A1 (padded keys: exp(-inf) = 0)
    dv_ref[b] = _mm_tn(p.astype(dvm.dtype), dvm).astype(dv_ref.dtype)
    dp = _mm_nt(dvm, v_ref[b])
    ds = p * (dp - dd_ref[b])
    dsc = ds.astype(k.dtype)
    dk_ref[b] = (_mm_tn(dsc, med) * scale).astype(dk_ref.dtype)
    dm_ref[b] = _mm(dsc, k) * scale
    return db + ds

  db = _batch_loop(block_b, per_batch, jnp.zeros(b1.shape, _F32))
  _store_bias_grad(db_ref, db, accumulate)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid = (head, token block, batch block); the batch is innermost so the
# bias tile of a (head, token block) is fetched once and stays put while the batch runs over it.


def _tok_spec(cfg: _Cfg, bb: int, bt: int):
  """BlockSpec of a (B, N_p, h, hd_p) [bnhd] or (B, h, N_p, hd_p) [bhnd] tensor."""
  if cfg.layout == "bnhd":
    return pl.BlockSpec((bb, bt, None, cfg.hd_p), lambda hh, i, g: (g, i, hh, 0))
  return pl.BlockSpec((bb, None, bt, cfg.hd_p), lambda hh, i, g: (g, hh, i, 0))


def _tok_shape(cfg: _Cfg, dtype):
  if cfg.layout == "bnhd":
    return jax.ShapeDtypeStruct((cfg.B, cfg.N_p, cfg.h, cfg.hd_p), dtype)
  return jax.ShapeDtypeStruct((cfg.B, cfg.h, cfg.N_p, cfg.hd_p), dtype)


def _med_spec(cfg: _Cfg, bb: int, last: int):
  """BlockSpec of a per-(batch, head) mediator array (B, h, n_p, last)."""
  return pl.BlockSpec((bb, None, cfg.n_p, last), lambda hh, i, g: (g, hh, 0, 0))


def _part_spec(cfg: _Cfg, bb: int, last: int):
  """BlockSpec of a per-(batch, head, token block) partial (B, h, blocks, n_p, last)."""
  return pl.BlockSpec((bb, None, None, cfg.n_p, last), lambda hh, i, g: (g, hh, i, 0, 0))


def _bias_grad_group(cfg: _Cfg, g):
  return 0 if cfg.accumulate_over_grid else g


def _gpu_order(spec):
  # Triton launches program_id(0) fastest: reverse the grid so that the batch block varies
  # fastest and the programs sharing one bias tile run together (L2 reuse).
  fn = spec.index_map
  return dataclasses.replace(spec, index_map=lambda g, i, hh: fn(hh, i, g))


def _call(cfg: _Cfg, kernel, *, grid, in_specs, out_specs, out_shape, semantics, cost, name):
  """pallas_call with the canonical grid (head, token block, batch block)."""
  if cfg.backend == "gpu":
    grid = grid[::-1]
    in_specs = [_gpu_order(sp) for sp in in_specs]
    out_specs = ([_gpu_order(sp) for sp in out_specs] if isinstance(out_specs, list)
                 else _gpu_order(out_specs))
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=cfg.interpret, compiler_params=_compiler_params(cfg, semantics),
      cost_estimate=cost, name=name)


def _cost(flops, transcendentals, arrays):
  nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(nbytes))


def _forward(cfg: _Cfg, q, k, v, m, b1, b2):
  """Padded kernel-layout inputs -> (o, V_M f32, lse1 (B,h,n_p,1) f32)."""
  B, h, N_p, n_p, hd = cfg.B, cfg.h, cfg.N_p, cfg.n_p, cfg.hd_p
  bb, bkm, bq = cfg.block_b, cfg.block_k_major, cfg.block_q
  nkm = N_p // bkm
  par3 = ("parallel", "parallel", "parallel")
  stat = jax.ShapeDtypeStruct((B, h, nkm, n_p, 1), _F32)
  acc, mx, l = _call(
      cfg, functools.partial(_fwd1_kernel, scale=cfg.scale, block_b=bb, block_k=cfg.block_k,
                             n_sub=bkm // cfg.block_k),
      grid=(h, nkm, B // bb),
      in_specs=[_med_spec(cfg, bb, hd), _tok_spec(cfg, bb, bkm), _tok_spec(cfg, bb, bkm),
                pl.BlockSpec((None, n_p, bkm), lambda hh, i, g: (hh, 0, i))],
      out_specs=[_part_spec(cfg, bb, hd), _part_spec(cfg, bb, 1), _part_spec(cfg, bb, 1)],
      out_shape=[jax.ShapeDtypeStruct((B, h, nkm, n_p, hd), _F32), stat, stat],
      semantics=par3, name="mediator_fwd_stage1",
      cost=_cost(4 * B * h * n_p * N_p * hd, B * h * n_p * N_p, [m, k, v, b1]))(m, k, v, b1)
  # Merge the key chunks (log-sum-exp of partial softmaxes); (B, h, chunks, n_p, .) is small.
  gmax = jnp.max(mx, axis=2, keepdims=True)
  w = jnp.exp(mx - gmax)
  lsum = jnp.sum(w * l, axis=2)
  vm = jnp.sum(w * acc, axis=2) / lsum                  # (B, h, n_p, hd) f32
  lse1 = gmax[:, :, 0] + jnp.log(lsum)                  # (B, h, n_p, 1)
  o = _call(
      cfg, functools.partial(_fwd2_kernel, scale=cfg.scale, block_b=bb),
      grid=(h, N_p // bq, B // bb),
      in_specs=[_tok_spec(cfg, bb, bq), _med_spec(cfg, bb, hd), _med_spec(cfg, bb, hd),
                pl.BlockSpec((None, bq, n_p), lambda hh, i, g: (hh, i, 0))],
      out_specs=_tok_spec(cfg, bb, bq),
      out_shape=_tok_shape(cfg, q.dtype), semantics=par3, name="mediator_fwd_stage2",
      cost=_cost(4 * B * h * n_p * N_p * hd, B * h * n_p * N_p, [q, q, b2]),
  )(q, m, vm.astype(q.dtype), b2)
  return o, vm, lse1


def _backward(cfg: _Cfg, res, do):
  q, k, v, m, b1, b2, vm, lse1 = res
  B, h, N_p, n_p, hd = cfg.B, cfg.h, cfg.N_p, cfg.n_p, cfg.hd_p
  bb, bq, bk = cfg.block_b_bwd, cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk, ng = N_p // bq, N_p // bk, B // bb
  n_groups = 1 if cfg.accumulate_over_grid else ng
  sem = ("parallel", "parallel", "arbitrary" if cfg.accumulate_over_grid else "parallel")
  acc = cfg.accumulate_over_grid
  dq, dvm_p, dm2_p, db2 = _call(
      cfg, functools.partial(_bwd2_kernel, scale=cfg.scale, block_b=bb, accumulate=acc),
      grid=(h, nq, ng),
      in_specs=[_tok_spec(cfg, bb, bq), _med_spec(cfg, bb, hd), _med_spec(cfg, bb, hd),
                pl.BlockSpec((None, bq, n_p), lambda hh, i, g: (hh, i, 0)),
                _tok_spec(cfg, bb, bq)],
      out_specs=[_tok_spec(cfg, bb, bq), _part_spec(cfg, bb, hd), _part_spec(cfg, bb, hd),
                 pl.BlockSpec((None, None, bq, n_p),
                              lambda hh, i, g: (_bias_grad_group(cfg, g), hh, i, 0))],
      out_shape=[_tok_shape(cfg, q.dtype),
                 jax.ShapeDtypeStruct((B, h, nq, n_p, hd), _F32),
                 jax.ShapeDtypeStruct((B, h, nq, n_p, hd), _F32),
                 jax.ShapeDtypeStruct((n_groups, h, N_p, n_p), _F32)],
      semantics=sem, name="mediator_bwd_stage2",
      cost=_cost(8 * B * h * n_p * N_p * hd, B * h * n_p * N_p, [q, q, q, b2]),
  )(q, m, vm.astype(q.dtype), b2, do)
  dvm = jnp.sum(dvm_p, axis=2)                                    # (B, h, n_p, hd) f32
  dd = jnp.sum(dvm * vm, axis=-1, keepdims=True)                  # rowsum(dP1 * A1)
  dk, dv, dm1_p, db1 = _call(
      cfg, functools.partial(_bwd1_kernel, scale=cfg.scale, block_b=bb, accumulate=acc),
      grid=(h, nk, ng),
      in_specs=[_med_spec(cfg, bb, hd), _tok_spec(cfg, bb, bk), _tok_spec(cfg, bb, bk),
                pl.BlockSpec((None, n_p, bk), lambda hh, i, g: (hh, 0, i)),
                _med_spec(cfg, bb, 1), _med_spec(cfg, bb, hd), _med_spec(cfg, bb, 1)],
      out_specs=[_tok_spec(cfg, bb, bk), _tok_spec(cfg, bb, bk), _part_spec(cfg, bb, hd),
                 pl.BlockSpec((None, None, n_p, bk),
                              lambda hh, i, g: (_bias_grad_group(cfg, g), hh, 0, i))],
      out_shape=[_tok_shape(cfg, k.dtype), _tok_shape(cfg, v.dtype),
                 jax.ShapeDtypeStruct((B, h, nk, n_p, hd), _F32),
                 jax.ShapeDtypeStruct((n_groups, h, n_p, N_p), _F32)],
      semantics=sem, name="mediator_bwd_stage1",
      cost=_cost(8 * B * h * n_p * N_p * hd, B * h * n_p * N_p, [k, k, k, k, b1]),
  )(m, k, v, b1, lse1, dvm.astype(q.dtype), dd)
  dm = jnp.sum(dm2_p, axis=2) + jnp.sum(dm1_p, axis=2)
  return (dq, dk, dv, dm.astype(m.dtype), jnp.sum(db1, axis=0).astype(b1.dtype),
          jnp.sum(db2, axis=0).astype(b2.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, m, b1, b2):
  return _forward(cfg, q, k, v, m, b1, b2)[0]


def _core_fwd(cfg, q, k, v, m, b1, b2):
  o, vm, lse1 = _forward(cfg, q, k, v, m, b1, b2)
  return o, (q, k, v, m, b1, b2, vm, lse1)


_core.defvjp(_core_fwd, _backward)


# --------------------------------------------------------------------------------------------
# Public API.


def _check_inputs(q, k, v, m, bias1, bias2):
  for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("m", m, 4), ("bias1", bias1, 3),
                        ("bias2", bias2, 3)):
    if getattr(x, "ndim", None) != rank:
      raise ValueError(f"mediator_attention_pallas: {name} must have rank {rank}, got shape "
                       f"{getattr(x, 'shape', None)}; layouts are q,k,v (B,N,h,hd), m (B,n,h,hd), "
                       "bias1 (h,n,N), bias2 (h,N,n)")
  B, N, h, hd = q.shape
  n = m.shape[1]
  expected = {"k": (B, N, h, hd), "v": (B, N, h, hd), "m": (B, n, h, hd), "bias1": (h, n, N),
              "bias2": (h, N, n)}
  for name, x in (("k", k), ("v", v), ("m", m), ("bias1", bias1), ("bias2", bias2)):
    if tuple(x.shape) != expected[name]:
      raise ValueError(f"mediator_attention_pallas: {name} has shape {tuple(x.shape)}, expected "
                       f"{expected[name]} from q {tuple(q.shape)} (B,N,h,hd) and m "
                       f"{tuple(m.shape)} (B,n,h,hd)")
  for name, x in (("k", k), ("v", v), ("m", m)):
    if x.dtype != q.dtype:
      raise ValueError(f"mediator_attention_pallas: {name}.dtype={x.dtype} differs from "
                       f"q.dtype={q.dtype}; cast q, k, v, m to one dtype")
  for name, x in (("q", q), ("bias1", bias1), ("bias2", bias2)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"mediator_attention_pallas: {name} must be floating point, got {x.dtype}")


def mediator_attention_pallas(q, k, v, m, bias1, bias2, *, scale: float | None = None,
                              block_sizes: BlockSizes | None = None, interpret=None,
                              backend: str | None = None):
  """Fused mediator-attention core; same layouts, dtypes and result as the reference.

  q, k, v: (B, N, h, hd); m: (B, n, h, hd); bias1: (h, n, N); bias2: (h, N, n) -> (B, N, h, hd)
  in q.dtype. Differentiable (custom VJP) w.r.t. all six inputs; bias gradients are summed over B.

  scale:       logit scale (a Python number, static), default hd ** -0.5.
  block_sizes: `BlockSizes`; default `BlockSizes.get_default(backend)`.
  interpret:   run the Pallas interpreter (True, or a `pltpu.InterpretParams`). None = True on the
               CPU backend (required there), False elsewhere.
  backend:     which kernel plan to build: "gpu" (Triton), "tpu" (Mosaic) or "cpu"; None = the
               default JAX backend. A plan other than the current backend's only runs with
               interpret=True (for testing the GPU/TPU code paths on CPU).
  If the current backend has no Pallas lowering (e.g. a ROCm or pre-Ampere GPU) this emits a
  one-line warning and returns `mediator_attention_reference(...)`.
  """
  _check_inputs(q, k, v, m, bias1, bias2)
  platform = _current_platform()
  if interpret is None:
    interpret = platform == "cpu"
  if not interpret:
    if platform == "cpu":
      raise ValueError("mediator_attention_pallas: Pallas kernels only run in interpret mode on "
                       "the CPU backend; pass interpret=True (or leave interpret=None)")
    if not pallas_available(platform):
      warnings.warn(f"mediator_attention_pallas: no Pallas lowering for backend {platform!r}; "
                    "falling back to the XLA reference (mediator_attention_reference)",
                    stacklevel=2)
      return mediator_attention_reference(q, k, v, m, bias1, bias2, scale=scale)
  plan = _normalize_backend(platform if backend is None else backend)
  if not interpret and plan != _normalize_backend(platform):
    raise ValueError(f"mediator_attention_pallas: backend={backend!r} kernels cannot be compiled "
                     f"on the {platform!r} backend; pass interpret=True to interpret them")
  return _pallas_forward(q, k, v, m, bias1, bias2, scale=scale, block_sizes=block_sizes,
                         interpret=interpret, plan=plan)


def _pallas_forward(q, k, v, m, bias1, bias2, *, scale, block_sizes, interpret, plan):
  """The kernel path without platform checks (also used to lower GPU/TPU plans on CPU)."""
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(plan)
  elif not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  B, N, h, hd = q.shape
  n = m.shape[1]
  if scale is None:
    scale = hd ** -0.5
  cfg = _make_cfg(plan, interpret, scale, (B, N, h, hd, n), block_sizes)
  pad_n, pad_tok, pad_hd = cfg.n_p - n, cfg.N_p - N, cfg.hd_p - hd

  def tok(x):
    x = jnp.pad(x, ((0, 0), (0, pad_tok), (0, 0), (0, pad_hd)))
    return x if cfg.layout == "bnhd" else x.transpose(0, 2, 1, 3)

  mp = jnp.pad(m, ((0, 0), (0, pad_n), (0, 0), (0, pad_hd))).transpose(0, 2, 1, 3)
  # Padded keys: -inf in bias1 (zero stage-1 weight). Padded mediators: 0 in bias1 (finite
  # softmax over real keys, never read) and -inf in bias2 (zero stage-2 weight).
  b1 = jnp.pad(bias1, ((0, 0), (0, 0), (0, pad_tok)), constant_values=_NEG_INF)
  b1 = jnp.pad(b1, ((0, 0), (0, pad_n), (0, 0)))
  b2 = jnp.pad(bias2, ((0, 0), (0, 0), (0, pad_n)), constant_values=_NEG_INF)
  b2 = jnp.pad(b2, ((0, 0), (0, pad_tok), (0, 0)))
  o = _core(cfg, tok(q), tok(k), tok(v), mp, b1, b2)
  if cfg.layout == "bhnd":
    o = o.transpose(0, 2, 1, 3)
  return o[:, :N, :, :hd]
