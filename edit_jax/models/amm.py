"""EDT's Attention Modulation Matrix (AMM): a training-free, post-softmax locality re-weighting.

Spec: spec/edt_dydit.md section 1.3 (definition), 4.1 (the flash-friendly form), 4.2 (config).
For a g x g token grid (N = g*g tokens, row-major: token = row * g + col) and the Euclidean
distance d_ir between the grid coordinates of tokens i and r:

    d_max = (g - 1) sqrt(2),  T = 4 d_max,  f = 2 pi / T   (f d in [0, pi/2])
    F(d)  = k exp(cos(f d)),  k = 0.5                       (F in [0.5, e/2])
    R     = sqrt((g - 1)^2 + 4)  (distance from token 0 to the token at row 2, column g - 1)
    M_ir  = F(d_ir) if F(d_ir) >= F(R) else 0               (i.e. d_ir <= R)

and attention becomes  A' = softmax(S) * M  (Hadamard product, NO renormalisation; S the logits
with any additive bias), applied at sampling time only (the official `local and not training`).
M is shared by every head and sample. It is built here with numpy in float32 exactly as the
official `modulation_matrix(g, 3g)` (float32 distances, cos, exp; the cut-off is the float32 value
of the matrix at the radius token, ties kept), and enters the jitted program as a trace-time
constant: no parameters, one constant per grid size, no recompilation per step.

Two ways to apply it (`amm_attention`, mode):
  "post_softmax"  the official form: materialised softmax times M.
  "log_bias"      (softmax(S) * M) V = softmax(S + log M) V * exp(LSE(S + log M) - LSE(S)),
                  row-wise (zeros of M are a -1e30 bias). The attention product runs through
                  `jax.nn.dot_product_attention` with an additive bias (so a fused/cuDNN kernel can
                  serve it); the row correction needs the two log-sum-exps of the logits, which are
                  computed by a separate QK^T reduction (no N x N probabilities are multiplied
                  with V there). Equal to "post_softmax" up to float rounding (tested).

Mediator attention has no token x token probability matrix (spec 4.7), so AMM is never applied in
mediator blocks: naming one in `amm_layers` is an error, "all" means every full-attention block.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models import attention_core

MODES = ("post_softmax", "log_bias")
MASK_VALUE = -1e30  # log(0) stand-in for the log_bias form (exp underflows to exactly 0)


def grid_distances(grid: int) -> np.ndarray:
  """(N, N) float32 Euclidean distances between the row-major grid coordinates of N = grid^2
  tokens, computed as the official `euclidean_distances` (float32 sqrt of an integer sum)."""
  r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  r, c = r.reshape(-1), c.reshape(-1)
  sq = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
  return np.sqrt(sq.astype(np.float32))


def _profile(d: np.ndarray, grid: int, k: float, period_factor: float) -> np.ndarray:
  """k exp(cos(f d)) in float32 with f = 2 pi / (period_factor (grid-1) sqrt 2)."""
  if grid < 2:
    return np.full(d.shape, k * math.e, np.float32)
  period = period_factor * (grid - 1) * math.sqrt(2)
  f = np.float32(2 * math.pi / period)
  m = np.exp(np.cos(f * d.astype(np.float32))).astype(np.float32)
  return (m * np.float32(k)).astype(np.float32)  # k = 0.5: exact, as the official exp(.)/2


def radius(grid: int) -> float:
  """EDT's effective radius sqrt((g - 1)^2 + 4)."""
  return math.sqrt((grid - 1) ** 2 + 4)


@functools.lru_cache(maxsize=64)
def _matrix_cached(grid: int, k: float, period_factor: float) -> np.ndarray:
  d = grid_distances(grid)
  m = _profile(d, grid, k, period_factor)
  # Cut-off: the matrix value at the radius token (row 2, col g-1), in the same float32 arithmetic
  # (the official code reads element [0, 3g - 1]); for g < 3 that token does not exist and the
  # value is computed at distance R directly.
  if grid >= 3:
    bound = m[0, 3 * grid - 1]
  else:
    bound = _profile(np.asarray([radius(grid)], np.float32), grid, k, period_factor)[0]
  m = np.where(m < bound, np.float32(0), m).astype(np.float32)
  m.setflags(write=False)
  return m


