"""SiT transport (stochastic interpolants): paths, prediction conversions, training loss.

Same maths as the official SiT `transport/` package (willisma/SiT; spec/sit_mediators.md §5).

Convention: x_t = alpha_t * x1 + sigma_t * x0 with x1 data and x0 ~ N(0, I); time runs from noise
(t = 0) to data (t = 1). Images are NHWC; `t` is (B,) and is broadcast over H, W, C.

Paths: "Linear" (alpha = t, sigma = 1 - t), "GVP" (alpha = sin(pi t / 2), sigma = cos(pi t / 2)),
"VP" (beta_min = 0.1, beta_max = 20). Predictions: "velocity", "score", "noise". Loss weights
(noise / score predictions only): None, "velocity" ((g / sigma)^2), "likelihood" (g / sigma^2).

Training entry point: `make_loss_fn(model, transport)`; sampling: `edit_jax.diffusion.samplers`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def _expand(t, x):
  """(B,) -> (B, 1, 1, ...) broadcastable against x; scalars pass through."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _check_choice(kind: str, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}: expected one of {list(choices)}")


# --------------------------------------------------------------------------- paths
@dataclasses.dataclass(frozen=True)
class Path:
  """Interpolation path. All functions take t already broadcast to x (see `_expand`)."""
  name: str = "Linear"

  def __post_init__(self):
    _check_choice("path", self.name, PATHS)

  # --- VP helpers
  def _vp_log_mean(self, t):
    return -0.25 * (1 - t) ** 2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * (1 - t) * VP_BETA_MIN

  def _vp_d_log_mean(self, t):
    return 0.5 * (1 - t) * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN

  def alpha(self, t):
    """(alpha_t, d alpha_t / dt)."""
    if self.name == "Linear":
      return t, jnp.ones_like(t)
    if self.name == "GVP":
      return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)
    a = jnp.exp(self._vp_log_mean(t))
    return a, a * self._vp_d_log_mean(t)

  def sigma(self, t):
    """(sigma_t, d sigma_t / dt)."""
    if self.name == "Linear":
      return 1 - t, -jnp.ones_like(t)
    if self.name == "GVP":
      return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)
    p = 2 * self._vp_log_mean(t)
    s = jnp.sqrt(1 - jnp.exp(p))
    return s, jnp.exp(p) * (2 * self._vp_d_log_mean(t)) / (-2 * s)

  def d_alpha_alpha_ratio(self, t):
    """alpha_dot / alpha."""
    if self.name == "Linear":
      return 1 / t
    if self.name == "GVP":
      return math.pi / (2 * jnp.tan(t * math.pi / 2))
    return self._vp_d_log_mean(t)

  def compute_drift(self, x, t):
    """(drift_mean, drift_var) = (-(alpha_dot/alpha) x, g_t); VP: (-beta_t x / 2, beta_t / 2)."""
    if self.name == "VP":
      beta = VP_BETA_MIN + (1 - t) * (VP_BETA_MAX - VP_BETA_MIN)
      return -0.5 * beta * x, beta / 2
    ratio = self.d_alpha_alpha_ratio(t)
    s, ds = self.sigma(t)
    return -ratio * x, ratio * s ** 2 - s * ds

  def diffusion(self, x, t, form: str = "SBDM", norm: float = 1.0):
    """SDE diffusion coefficient w_t (the noise term is sqrt(2 w_t) dW)."""
    _check_choice("diffusion form", form, DIFFUSION_FORMS)
    if form == "constant":
      return jnp.full_like(t, norm)
    if form == "SBDM":
      return norm * self.compute_drift(x, t)[1]
    if form == "sigma":
      return norm * self.sigma(t)[0]
    if form == "linear":
      return norm * (1 - t)
    if form == "decreasing":
      return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
    # "increasing-decreasing": the official formula (keyed with a typo there, so unreachable).
    return norm * jnp.sin(math.pi * t) ** 2

  # --- conversions (official `get_*_from_*`)
  def score_from_velocity(self, v, x, t):
    a, da = self.alpha(t)
    s, ds = self.sigma(t)
    r = a / da
    return (r * v - x) / (s ** 2 - r * ds * s)

  def noise_from_velocity(self, v, x, t):
    a, da = self.alpha(t)
    s, ds = self.sigma(t)
    r = a / da
    return (r * v - x) / (r * ds - s)

  def velocity_from_score(self, score, x, t):
    drift_mean, drift_var = self.compute_drift(x, t)
    return drift_var * score - drift_mean

  def plan(self, t, x0, x1):
    """(x_t, u_t): the interpolant and its target velocity alpha_dot x1 + sigma_dot x0."""
    a, da = self.alpha(t)
    s, ds = self.sigma(t)
    return a * x1 + s * x0, da * x1 + ds * x0


