"""Attention layers of SiT: full attention and mediator attention (the jnp/lax reference).

Both take tokens `x` of shape (B, N, D) in row-major grid order (token = row * g + col, the
PyTorch `flatten(2)` order of the official code) and return (B, N, D).

Mediator attention follows LeapLabTHU/Attention-Mediators `AttentionWithMediators` exactly
(spec/sit_mediators.md section 3):
  mediators M = adaptive-average-pooled queries (sqrt(n) x sqrt(n) windows, overlapping windows when
  the grid g is not divisible by sqrt(n)); stage 1 A1 = softmax(scale M K^T + bias1), V_M = A1 V;
  stage 2 A2 = softmax(scale Q M^T + bias2), O = A2 V_M; out = proj(O + dwc(V)).
The position biases are 7x7 tables bilinearly resized to g x g (align_corners=False, no antialias)
plus axis-separable terms. They depend only on parameters: `MediatorAttention.biases()` computes
them, and a sampler can compute them once per run into the "mediator_cache" collection
(see `edit_jax.models.precompute_mediator_biases`).

Parameter names and shapes follow the official module (torch layout noted where it differs):
  qkv/kernel (D, 3D) [q | k | v], channel = head * hd + d;  proj/kernel (D, D)
  an_bias, na_bias (h, n, 7, 7); ah_bias (1, h, n, g, 1); aw_bias (1, h, n, 1, g)
  ha_bias (1, h, g, 1, n); wa_bias (1, h, 1, g, n)
  dwc/kernel (3, 3, 1, D) (torch (D, 1, 3, 3)), dwc/bias (D,)

Elastic mediators (edit_jax extension, `elastic_grid = R > 0`): the six bias tables hold a fixed
R x R reference grid of mediator positions instead of the n axis, so one parameter set runs at any
mediator count n (a perfect square); `tables()` resizes the R x R axes to sqrt(n) x sqrt(n) with the
same bilinear resize (align_corners=False, no antialias) the official code applies to the token
tables (identity when sqrt(n) = R). Shapes:
  an_bias, na_bias (h, R, R, 7, 7); ah_bias (1, h, R, R, g, 1); aw_bias (1, h, R, R, 1, g)
  ha_bias (1, h, g, 1, R, R); wa_bias (1, h, 1, g, R, R)
Mediator index m = row * sqrt(n) + col of the pooled query grid (the official row-major order).
qkv, proj and dwc do not depend on n. `elastic_grid = 0` is the official layer.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.kernels.mediator_attention import mediator_attention
from edit_jax.models import attention_core

Dtype = Any
CACHE = "mediator_cache"
ATTENTION_MAPS = "attention_maps"  # sow collection: effective (B, h, N, N) attention per layer


def maybe_sow_attention(module: nn.Module, probs_fn):
  """Sows the layer's effective attention matrix (B, h, N_query, N_key) into the
  "attention_maps" collection, only when the caller made that collection mutable (analysis)."""
  if module.is_mutable_collection(ATTENTION_MAPS):
    module.sow(ATTENTION_MAPS, "probs", probs_fn())


def xavier_uniform():
  return nn.initializers.xavier_uniform()


class TokenDense(nn.Dense):
  """`nn.Dense` applied to x (..., D_in) as one (prod(...), D_in) matrix: same params, same values.

  The weight gradient of a Dense on (B, N, D) tokens contracts over two axes (batch and token);
  XLA:CPU lowers that by physically transposing the (B, N, F) output cotangent before the dot,
  ~2x the cost of the contraction over the rows of a (B*N, F) matrix, which every backend's GEMM
  takes as is (transposed operand). Flattening the leading axes is a free reshape (bitcast).
  """

  def __call__(self, inputs):
    lead = inputs.shape[:-1]
    if len(lead) <= 1:
      return super().__call__(inputs)
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def dense(features, name, axes, dtype, kernel_init=None, bias_init=None, use_bias=True):
  """A Dense layer whose params carry logical axis names (kernel axes `axes`, bias axes[-1:]).

  Inputs (..., D_in) -> (..., features); leading axes are flattened around the matmul
  (`TokenDense`).
  """
  kernel_init = kernel_init or xavier_uniform()
  bias_init = bias_init or nn.initializers.zeros_init()
  return TokenDense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes[-1:]))


def check_mediator_num(n: int, num_tokens: int) -> int:
  """Validates a mediator count and returns its square root."""
  s = math.isqrt(n) if n > 0 else 0
  if n <= 0 or s * s != n:
    near = [k * k for k in (max(s, 1), s + 1)]
    raise ValueError(
        f"mediator_num={n} is not a positive perfect square: mediators are a sqrt(n) x sqrt(n) "
        f"pooling of the query grid. Use a square such as {near[0]} or {near[1]}.")
  if n > num_tokens:
    raise ValueError(
        f"mediator_num={n} is larger than the number of tokens {num_tokens}: use at most "
        f"{num_tokens} mediators, or a larger input size / smaller patch.")
  return s


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) averaging matrix of torch's AdaptiveAvgPool1d.

  Window i covers [floor(i * in / out), ceil((i + 1) * in / out)); windows overlap when in_size is
  not divisible by out_size.
  """
  p = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    lo = (i * in_size) // out_size
    hi = -((-(i + 1) * in_size) // out_size)
    p[i, lo:hi] = 1.0 / (hi - lo)
  return p.astype(np.float32)


def adaptive_avg_pool_2d(x, out_size: int):
  """Adaptive average pooling of an NHWC grid (B, g, g, C) to (B, s, s, C), torch semantics."""
  g = x.shape[1]
  if g % out_size == 0:
    k = g // out_size
    b, _, _, c = x.shape
    return x.reshape(b, out_size, k, out_size, k, c).mean(axis=(2, 4))
  p = jnp.asarray(adaptive_pool_matrix(g, out_size), x.dtype)
  return jnp.einsum("ai,bj,nijc->nabc", p, p, x)


def resize_bilinear(table, size: int):
  """Bilinear resize of the last two axes to (size, size): torch align_corners=False, no antialias."""
  shape = table.shape[:-2] + (size, size)
  return jax.image.resize(table, shape, method="bilinear", antialias=False)


def resize_mediator_axes(table, axis: int, size: int):
  """Elastic tables: resizes the R x R mediator axes (axis, axis + 1) to (size, size) with
  `resize_bilinear` and merges them into one axis of size * size (row-major). Exact identity
  (no resize) when size == R."""
  if table.shape[axis] != size or table.shape[axis + 1] != size:
    moved = jnp.moveaxis(table, (axis, axis + 1), (-2, -1))
    table = jnp.moveaxis(resize_bilinear(moved, size), (-2, -1), (axis, axis + 1))
  shape = table.shape[:axis] + (size * size,) + table.shape[axis + 2:]
  return table.reshape(shape)


# Elastic bias tables: name -> (shape builder (h, R, g) -> shape, axis of the first R axis).
ELASTIC_TABLES = {
    "an_bias": (lambda h, r, g: (h, r, r, 7, 7), 1),
    "na_bias": (lambda h, r, g: (h, r, r, 7, 7), 1),
    "ah_bias": (lambda h, r, g: (1, h, r, r, g, 1), 2),
    "aw_bias": (lambda h, r, g: (1, h, r, r, 1, g), 2),
    "ha_bias": (lambda h, r, g: (1, h, g, 1, r, r), 4),
    "wa_bias": (lambda h, r, g: (1, h, 1, g, r, r), 4),
}
# Official (static-n) bias tables: name -> (shape builder (h, n, g) -> shape, axis of n).
STATIC_TABLES = {
    "an_bias": (lambda h, n, g: (h, n, 7, 7), 1),
    "na_bias": (lambda h, n, g: (h, n, 7, 7), 1),
    "ah_bias": (lambda h, n, g: (1, h, n, g, 1), 2),
    "aw_bias": (lambda h, n, g: (1, h, n, 1, g), 2),
    "ha_bias": (lambda h, n, g: (1, h, g, 1, n), 4),
    "wa_bias": (lambda h, n, g: (1, h, 1, g, n), 4),
}


class DepthwiseConv3x3(nn.Module):
  """Depthwise 3x3 convolution with zero padding 1 and bias on an NHWC grid (B, g, g, C).

  Computed as nine shifted multiply-adds (same cross-correlation as torch Conv2d(groups=C)); XLA
  fuses them into one loop, which is faster on CPU than a grouped convolution.
  Params: kernel (3, 3, 1, C), bias (C,). torch init: U(-1/3, 1/3) for both (fan_in = 9).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    bound = 1.0 / 3.0
    init = nn.initializers.uniform(2 * bound)
    shifted = lambda f: (lambda *a: f(*a) - bound)  # noqa: E731  U(0, 2b) - b = U(-b, b)
    kernel = self.param("kernel", nn.with_logical_partitioning(shifted(init), (None, None, None, "embed")),
                        (3, 3, 1, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(shifted(init), ("embed",)),
                      (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    g1, g2 = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = bias.astype(self.dtype)
    for i in range(3):
      for j in range(3):
        out = out + xp[:, i:i + g1, j:j + g2, :] * kernel[i, j, 0]
    return out


def apply_head_gate(o, head_gate):
  """o (B, N, h, hd) times a per-head gate: (B, h) (per sample) or (h,) (whole batch)."""
  if head_gate is None:
    return o
  g = jnp.asarray(head_gate, o.dtype)
  g = g[:, None, :, None] if g.ndim == 2 else g[None, None, :, None]
  return o * g


class FullAttention(nn.Module):
  """timm `Attention(D, heads, qkv_bias=True)`; the core is `attention_core.dot_product_attention`.

  x: (B, N, D) -> (B, N, D). `implementation`: the core's (None = automatic: the head-major jnp
  core on CPU, `jax.nn.dot_product_attention` elsewhere; "xla" / "cudnn" = that function's
  implementation; "head_major"; see `edit_jax.models.attention_core`). `amm`: None, or EDT's (N, N) attention modulation
  matrix (a numpy constant, `edit_jax.models.amm`), applied after the softmax in `amm_mode`
  ("post_softmax" or the equivalent "log_bias" form that keeps dot_product_attention).
  head_dim: per-head width (default D / num_heads). A *narrowed* layer (DyDiT sparse inference,
  `edit_jax.models.dydit`) keeps head_dim = D / H of the full layer with num_heads = k < H active
  heads: qkv (D, 3 k hd) with columns [q | k | v], each head-major; proj (k hd, D).
  head_gate (optional, call argument): (B, h) or (h,) multiplies each head's output before proj
  (DyDiT's timestep-wise head mask).
  """
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None
  amm_mode: str = "post_softmax"
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x, amm=None, head_gate=None):
    from edit_jax.models import amm as amm_lib  # noqa: PLC0415  (amm imports nothing from here)
    b, n, d = x.shape
    h = self.num_heads
    hd = self.head_dim or d // h
    qkv = dense(3 * h * hd, "qkv", ("embed", "qkv"), self.dtype)(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, h, hd), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    if amm is None:
      o = attention_core.dot_product_attention(q, k, v, implementation=self.implementation)
    else:
      o = amm_lib.amm_attention(q, k, v, amm, None, self.amm_mode, self.implementation)
    maybe_sow_attention(self, lambda: amm_lib.attention_probs(q, k, None, amm))
    o = apply_head_gate(o, head_gate)
    return dense(d, "proj", ("heads_merged", "embed"), self.dtype)(o.reshape(b, n, h * hd))


class MediatorAttention(nn.Module):
  """Attention with n mediators (the official `AttentionWithMediators`).

  x: (B, N, D) with N = grid * grid tokens in row-major order -> (B, N, D).
  impl: "xla" runs the jnp reference core, "pallas" the fused kernel (edit_jax.kernels).
  head_dim / head_gate: as `FullAttention` (a narrowed layer has k heads: qkv (D, 3 k hd), the
  per-head bias tables and the depthwise conv over the k hd value channels, proj (k hd, D)). The
  gate multiplies each head's output (mediator output + depthwise-conv term) before proj.
  elastic_grid: 0 = official per-n bias tables; R > 0 = elastic tables over an R x R reference
  mediator grid (module docstring), run at `mediator_num` mediators.
  """
  dim: int
  num_heads: int
  grid: int
  mediator_num: int
  dtype: Dtype = jnp.float32
  impl: str = "xla"
  head_dim: int | None = None

  @property
  def inner_dim(self) -> int:
    return self.num_heads * (self.head_dim or self.dim // self.num_heads)
  elastic_grid: int = 0

  def setup(self):
    h, n, g, r = self.num_heads, self.mediator_num, self.grid, self.elastic_grid
    self.pool_size = check_mediator_num(n, g * g)
    trunc = nn.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
    p = lambda name, shape: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(trunc, (None,) * len(shape)), shape, jnp.float32)
    if r:
      self._tables = {k: p(k, make(h, r, g)) for k, (make, _) in ELASTIC_TABLES.items()}
    else:
      self._tables = {k: p(k, make(h, n, g)) for k, (make, _) in STATIC_TABLES.items()}
    self.qkv = dense(3 * self.inner_dim, "qkv", ("embed", "qkv"), self.dtype)
    self.proj = dense(self.dim, "proj", ("heads_merged", "embed"), self.dtype)
    self.dwc = DepthwiseConv3x3(self.inner_dim, dtype=self.dtype, name="dwc")

  def tables(self) -> dict:
    """The six bias tables in the official static-n shapes (module docstring) at `mediator_num`:
    the parameters themselves, or for an elastic layer its R x R tables resized to sqrt(n)."""
    if not self.elastic_grid:
      return dict(self._tables)
    s = self.pool_size
    return {k: resize_mediator_axes(self._tables[k], ax, s)
            for k, (_, ax) in ELASTIC_TABLES.items()}

  def biases(self):
    """Position biases (bias1 (h, n, N), bias2 (h, N, n)) in float32; depend on params only."""
    h, n, g = self.num_heads, self.mediator_num, self.grid
    t = self.tables()
    pos1 = resize_bilinear(t["an_bias"], g).reshape(h, n, g * g)
    pos1 = pos1 + (t["ah_bias"] + t["aw_bias"]).reshape(h, n, g * g)
    pos2 = resize_bilinear(t["na_bias"], g).reshape(h, n, g * g).transpose(0, 2, 1)
    pos2 = pos2 + (t["ha_bias"] + t["wa_bias"]).reshape(h, g * g, n)
    return pos1, pos2

  def cache_biases(self):
    """Stores `biases()` in the "mediator_cache" collection (call with mutable=[CACHE])."""
    b1, b2 = self.biases()
    self.put_variable(CACHE, "bias1", b1)
    self.put_variable(CACHE, "bias2", b2)

  def __call__(self, x, head_gate=None):
    b, num, _ = x.shape
    h, g, s = self.num_heads, self.grid, self.pool_size
    if num != g * g:
      raise ValueError(f"MediatorAttention built for a {g}x{g} grid ({g * g} tokens) got {num} tokens")
    d = self.inner_dim
    hd = d // h
    qkv = self.qkv(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    m = adaptive_avg_pool_2d(q.reshape(b, g, g, d), s).reshape(b, s * s, h, hd)
    if self.has_variable(CACHE, "bias1"):
      bias1, bias2 = self.get_variable(CACHE, "bias1"), self.get_variable(CACHE, "bias2")
    else:
      bias1, bias2 = self.biases()
    o = mediator_attention(q.reshape(b, num, h, hd), k.reshape(b, num, h, hd),
                           v.reshape(b, num, h, hd), m, bias1, bias2, scale=hd ** -0.5,
                           impl=self.impl)
    maybe_sow_attention(self, lambda: _mediator_effective_attention(
        q.reshape(b, num, h, hd), k.reshape(b, num, h, hd), m, bias1, bias2, hd ** -0.5))
    o = o.reshape(b, num, d) + self.dwc(v.reshape(b, g, g, d)).reshape(b, num, d)
    if head_gate is not None:
      o = apply_head_gate(o.reshape(b, num, h, hd), head_gate).reshape(b, num, d)
    return self.proj(o)


def _mediator_effective_attention(q, k, m, bias1, bias2, scale):
  """A2 @ A1: (B, h, N, N), the query -> key attention that mediator attention applies to V."""
  a1 = jax.nn.softmax(jnp.einsum("bmhd,bkhd->bhmk", m * scale, k) + bias1, axis=-1)
  a2 = jax.nn.softmax(jnp.einsum("bqhd,bmhd->bhqm", q * scale, m) + bias2, axis=-1)
  return jnp.einsum("bhqm,bhmk->bhqk", a2, a1)