def modulation_matrix(grid: int, k: float = 0.5, period_factor: float = 4.0) -> np.ndarray:
  """AMM for a grid x grid token grid: read-only (N, N) float32 numpy array, N = grid^2.

  Equals the official `modulation_matrix(grid, 3 * grid)` for k = 0.5, period_factor = 4.
  """
  if int(grid) != grid or grid < 1:
    raise ValueError(f"grid={grid} must be a positive int (tokens per side)")
  if not k > 0:
    raise ValueError(f"amm k={k} must be > 0")
  if not period_factor > 0:
    raise ValueError(f"amm period_factor={period_factor} must be > 0")
  return _matrix_cached(int(grid), float(k), float(period_factor))


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"amm mode={mode!r}: expected one of {', '.join(MODES)}")
  return mode


def parse_layers(spec) -> Any:
  """Normalises an `amm_layers` value: None/'' -> None, 'none'/'off' -> (), 'all' and the named
  official lists ('official', 'official_alt', 'official_512') kept as strings, '7,10' or a
  sequence -> sorted tuple of ints."""
  if spec is None or (isinstance(spec, str) and spec.strip() == ""):
    return None
  if isinstance(spec, str):
    s = spec.strip().lower().replace(" ", "")
    if s in ("none", "off", "false"):
      return ()
    if s == "all" or s.startswith("official"):
      return s
    try:
      return tuple(sorted({int(v) for v in s.split(",") if v}))
    except ValueError:
      raise ValueError(f"amm layers {spec!r}: expected 'official', 'official_alt', 'all', 'none' "
                       f"or comma-separated block indices like '7,10'") from None
  if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    return (int(spec),)
  try:
    return tuple(sorted({int(v) for v in spec}))
  except TypeError:
    raise ValueError(f"amm layers {spec!r}: expected a string or a sequence of block indices") \
        from None


def check_indices(layers: Sequence[int], depth: int, what: str = "amm_layers") -> tuple[int, ...]:
  bad = [i for i in layers if not 0 <= i < depth]
  if bad:
    raise ValueError(f"{what} has block indices {bad} outside [0, depth={depth})")
  return tuple(layers)


# --------------------------------------------------------------------------- attention
def _scores(q, k, bias):
  """Logits (B, H, Nq, Nk) float32 = (q * hd^-0.5) k^T + bias."""
  hd = q.shape[-1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(hd ** -0.5, q.dtype), k,
                 preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  return s


def attention_probs(q, k, bias=None, amm=None):
  """Effective attention (B, H, N, N) float32: softmax(q k^T / sqrt(hd) + bias) [* amm]."""
  p = jax.nn.softmax(_scores(q, k, bias), axis=-1)
  return p if amm is None else p * jnp.asarray(amm, jnp.float32)


def amm_attention(q, k, v, amm: Optional[np.ndarray], bias=None, mode: str = "post_softmax",
                  implementation: Optional[str] = None):
  """Attention with an optional additive logit bias and AMM.

  q, k, v: (B, N, H, hd); bias: None or broadcastable to (B, H, N, N) (e.g. a relative-position
  bias (1, H, N, N)); amm: None (plain attention) or the (N, N) numpy matrix of
  `modulation_matrix`. Returns (B, N, H, hd) in v's dtype.
  """
  check_mode(mode)
  if amm is None:
    return attention_core.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(q.dtype), implementation=implementation)
  n = q.shape[1]
  if amm.shape != (n, n):
    raise ValueError(f"AMM matrix {amm.shape} does not match {n} tokens")
  if mode == "post_softmax":
    p = attention_probs(q, k, bias, amm)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(v.dtype)
  log_m = np.where(amm > 0, np.log(np.where(amm > 0, amm, 1.0)), MASK_VALUE).astype(np.float32)
  log_m = jnp.asarray(log_m)[None, None]
  full_bias = log_m if bias is None else bias.astype(jnp.float32) + log_m
  o = attention_core.dot_product_attention(q, k, v, bias=full_bias.astype(q.dtype),
                                           implementation=implementation)
  s = _scores(q, k, bias)
  corr = jnp.exp(jax.nn.logsumexp(s + log_m, axis=-1) - jax.nn.logsumexp(s, axis=-1))  # (B,H,N)
  return (o.astype(jnp.float32) * corr.transpose(0, 2, 1)[..., None]).astype(v.dtype)
