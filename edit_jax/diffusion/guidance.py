"""Classifier-free guidance as a wrapper around a model function.

`model_fn(x, t, y) -> out` maps x (B, H, W, C) NHWC, t (B,), y (B,) int to (B, H, W, C). The guided
function keeps the sampler state at B samples and runs ONE network forward on the doubled batch
[x, x] with labels [y, null]: this is the official `forward_with_cfg` applied to the conditional
half (the official sampler also doubles the state, but `forward_with_cfg` only ever reads the first
half, so the conditional-half trajectory is identical).

Guidance u + s (c - u) acts on the first `guide_channels` channels (3 = official behaviour inherited
from DiT; None = all channels, the DiT#41 fix); the other channels keep the conditional output.
`interval=(t_lo, t_hi)` applies guidance only for t in [t_lo, t_hi] (inclusive); outside it the
plain conditional output is used, and when no sample of the batch is inside the interval the
unconditional half is skipped (`lax.cond`), so those steps cost one forward instead of two.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

ModelFn = Callable  # (x (B,H,W,C), t (B,), y (B,)) -> (B,H,W,C)


def check_guidance(cfg_scale: float, guide_channels: Optional[int], interval, channels=None):
  """Raises ValueError for bad guidance options.

  guide_channels larger than the model's channel count guides every channel (like the official
  `eps[:, :3]` slice on a 1-channel model)."""
  del channels
  if not cfg_scale >= 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (1 disables guidance)")
  if guide_channels is not None:
    if int(guide_channels) != guide_channels or guide_channels < 1:
      raise ValueError(f"guide_channels={guide_channels}: expected a positive int (3 = official) "
                       f"or None (all channels)")
  if interval is not None:
    lo, hi = parse_interval(interval)
    if not 0 <= lo <= hi <= 1:
      raise ValueError(f"guidance interval [{lo}, {hi}] must satisfy 0 <= t_lo <= t_hi <= 1 "
                       f"(t = 0 is noise, t = 1 is data)")


def parse_interval(interval) -> tuple[float, float]:
  if isinstance(interval, str):
    parts = [p for p in interval.replace(" ", "").split(",") if p]
    if len(parts) != 2:
      raise ValueError(f"guidance interval {interval!r}: expected 't_lo,t_hi', e.g. '0.0,0.7'")
    interval = parts
  if not isinstance(interval, Sequence) or len(interval) != 2:
    raise ValueError(f"guidance interval {interval!r}: expected a pair (t_lo, t_hi)")
  return float(interval[0]), float(interval[1])


def uses_guidance(cfg_scale) -> bool:
  """Guidance runs only for cfg_scale > 1, as in the official scripts (`using_cfg`)."""
  return cfg_scale is not None and cfg_scale > 1.0


def combine(cond, uncond, cfg_scale: float, guide_channels: Optional[int] = 3):
  """Guided output from the conditional / unconditional halves (both (B, H, W, C))."""
  k = cond.shape[-1] if guide_channels is None else int(guide_channels)
  guided = uncond[..., :k] + cfg_scale * (cond[..., :k] - uncond[..., :k])
  return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def guided_model_fn(model_fn: ModelFn, cfg_scale: float, null_class: int,
                    guide_channels: Optional[int] = 3, interval=None) -> ModelFn:
  """Classifier-free guided version of `model_fn` (same signature, batch B in and out)."""
  check_guidance(cfg_scale, guide_channels, interval)
  lo_hi = None if interval is None else parse_interval(interval)

  def doubled(x, t, y):
    xx = jnp.concatenate([x, x], axis=0)
    tt = jnp.concatenate([t, t], axis=0)
    yy = jnp.concatenate([y, jnp.full_like(y, null_class)], axis=0)
    cond, uncond = jnp.split(model_fn(xx, tt, yy), 2, axis=0)
    return combine(cond, uncond, cfg_scale, guide_channels), cond

  def fn(x, t, y):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    if lo_hi is None:
      return doubled(x, t, y)[0]
    inside = (t >= lo_hi[0]) & (t <= lo_hi[1])

    def with_guidance(_):
      g, cond = doubled(x, t, y)
      return jnp.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), g, cond)

    return jax.lax.cond(jnp.any(inside), with_guidance, lambda _: model_fn(x, t, y), None)

  return fn


def guidance_forwards(t, cfg_scale: float, interval=None):
  """Network forwards (in units of one B-sample batch) for evaluations at times `t` (array-like):
  2 where guidance is applied, else 1. Used for FLOPs accounting."""
  import numpy as np  # noqa: PLC0415
  t = np.asarray(t, np.float64)
  if not uses_guidance(cfg_scale):
    return np.ones_like(t)
  if interval is None:
    return np.full_like(t, 2.0)
  lo, hi = parse_interval(interval)
  return np.where((t >= lo) & (t <= hi), 2.0, 1.0)
