"""Feature-space metrics: Frechet distance, streamed mean/covariance, Inception Score, precision/recall.

These follow the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`):
  - `frechet_distance`: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) with scipy's
    `linalg.sqrtm`; if the product's root is not finite, eps * I (eps=1e-6) is added to both
    covariances; a complex root whose diagonal imaginary part exceeds 1e-3 raises ValueError,
    otherwise the real part is used.
  - `RunningStats`: mean and unbiased covariance (== np.mean, np.cov(rowvar=False)) accumulated
    batch by batch in float64 (sums of x and x x^T, shifted by the first batch's mean for
    numerical stability), so activations never need to sit in memory.
  - `inception_score`: splits of 5000 consecutive samples, exp(E_x KL(p(y|x) || p(y))) per split,
    mean over splits (ADM reports the mean only).
  - `precision_recall`: improved precision/recall (Kynkaanniemi et al. 2019) with k = 3: each
    feature's radius is its *squared* Euclidean distance to its 3rd nearest neighbour in its own
    set (self excluded); precision = share of samples inside some reference ball, recall = share
    of references inside some sample ball (distance <= radius). As ADM, distances are computed in
    float16 first and recomputed in float32 when any is not finite (`distance_dtype`).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


@dataclasses.dataclass
class FeatureStats:
  """Mean (D,) and covariance (D, D) of a feature set, float64."""
  mu: np.ndarray
  sigma: np.ndarray


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as the ADM/TTUR code computes it."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape} (features "
                     "from different layers? FID uses 2048-d pool_3, sFID 2023-d mixed_6/conv)")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances must be (D, D) with D = {mu1.shape[0]}, got {sigma1.shape} and "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                  "estimates")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps)


class RunningStats:
  """Streams (N, D) feature batches into float64 running sums; `.stats()` -> FeatureStats.

  Equal to `np.mean(x, 0)` and `np.cov(x, rowvar=False)` of the concatenated batches.
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.n = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, feats) -> None:
    x = np.asarray(feats, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if self.dim is None:
      self.dim = x.shape[1]
    if x.shape[1] != self.dim:
      raise ValueError(f"feature dimension changed: expected {self.dim}, got {x.shape[1]}")
    if x.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros(self.dim)
      self._outer = np.zeros((self.dim, self.dim))
    x = x - self._shift
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    self.n += x.shape[0]

  def stats(self) -> FeatureStats:
    if self.n < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
    mean_shifted = self._sum / self.n
    cov = (self._outer - self.n * np.outer(mean_shifted, mean_shifted)) / (self.n - 1)
    return FeatureStats(self._shift + mean_shifted, cov)


def stats_from_features(feats) -> FeatureStats:
  """One-shot mean/covariance of (N, D) features (np.cov semantics)."""
  x = np.asarray(feats, np.float64)
  return FeatureStats(x.mean(axis=0), np.cov(x, rowvar=False))


def inception_score(logits, split_size: int = 5000) -> float:
  """ADM Inception Score from (N, C) logits: mean over splits of exp(E KL(p(y|x) || p(y)))."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"logits must be a non-empty (N, num_classes) array, got {logits.shape}")
  logp = logits - logits.max(axis=1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for s in range(0, len(logp), split_size):
    part_logp = logp[s:s + split_size]
    part = np.exp(part_logp)
    log_py = np.log(part.mean(axis=0, keepdims=True))
    kl = np.sum(part * (part_logp - log_py), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision/recall
def _sq_dists(u, v):
  """Squared Euclidean distances (R, C) as ADM: max(|u|^2 - 2 u.v + |v|^2, 0), in u's dtype."""
  nu = jnp.sum(jnp.square(u), axis=1)[:, None]
  nv = jnp.sum(jnp.square(v), axis=1)[None, :]
  return jnp.maximum(nu - 2 * jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST) + nv, 0)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dist_block(u, v, dtype: str):
  """Distances in `dtype` ("float16": fall back to float32 if any is not finite), as float32."""
  u32, v32 = u.astype(jnp.float32), v.astype(jnp.float32)
  if dtype == "float32":
    return _sq_dists(u32, v32)
  d16 = _sq_dists(u32.astype(jnp.float16), v32.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: _sq_dists(u32, v32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _kth_block(rows, feats, k: int, dtype: str):
  d = _dist_block(rows, feats, dtype)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]  # k+1 smallest, self (0) included -> k-th neighbour


def _row_blocks(x: np.ndarray, block: int):
  for s in range(0, len(x), block):
    chunk = x[s:s + block]
    m = len(chunk)
    if m < block and len(x) > block:  # pad to one shape: one compilation
      chunk = np.concatenate([chunk, np.zeros((block - m, x.shape[1]), x.dtype)])
    yield s, m, chunk


def manifold_radii(features, k: int = 3, row_batch_size: int = 4096,
                   distance_dtype: str = "float16") -> np.ndarray:
  """(N,) squared distance of each feature to its k-th nearest neighbour in the same set."""
  f = np.asarray(features, np.float32)
  if len(f) <= k:
    raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {len(f)}")
  fj = jnp.asarray(f)
  out = np.empty(len(f), np.float32)
  for s, m, chunk in _row_blocks(f, row_batch_size):
    out[s:s + m] = np.asarray(_kth_block(jnp.asarray(chunk), fj, k, distance_dtype))[:m]
  return out


@functools.partial(jax.jit, static_argnames=("dtype",))
def _pr_block(sample_rows, sample_radii, ref, ref_radii, dtype: str):
  d = _dist_block(sample_rows, ref, dtype)  # (R, Nref)
  sample_in = jnp.any(d <= ref_radii[None, :], axis=1)  # sample inside some reference ball
  ref_in = jnp.any(d <= sample_radii[:, None], axis=0)  # reference inside some sample ball
  return sample_in, ref_in


def precision_recall(ref_features, sample_features, k: int = 3, row_batch_size: int = 4096,
                     distance_dtype: str = "float16") -> tuple[float, float]:
  """Improved precision and recall of samples w.r.t. references (ADM's k=3 manifold estimator).

  Args:
    ref_features, sample_features: (N_ref, D), (N_sample, D) pool features.
    row_batch_size: rows of the distance matrix computed at once (memory: rows x N floats).
    distance_dtype: "float16" (ADM: fp16 with float32 fallback on overflow) or "float32".
  Returns:
    (precision, recall).
  """
  if distance_dtype not in ("float16", "float32"):
    raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}")
  ref = np.asarray(ref_features, np.float32)
  sam = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
    raise ValueError(f"features must be (N, D) with equal D, got {ref.shape} and {sam.shape}")
  ref_radii = manifold_radii(ref, k, row_batch_size, distance_dtype)
  sam_radii = manifold_radii(sam, k, row_batch_size, distance_dtype)
  ref_j, ref_r = jnp.asarray(ref), jnp.asarray(ref_radii)
  sample_in = np.zeros(len(sam), bool)
  ref_in = np.zeros(len(ref), bool)
  for s, m, chunk in _row_blocks(sam, row_batch_size):
    radii = np.full(len(chunk), -np.inf, np.float32)  # padded rows never cover anything
    radii[:m] = sam_radii[s:s + m]
    si, ri = _pr_block(jnp.asarray(chunk), jnp.asarray(radii), ref_j, ref_r, distance_dtype)
    sample_in[s:s + m] = np.asarray(si)[:m]
    ref_in |= np.asarray(ri)
  return float(sample_in.mean()), float(ref_in.mean())