# --------------------------------------------------------------------------- transport
@dataclasses.dataclass(frozen=True)
class Transport:
  """A path plus what the network predicts. Build with `create_transport`."""
  path_type: str = "Linear"
  prediction: str = "velocity"
  loss_weight: Optional[str] = None
  train_eps: float = 0.0
  sample_eps: float = 0.0

  def __post_init__(self):
    _check_choice("path", self.path_type, PATHS)
    _check_choice("prediction", self.prediction, PREDICTIONS)
    _check_choice("loss weight", self.loss_weight, LOSS_WEIGHTS)

  @property
  def path(self) -> Path:
    return Path(self.path_type)

  def check_interval(self, *, sde: bool = False, eval: bool = False, diffusion_form: str = "SBDM",
                     last_step_size: float = 0.0, reverse: bool = False) -> tuple[float, float]:
    """Integration / training-time interval [t0, t1] (official `Transport.check_interval`)."""
    t0, t1 = 0.0, 1.0
    eps = self.sample_eps if eval else self.train_eps
    last_free = (not sde) or last_step_size == 0
    if self.path_type == "VP":
      t1 = 1 - eps if last_free else 1 - last_step_size
    elif self.prediction != "velocity" or sde:
      t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
      t1 = 1 - eps if last_free else 1 - last_step_size
    if reverse:
      t0, t1 = 1 - t0, 1 - t1
    return float(t0), float(t1)

  # --- from one network output to drift / score (one evaluation serves both)
  def ode_drift(self, out, x, t):
    """Probability-flow drift from the network output `out` at (x, t); t is (B,)."""
    if self.prediction == "velocity":
      return out
    tt = _expand(t, x)
    drift_mean, drift_var = self.path.compute_drift(x, tt)
    return -drift_mean + drift_var * self.score(out, x, t)

  def score(self, out, x, t):
    """Score grad log p_t(x) from the network output."""
    tt = _expand(t, x)
    if self.prediction == "velocity":
      return self.path.score_from_velocity(out, x, tt)
    if self.prediction == "score":
      return out
    return out / -self.path.sigma(tt)[0]

  def drift_and_score(self, out, x, t):
    return self.ode_drift(out, x, t), self.score(out, x, t)

  # --- training
  def sample_t(self, rng, batch: int):
    """Training times t ~ U[t0, t1] (B,), float32."""
    t0, t1 = self.check_interval()
    return jax.random.uniform(rng, (batch,), jnp.float32) * (t1 - t0) + t0

  def loss_weight_fn(self, x, t):
    """Per-element loss weight (broadcast to x); 1 for the velocity prediction."""
    if self.prediction == "velocity" or self.loss_weight is None:
      return jnp.ones((), jnp.float32)
    tt = _expand(t, x)
    _, drift_var = self.path.compute_drift(x, tt)
    sigma = self.path.sigma(tt)[0]
    if self.loss_weight == "velocity":
      return (drift_var / sigma) ** 2
    return drift_var / sigma ** 2

  def per_sample_loss(self, out, x0, x1, t):
    """Loss per sample (B,), mean over H, W, C (the official `terms['loss']`)."""
    tt = _expand(t, x1)
    xt, ut = self.path.plan(tt, x0, x1)
    del xt
    if self.prediction == "velocity":
      err = (out - ut) ** 2
    else:
      w = self.loss_weight_fn(x1, t)
      if self.prediction == "noise":
        err = w * (out - x0) ** 2
      else:
        err = w * (out * self.path.sigma(tt)[0] + x0) ** 2
    return err.reshape(err.shape[0], -1).mean(axis=1)


def create_transport(path_type: str = "Linear", prediction: str = "velocity",
                     loss_weight: Optional[str] = None, train_eps: Optional[float] = None,
                     sample_eps: Optional[float] = None) -> Transport:
  """Official `create_transport` defaults for the epsilons.

  VP: train 1e-5, sample 1e-3. Linear/GVP with a score or noise prediction: 1e-3 / 1e-3.
  Linear/GVP with velocity: 0 / 0. Each eps defaults independently (the fix of SiT PR #32).
  Deviation: the official code silently replaces explicit eps with 0 for Linear/GVP + velocity; here
  an explicitly passed value is kept.
  """
  if loss_weight in ("none", "None"):
    loss_weight = None
  _check_choice("path", path_type, PATHS)
  _check_choice("prediction", prediction, PREDICTIONS)
  _check_choice("loss weight", loss_weight, LOSS_WEIGHTS)
  if path_type == "VP":
    dt, ds = 1e-5, 1e-3
  elif prediction != "velocity":
    dt, ds = 1e-3, 1e-3
  else:
    dt, ds = 0.0, 0.0
  return Transport(path_type, prediction, loss_weight,
                   float(dt if train_eps is None else train_eps),
                   float(ds if sample_eps is None else sample_eps))


# --------------------------------------------------------------------------- training loss
def make_loss_fn(model: Any, transport: Transport, *, train: bool = True,
                 apply_fn: Optional[Callable] = None):
  """Pure training loss for the trainer.

  Returns `loss_fn(params, x1, y, rng, t=None) -> (loss, aux)`:
    x1 (B, H, W, C) float data (latents), y (B,) int labels, rng a PRNG key, t (B,) optional
    given times (EDT's masked pass reuses the full pass's t; see edit_jax.diffusion.masked).
    `rng` is split as `k_t, k_noise, k_drop = jax.random.split(rng, 3)`: t ~ U[t0, t1] from k_t,
    x0 ~ N(0, I) from k_noise, and k_drop is passed as the "label_dropout" rng stream of the model
    (training mode, `model.apply(..., train=True)`; with `train=False` no dropout happens).
    loss: scalar, per-sample loss (mean over H, W, C) averaged over the batch.
    aux: {"loss_per_sample": (B,), "t": (B,)}.
  `apply_fn(params, x, t, y, train, rngs)` overrides the default `model.apply` call.
  """
  if apply_fn is None:
    def apply_fn(params, x, t, y, train, rngs):
      return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)

  def loss_fn(params, x1, y, rng, t=None):
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    x1 = jnp.asarray(x1, jnp.float32)
    if t is None:
      t = transport.sample_t(k_t, x1.shape[0])
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
    xt, _ = transport.path.plan(_expand(t, x1), x0, x1)
    out = apply_fn(params, xt, t, y, train, {"label_dropout": k_drop})
    if out.shape != x1.shape:
      raise ValueError(f"model output {out.shape} does not match the input {x1.shape}")
    per = transport.per_sample_loss(out.astype(jnp.float32), x0, x1, t)
    return per.mean(), {"loss_per_sample": per, "t": t}

  return loss_fn
