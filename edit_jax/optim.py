"""Adan (Xie et al. 2022), EDT's optimizer, as an optax GradientTransformation.

EDT trains with the official sail-sg `Adan` (betas (0.98, 0.92, 0.99), eps 1e-8, weight decay 0,
no clipping). optax ships `optax.adan`, but in optax 0.2.8 (the pinned version) its
`scale_by_adan` weights the gradient difference by `1 - b2` (0.08 with the default b2 = 0.92)
where the paper's Algorithm 1 and the official PyTorch code use `b2` (0.92) in this
parameterisation: google-deepmind/optax pull request #1715 ("Fix incorrect (1 - b2) coefficient
in scale_by_adan", open when this was written). The two agree only at b2 = 0.5 (tested). This
module therefore builds the official update from optax's tree utilities:

    d_k = g_k - g_{k-1}  (0 at the first step)
    m_k = b1 m + (1 - b1) g_k;   v_k = b2 v + (1 - b2) d_k
    n_k = b3 n + (1 - b3) (g_k + b2 d_k)^2
    u_k = (m_k / (1 - b1^k) + b2 v_k / (1 - b2^k)) / (sqrt(n_k / (1 - b3^k)) + eps)
    theta <- (theta - lr u_k) / (1 + lr wd)         (the official proximal weight decay)

Switch to `optax.adan` once a fixed optax is pinned (the test against the transcription of the
official update will say so).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByAdanState(NamedTuple):
  count: jax.Array  # () int32, steps taken
  m: Any
  v: Any
  n: Any
  prev_grad: Any


def scale_by_adan(b1: float = 0.98, b2: float = 0.92, b3: float = 0.99,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """The Adan direction u_k (see module docstring), without learning rate or weight decay."""

  def init_fn(params):
    z = lambda: optax.tree.zeros_like(params)  # noqa: E731
    return ScaleByAdanState(jnp.zeros([], jnp.int32), z(), z(), z(), z())

  def update_fn(grads, state, params=None):
    del params
    first = state.count == 0
    diff = jax.tree.map(lambda g, p: jnp.where(first, jnp.zeros_like(g), g - p), grads,
                        state.prev_grad)
    m = optax.tree.update_moment(grads, state.m, b1, 1)
    v = optax.tree.update_moment(diff, state.v, b2, 1)
    look = jax.tree.map(lambda g, d: g + b2 * d, grads, diff)
    n = optax.tree.update_moment_per_elem_norm(look, state.n, b3, 2)
    count = optax.safe_increment(state.count)
    m_hat = optax.tree.bias_correction(m, b1, count)
    v_hat = optax.tree.bias_correction(v, b2, count)
    n_hat = optax.tree.bias_correction(n, b3, count)
    u = jax.tree.map(lambda a, b, c: (a + b2 * b) / (jnp.sqrt(c) + eps), m_hat, v_hat, n_hat)
    return u, ScaleByAdanState(count, m, v, n, grads)

  return optax.GradientTransformation(init_fn, update_fn)


class _ProxState(NamedTuple):
  count: jax.Array


def _proximal_weight_decay(learning_rate, weight_decay: float) -> optax.GradientTransformation:
  """updates (= -lr u) -> (theta + updates) / (1 + lr wd) - theta."""

  def init_fn(params):
    del params
    return _ProxState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("Adan's weight decay needs params: call tx.update(grads, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    denom = 1.0 + lr * weight_decay
    new = jax.tree.map(lambda u, p: (p + u) / denom - p, updates, params)
    return new, _ProxState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def adan(learning_rate, b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Official Adan (sail-sg `Adan(..., max_grad_norm=0)`): learning_rate a float or schedule."""
  for name, b in (("b1", b1), ("b2", b2), ("b3", b3)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"Adan {name}={b} must be in [0, 1) (torch convention: 0.98, 0.92, 0.99)")
  parts = [scale_by_adan(b1, b2, b3, eps), optax.scale_by_learning_rate(learning_rate)]
  if weight_decay:
    parts.append(_proximal_weight_decay(learning_rate, weight_decay))
  return optax.chain(*parts)
