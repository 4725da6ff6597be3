"""DiT's discrete-time Gaussian diffusion (facebookresearch/DiT `diffusion/`) in JAX.

The same maths as the official `gaussian_diffusion.py`, `respace.py` and `diffusion_utils.py`
(which DiT took from ADM / improved-diffusion); `tests/test_gaussian_parity.py` checks every piece
against tensors from the official code. docs/diffusion.md is the user guide.

Conventions
  * Images are NHWC (B, H, W, C); the official code is NCHW. A model output with a learned
    variance has 2C channels on the LAST axis: epsilon (or x0) first, then the variance values v.
  * `t` is an int (B,) index into THIS diffusion's chain, 0 = least noisy. A respaced diffusion
    (e.g. "25" or "ddim50") calls the network with the ORIGINAL timestep `timestep_map[t]`
    (official `_WrappedModel`), so every chain drives the same network trained on 0..T-1.
  * `model_fn(x, t_model, y) -> out`: x (B, H, W, C), t_model (B,) float32 original timesteps,
    y (B,) int labels; out (B, H, W, C) or (B, H, W, 2C). The SiT/DiT backbone is called with
    `full_output=True` (`flax_model_fn`) so the variance half is kept.
  * Schedules are float64 numpy arrays on the host (as the official object holds them); every
    coefficient is gathered and cast to float32 before it multiplies a tensor, as the official
    `_extract_into_tensor` does. Tensors are float32.

Pieces (official names):
  get_named_beta_schedule("linear" | "squaredcos_cap_v2", T)    betas, float64 (T,)
  space_timesteps(T, "25" | "ddim50" | "100,50" | [..])          the kept original timesteps
  create_diffusion(timestep_respacing, ...)                      DiT's factory, same defaults
  GaussianDiffusion.q_sample / q_mean_variance / q_posterior_mean_variance / p_mean_variance /
    training_losses (loss, mse, vb) / p_sample / ddim_sample / ddim_reverse_sample
  sample_loop(...)                  DDPM or DDIM(eta) as ONE lax.scan (jit it; see make_sample_fn)
  make_loss_fn(model, diffusion)    the trainer's loss (t ~ U{0..T-1}, as DiT's train.py)
  GaussianSamplerConfig, program, make_step     fixed-step programs for the dynamic mediator
                                                schedule and FLOPs accounting (like `samplers`)

Model types (DiT's `create_diffusion` flags): mean "epsilon" (default) | "start_x"
(predict_xstart); variance "learned_range" (learn_sigma, default) | "fixed_large" | "fixed_small"
(sigma_small) | "learned"; loss "mse" (default) | "rescaled_mse" (rescale_learned_sigmas) | "kl" |
"rescaled_kl" (use_kl). Not ported: classifier guidance (`cond_fn`), `calc_bpd_loop`, and the
PREVIOUS_X mean type (unreachable from `create_diffusion`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.diffusion import guidance
from edit_jax.diffusion import samplers as samplers_lib

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "learned", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")
METHODS = ("ddpm", "ddim")

ModelFn = Callable  # (x (B,H,W,C), t_model (B,) float32, y (B,)) -> (B,H,W,C or 2C)


def _choice(kind: str, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}: expected one of {list(choices)}")


# --------------------------------------------------------------------------- schedules
def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Betas discretizing a cumulative alpha_bar(t), t in [0, 1] (official, float64)."""
  betas = []
  for i in range(num_diffusion_timesteps):
    t1 = i / num_diffusion_timesteps
    t2 = (i + 1) / num_diffusion_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """float64 (T,) betas. "linear": DDPM's 1e-4 .. 2e-2 scaled by 1000 / T (DiT's default);
  "squaredcos_cap_v2": the improved-DDPM cosine schedule."""
  _choice("noise schedule", schedule_name, NOISE_SCHEDULES)
  t = int(num_diffusion_timesteps)
  if t != num_diffusion_timesteps or t < 2:
    raise ValueError(f"diffusion_steps={num_diffusion_timesteps} must be an int >= 2 (DiT: 1000)")
  if schedule_name == "linear":
    if t <= 20:
      raise ValueError(f"the linear schedule scaled to diffusion_steps={t} ends at beta = 20 / "
                       f"{t} >= 1: use diffusion_steps > 20 or 'squaredcos_cap_v2'")
    scale = 1000 / t
    return np.linspace(scale * 0.0001, scale * 0.02, t, dtype=np.float64)
  return betas_for_alpha_bar(t, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set:
  """Original timesteps kept by a respacing (official `space_timesteps`).

  section_counts: "ddimN" (the DDIM paper's integer stride: the first stride s with
  len(range(0, T, s)) == N; it starts at 0 and need not end at T - 1), or "N" / "N1,N2,..." /
  a list of ints: the T steps are cut into equal sections (the first T % k one longer) and section
  i keeps N_i steps at rounded fractional strides (Python's round: half to even), ends included.
  "" or None keeps all T steps.
  """
  t = int(num_timesteps)
  if section_counts is None or (isinstance(section_counts, str) and section_counts.strip() == ""):
    return set(range(t))
  if isinstance(section_counts, str):
    s = section_counts.strip()
    if s.startswith("ddim"):
      try:
        desired = int(s[len("ddim"):])
      except ValueError:
        raise ValueError(f"timestep respacing {section_counts!r}: expected 'ddimN' with an "
                         f"integer N, e.g. 'ddim50'") from None
      if desired < 2:
        raise ValueError(f"timestep respacing {section_counts!r}: a chain needs >= 2 steps")
      for i in range(1, t):
        if len(range(0, t, i)) == desired:
          return set(range(0, t, i))
      raise ValueError(f"timestep respacing {section_counts!r}: cannot create exactly {desired} "
                       f"steps out of {t} with an integer stride; use a plain count like "
                       f"'{desired}' (fractional strides) instead")
    try:
      section_counts = [int(x) for x in s.split(",")]
    except ValueError:
      raise ValueError(f"timestep respacing {section_counts!r}: expected '', 'N', 'N1,N2,...' "
                       f"or 'ddimN' (e.g. '250', 'ddim50', '100,50')") from None
  counts = [int(c) for c in section_counts]
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f"timestep respacing {section_counts!r}: every section needs >= 1 step")
  size_per = t // len(counts)
  extra = t % len(counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"timestep respacing {section_counts!r}: cannot divide a section of {size} "
                       f"steps into {section_count} (the chain has {t} steps in "
                       f"{len(counts)} sections)")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      all_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    start_idx += size
  steps = set(all_steps)
  if len(steps) < 2:
    raise ValueError(f"timestep respacing {section_counts!r} keeps {len(steps)} step(s): a "
                     f"sampling chain needs >= 2")
  return steps


def _as_respacing_str(timestep_respacing) -> str:
  if timestep_respacing is None:
    return ""
  if isinstance(timestep_respacing, str):
    return timestep_respacing.strip()
  return ",".join(str(int(c)) for c in timestep_respacing)


# --------------------------------------------------------------------------- elementwise helpers
def mean_flat(x):
  """Mean over every axis but the first: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (official)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the official code,
  0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return _cdf_tails(x)[0]


def _cdf_tails(x):
  """(cdf, 1 - cdf) of the official tanh approximation, each to float32 relative precision:
  0.5 (1 + tanh z) = sigmoid(2z) and 1 - that = sigmoid(-2z) (`jax.nn.sigmoid`: saturates without
  overflow, and so does its gradient)."""
  z = np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x ** 3)
  return jax.nn.sigmoid(2.0 * z), jax.nn.sigmoid(-2.0 * z)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """Log-likelihood of data x in [-1, 1] (8-bit bins of width 2/255) under N(means, e^2log_scales),
  elementwise, in nats (official formula; edge bins extend to -inf / +inf).

  Numerics: the official float32 code takes the bin mass as cdf(x + 1/255) - cdf(x - 1/255) with
  both CDFs near 1 in the upper tail, so tiny masses lose all digits and their logs move by up
  to ~0.1 with one rounding step (the README of tests/golden/dit_diffusion measures 9.8e-5 bits
  on the mean t = 0 term against float64). Here tails are differenced in the form that keeps
  their digits (upper tail: (1 - cdf_min) - (1 - cdf_plus)), so the result is the float64 value
  to float32 precision and does not depend on how XLA fuses the expression.
  """
  if not x.shape == means.shape == log_scales.shape:
    raise ValueError(f"shapes differ: x {x.shape}, means {means.shape}, log_scales "
                     f"{log_scales.shape}")
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
  min_in = inv_stdv * (centered_x - 1.0 / 255.0)
  cdf_plus, upper_plus = _cdf_tails(plus_in)
  cdf_min, upper_min = _cdf_tails(min_in)
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(upper_min, 1e-12))
  cdf_delta = jnp.where(min_in >= 0, upper_min - upper_plus, cdf_plus - cdf_min)
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min,
                             jnp.log(jnp.maximum(cdf_delta, 1e-12))))


class PMeanVariance(NamedTuple):
  """p(x_{t-1} | x_t): each (B, H, W, C) float32."""
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_xstart: jax.Array


# --------------------------------------------------------------------------- the diffusion
class GaussianDiffusion:
  """A (possibly respaced) discrete Gaussian diffusion; official `SpacedDiffusion`.

  Args:
    base_betas: float64 (T,) betas of the ORIGINAL chain (e.g. `get_named_beta_schedule`).
    use_timesteps: original timesteps to keep (None: all T). The respaced chain has betas
      1 - abar_{k_i} / abar_{k_{i-1}} over the kept k_0 < k_1 < ... (`timestep_map`).
    model_mean_type, model_var_type, loss_type: see the module docstring.
  Attributes (float64 numpy, length S = number of kept steps, as the official object): betas,
  alphas_cumprod, alphas_cumprod_prev, alphas_cumprod_next, sqrt_alphas_cumprod,
  sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
  sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
  posterior_mean_coef1, posterior_mean_coef2; timestep_map int64 (S,); num_timesteps = S;
  original_num_steps = T. Instances are immutable; methods are pure and jit-traceable.
  """

  def __init__(self, base_betas, use_timesteps=None, *, model_mean_type: str = "epsilon",
               model_var_type: str = "learned_range", loss_type: str = "mse",
               respacing: str = ""):
    _choice("model mean type", model_mean_type, MEAN_TYPES)
    _choice("model variance type", model_var_type, VAR_TYPES)
    _choice("loss type", loss_type, LOSS_TYPES)
    base = np.asarray(base_betas, dtype=np.float64)
    if base.ndim != 1 or base.size < 2 or not np.all((base > 0) & (base < 1)):
      raise ValueError("base_betas must be a 1-D array of >= 2 values in (0, 1)")
    self.base_betas = base
    self.model_mean_type, self.model_var_type, self.loss_type = (model_mean_type, model_var_type,
                                                                 loss_type)
    self.respacing = respacing
    self.original_num_steps = int(base.size)
    keep = set(range(base.size)) if use_timesteps is None else {int(i) for i in use_timesteps}
    if not keep or min(keep) < 0 or max(keep) >= base.size:
      raise ValueError(f"use_timesteps must be a non-empty subset of 0..{base.size - 1}")
    # respace (official SpacedDiffusion.__init__)
    base_ac = np.cumprod(1.0 - base, axis=0)
    last, new_betas, tmap = 1.0, [], []
    for i, ac in enumerate(base_ac):
      if i in keep:
        new_betas.append(1 - ac / last)
        last = ac
        tmap.append(i)
    self.timestep_map = np.asarray(tmap, dtype=np.int64)
    betas = np.asarray(new_betas, dtype=np.float64)
    if betas.size < 2:
      raise ValueError("a diffusion chain needs >= 2 steps")
    self.betas = betas
    self.num_timesteps = int(betas.size)
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                               / (1.0 - self.alphas_cumprod))
    # log of the posterior variance, clipped: its value at t = 0 is 0, so t = 0 uses t = 1's.
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))
    self.log_betas = np.log(betas)
    large = np.append(self.posterior_variance[1], betas[1:])
    self._fixed = {"fixed_large": (large, np.log(large)),
                   "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped)}

  # ------------------------------------------------------------------------- construction
  def respace(self, timestep_respacing) -> "GaussianDiffusion":
    """The same diffusion on another chain of the ORIGINAL steps ("" = all, "50", "ddim25")."""
    r = _as_respacing_str(timestep_respacing)
    keep = space_timesteps(self.original_num_steps, r or [self.original_num_steps])
    return GaussianDiffusion(self.base_betas, keep, model_mean_type=self.model_mean_type,
                             model_var_type=self.model_var_type, loss_type=self.loss_type,
                             respacing=r)

  @property
  def learned_variance(self) -> bool:
    return self.model_var_type in ("learned", "learned_range")

  def model_channels(self, channels: int) -> int:
    """Channels the network must output for C data channels: 2C with a learned variance."""
    return 2 * channels if self.learned_variance else channels

  def describe(self) -> dict:
    return {"num_timesteps": self.num_timesteps, "original_num_steps": self.original_num_steps,
            "respacing": self.respacing, "model_mean_type": self.model_mean_type,
            "model_var_type": self.model_var_type, "loss_type": self.loss_type}

  def __repr__(self):
    return f"GaussianDiffusion({self.describe()})"

  # ------------------------------------------------------------------------- helpers
  @staticmethod
  def _extract(arr: np.ndarray, t, x):
    """arr[t] as float32 (official `_extract_into_tensor`), shaped (B, 1, ..) to broadcast on x."""
    res = jnp.asarray(np.asarray(arr, np.float32))[jnp.asarray(t)]
    return res.reshape(res.shape + (1,) * (x.ndim - res.ndim))

  def model_timesteps(self, t):
    """Chain indices (B,) -> original timesteps (B,) float32, the time the network sees."""
    return jnp.asarray(self.timestep_map.astype(np.float32))[jnp.asarray(t)]

  def _check_output(self, out, x):
    want = self.model_channels(x.shape[-1])
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != want:
      hint = (" (a learned variance needs the learned-sigma channels: build the model with "
              "learn_sigma=True and call it with full_output=True)" if self.learned_variance
              else " (fixed variance: build the model with learn_sigma=False)")
      raise ValueError(f"model output {tuple(out.shape)} does not fit x {tuple(x.shape)}: the "
                       f"{self.model_var_type} variance needs {want} channels (NHWC){hint}")

  # ------------------------------------------------------------------------- forward process
  def q_mean_variance(self, x_start, t):
    """(mean, variance, log_variance) of q(x_t | x_0)."""
    mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
    log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
    return mean, jnp.broadcast_to(variance, x_start.shape), jnp.broadcast_to(log_variance,
                                                                             x_start.shape)

  def q_sample(self, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    if noise.shape != x_start.shape:
      raise ValueError(f"noise {noise.shape} must have the shape of x_start {x_start.shape}")
    return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """(mean, variance, log_variance_clipped) of q(x_{t-1} | x_t, x_0)."""
    mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
    variance = jnp.broadcast_to(self._extract(self.posterior_variance, t, x_t), x_t.shape)
    log_var = jnp.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, x_t),
                               x_t.shape)
    return mean, variance, log_var

  def predict_xstart_from_eps(self, x_t, t, eps):
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

  # ------------------------------------------------------------------------- reverse process
  def p_mean_variance_from_output(self, model_output, x, t, clip_denoised: bool = True,
                                  denoised_fn: Optional[Callable] = None) -> PMeanVariance:
    """p(x_{t-1} | x_t) from a network output already computed at (x, timestep_map[t])."""
    self._check_output(model_output, x)
    c = x.shape[-1]
    if self.learned_variance:
      model_output, v = model_output[..., :c], model_output[..., c:]
      if self.model_var_type == "learned":
        log_variance = v
      else:
        min_log = self._extract(self.posterior_log_variance_clipped, t, x)
        max_log = self._extract(self.log_betas, t, x)
        frac = (v + 1) / 2  # v in [-1, 1] interpolates between the two bounds
        log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      var_arr, log_arr = self._fixed[self.model_var_type]
      variance = jnp.broadcast_to(self._extract(var_arr, t, x), x.shape)
      log_variance = jnp.broadcast_to(self._extract(log_arr, t, x), x.shape)

    def process_xstart(a):
      if denoised_fn is not None:
        a = denoised_fn(a)
      return jnp.clip(a, -1, 1) if clip_denoised else a

    if self.model_mean_type == "start_x":
      pred_xstart = process_xstart(model_output)
    else:
      pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, model_output))
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)

  def p_mean_variance(self, model_fn: ModelFn, x, t, y, clip_denoised: bool = True,
                      denoised_fn: Optional[Callable] = None) -> PMeanVariance:
    """Calls `model_fn(x, timestep_map[t], y)` and returns p(x_{t-1} | x_t) (official defaults:
    clip_denoised=True; DiT's sample.py passes False)."""
    out = model_fn(x, self.model_timesteps(t), y)
    return self.p_mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)

  def p_sample(self, model_fn: ModelFn, x, t, y, noise, clip_denoised: bool = True,
               denoised_fn: Optional[Callable] = None):
    """One ancestral step: (sample, pred_xstart); no noise is added where t == 0."""
    out = self.p_mean_variance(model_fn, x, t, y, clip_denoised, denoised_fn)
    return self._p_sample_update(out, t, noise), out.pred_xstart

  def _p_sample_update(self, out: PMeanVariance, t, noise):
    nonzero = (jnp.asarray(t) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (noise.ndim - 1))
    return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise

  def ddim_sample(self, model_fn: ModelFn, x, t, y, noise=None, eta: float = 0.0,
                  clip_denoised: bool = True, denoised_fn: Optional[Callable] = None):
    """One DDIM step (eta = 0: deterministic): (sample, pred_xstart). `noise` is needed when
    eta > 0 (unused otherwise)."""
    out = self.p_mean_variance(model_fn, x, t, y, clip_denoised, denoised_fn)
    return self._ddim_update(out, x, t, noise, eta), out.pred_xstart

  def _ddim_update(self, out: PMeanVariance, x, t, noise, eta: float):
    eps = self.predict_eps_from_xstart(x, t, out.pred_xstart)
    alpha_bar = self._extract(self.alphas_cumprod, t, x)
    alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
    sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean_pred = out.pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(
        1 - alpha_bar_prev - sigma ** 2) * eps
    if noise is None:
      if eta != 0:
        raise ValueError(f"ddim_sample with eta={eta} > 0 needs noise")
      return mean_pred
    nonzero = (jnp.asarray(t) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return mean_pred + nonzero * sigma * noise

  def ddim_reverse_sample(self, model_fn: ModelFn, x, t, y, clip_denoised: bool = True,
                          denoised_fn: Optional[Callable] = None):
    """One deterministic DDIM step towards noise (x_t -> x_{t+1}, for inversion):
    (sample, pred_xstart)."""
    out = self.p_mean_variance(model_fn, x, t, y, clip_denoised, denoised_fn)
    eps = self.predict_eps_from_xstart(x, t, out.pred_xstart)
    abar_next = self._extract(self.alphas_cumprod_next, t, x)
    return out.pred_xstart * jnp.sqrt(abar_next) + jnp.sqrt(1 - abar_next) * eps, out.pred_xstart

  # ------------------------------------------------------------------------- losses
  def vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised: bool = True):
    """(B,) variational-bound term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0 and
    the discretized decoder NLL at t == 0; also returns pred_xstart."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, means=out.mean,
                                               log_scales=0.5 * out.log_variance)
    nll = mean_flat(nll) / np.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl), out.pred_xstart

  def training_losses_from_output(self, model_output, x_start, x_t, t, noise) -> dict:
    """Per-sample loss terms (B,) from the network output at (x_t, timestep_map[t]).

    "mse": mean over H, W, C of (target - prediction)^2 (target: the noise, or x_0 with
    start_x); "vb" (learned variance only): the bound term of a model whose mean is frozen
    (stop_gradient), so it trains the variance only; "loss" = mse + vb (official `MSE` loss).
    KL losses: "loss" = the bound term (x num_timesteps for rescaled_kl).
    """
    if self.loss_type in ("kl", "rescaled_kl"):
      vb, _ = self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=False)
      if self.loss_type == "rescaled_kl":
        vb = vb * self.num_timesteps
      return {"loss": vb}
    self._check_output(model_output, x_t)
    c = x_t.shape[-1]
    terms = {}
    if self.learned_variance:
      pred, v = model_output[..., :c], model_output[..., c:]
      frozen = jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1)
      vb, _ = self.vb_terms_bpd_from_output(frozen, x_start, x_t, t, clip_denoised=False)
      if self.loss_type == "rescaled_mse":
        vb = vb * (self.num_timesteps / 1000.0)
      terms["vb"] = vb
    else:
      pred = model_output
    target = x_start if self.model_mean_type == "start_x" else noise
    terms["mse"] = mean_flat((target - pred) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms

  def training_losses(self, model_fn: ModelFn, x_start, t, y, noise) -> dict:
    """Official `training_losses`: x_t = q_sample(x_start, t, noise), one network call at
    (x_t, timestep_map[t], y); returns the per-sample terms (see `training_losses_from_output`)."""
    x_t = self.q_sample(x_start, t, noise)
    out = model_fn(x_t, self.model_timesteps(t), y)
    return self.training_losses_from_output(out, x_start, x_t, t, noise)


def create_diffusion(timestep_respacing="", noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
  """DiT's `create_diffusion` (same arguments and defaults): linear schedule, 1000 steps,
  epsilon prediction, learned-range variance, MSE (+ vb) loss. "" respacing = all steps."""
  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = "rescaled_kl"
  elif rescale_learned_sigmas:
    loss_type = "rescaled_mse"
  else:
    loss_type = "mse"
  var = ("learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large"))
  base = GaussianDiffusion(betas, None, model_mean_type="start_x" if predict_xstart else "epsilon",
                           model_var_type=var, loss_type=loss_type)
  r = _as_respacing_str(timestep_respacing)
  return base.respace(r) if r else base


# Settings a run records (config.diffusion / converted checkpoints); learn_sigma is the model's.
DIFFUSION_DEFAULTS = dict(noise_schedule="linear", diffusion_steps=1000, use_kl=False,
                          sigma_small=False, predict_xstart=False, rescale_learned_sigmas=False)


def diffusion_from_settings(settings: Optional[dict], learn_sigma: bool,
                            timestep_respacing="") -> GaussianDiffusion:
  """`create_diffusion` from a settings dict (keys of DIFFUSION_DEFAULTS; missing ones default)."""
  s = dict(DIFFUSION_DEFAULTS)
  unknown = set(settings or {}) - set(s)
  if unknown:
    raise ValueError(f"unknown diffusion settings {sorted(unknown)}; valid: {sorted(s)}")
  s.update(settings or {})
  return create_diffusion(timestep_respacing, learn_sigma=bool(learn_sigma), **s)


# --------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class GaussianSamplerConfig:
  """DDPM (ancestral) or DDIM sampling of a Gaussian diffusion.

  method: "ddpm" | "ddim". num_steps: chain length when respacing is "" (DiT's sample.py:
  `create_diffusion(str(num_steps))`). respacing: an explicit chain ("ddim50", "100,50", ...),
  which then decides the step count. eta: DDIM noise (0 = deterministic). clip_denoised: clip
  the predicted x0 to [-1, 1] (DiT's sample.py: False, as latents are unbounded).
  """
  method: str = "ddpm"
  num_steps: int = 250
  eta: float = 0.0
  clip_denoised: bool = False
  respacing: str = ""

  kind = "gaussian"
  fixed = True

  def validate(self) -> "GaussianSamplerConfig":
    m = str(self.method).lower()
    _choice("Gaussian-diffusion sampler", m, METHODS)
    r = _as_respacing_str(self.respacing)
    if not r and (int(self.num_steps) != self.num_steps or self.num_steps < 2):
      raise ValueError(f"num_steps={self.num_steps}: a DDPM/DDIM chain needs >= 2 steps")
    if not 0.0 <= float(self.eta) <= 1.0:
      raise ValueError(f"eta={self.eta} must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    if m == "ddpm" and self.eta:
      raise ValueError(f"eta={self.eta} is a DDIM option: use method='ddim' (DDPM draws its own "
                       f"noise)")
    return dataclasses.replace(self, method=m, respacing=r, eta=float(self.eta),
                               num_steps=int(self.num_steps))

  @property
  def stochastic(self) -> bool:
    """Whether steps draw noise (DDPM, or DDIM with eta > 0)."""
    return self.method == "ddpm" or self.eta > 0

  @property
  def chain(self) -> str:
    """The respacing string this sampler uses."""
    return self.respacing or str(int(self.num_steps))


def for_sampling(diffusion: GaussianDiffusion, cfg: GaussianSamplerConfig) -> GaussianDiffusion:
  """The respaced diffusion a sampler config runs on (always respaced from the original chain)."""
  cfg = cfg.validate()
  if cfg.chain == diffusion.respacing:
    return diffusion
  return diffusion.respace(cfg.chain)


def program(diffusion: GaussianDiffusion, cfg: GaussianSamplerConfig) -> samplers_lib.Program:
  """The fixed-step program (`samplers.Program`): step k runs at chain index t[k] = S-1-k (dt 0,
  one network evaluation per step, no last step)."""
  d = for_sampling(diffusion, cfg)
  s = d.num_timesteps
  idx = np.arange(s - 1, -1, -1).astype(np.float32)
  return samplers_lib.Program(idx, np.zeros(s, np.float32), None, 0.0, 1, 0)


def make_step(diffusion: GaussianDiffusion, cfg: GaussianSamplerConfig) -> Callable:
  """`step(model_fn, x, y, t, dt, noise, is_last=None) -> x_next` with the `samplers.make_step`
  signature: t is the chain index (scalar, may be traced), dt and is_last are ignored, noise
  (B, H, W, C) is used by DDPM / DDIM with eta > 0."""
  cfg = cfg.validate()
  d = for_sampling(diffusion, cfg)
  one = _make_one_step(d, cfg)

  def step(model_fn, x, y, t, dt=None, noise=None, is_last=None):
    del dt, is_last
    return one(model_fn, x, y, jnp.asarray(t).astype(jnp.int32), noise)[0]

  return step


def _make_one_step(d: GaussianDiffusion, cfg: GaussianSamplerConfig):
  def one(model_fn, x, y, i, noise):
    tb = jnp.full((x.shape[0],), i, jnp.int32)
    out = d.p_mean_variance(model_fn, x, tb, y, cfg.clip_denoised)
    if cfg.method == "ddpm":
      return d._p_sample_update(out, tb, noise), out.pred_xstart
    return d._ddim_update(out, x, tb, noise if cfg.eta > 0 else None, cfg.eta), out.pred_xstart
  return one


class Trajectory(NamedTuple):
  sample: jax.Array       # (S, B, H, W, C) state after each step (last = final)
  pred_xstart: jax.Array  # (S, B, H, W, C) the x0 prediction of each step


def sample_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, cfg: GaussianSamplerConfig,
                x_T, y, rng=None, *, noises=None, return_trajectory: bool = False):
  """DDPM / DDIM from x_T (B, H, W, C) down to x_0 as ONE `lax.scan` (call it under jit).

  Step k (k = 0 first) runs at chain index S-1-k (model time timestep_map[S-1-k]). Noise: for
  stochastic samplers either `rng` (one key, or B per-sample keys: step k of sample i draws
  normal(fold_in(key_i, k)), so a sample does not depend on its batch, as `samplers`) or
  `noises` (S, B, H, W, C), e.g. recorded from the official code. Returns `samplers.Sample`
  (x, nfe), plus a `Trajectory` when return_trajectory.
  """
  cfg = cfg.validate()
  d = for_sampling(diffusion, cfg)
  s = d.num_timesteps
  x_T = jnp.asarray(x_T, jnp.float32)
  keys = None
  if cfg.stochastic and noises is None:
    if rng is None:
      raise ValueError(f"{cfg.method} sampling{' with eta > 0' if cfg.method == 'ddim' else ''}"
                       " needs rng (a PRNG key or one key per sample) or recorded noises")
    keys = samplers_lib.per_sample_keys(rng, x_T.shape[0])
  if noises is not None:
    noises = jnp.asarray(noises, jnp.float32)
    if noises.shape != (s,) + x_T.shape:
      raise ValueError(f"noises must be (num_steps={s},) + x_T.shape = {(s,) + x_T.shape}, got "
                       f"{noises.shape}")
  one = _make_one_step(d, cfg)

  def body(x, inp):
    k, i, nz = inp
    if cfg.stochastic and nz is None:
      nz = samplers_lib.step_noise(keys, k, x.shape[1:])
    x_next, pred = one(model_fn, x, y, i, nz)
    return x_next, (x_next, pred) if return_trajectory else None

  ks = jnp.arange(s, dtype=jnp.int32)
  idx = jnp.arange(s - 1, -1, -1, dtype=jnp.int32)
  x, traj = jax.lax.scan(body, x_T, (ks, idx, noises))
  res = samplers_lib.Sample(x, jnp.int32(s))
  if return_trajectory:
    return res, Trajectory(*traj)
  return res


# --------------------------------------------------------------------------- flax glue
def flax_model_fn(model, variables) -> ModelFn:
  """`model_fn(x, t, y)` of a SiT/DiT linen module in eval mode with ALL output channels."""
  return lambda x, t, y: model.apply(variables, x, t, y, full_output=True)


def resolve_guide_channels(guide_channels: Optional[int], channels: int) -> int:
  """Channels that guidance acts on for a C-channel model: None (all) -> C; k > C -> C. The
  variance channels are never guided (they keep the conditional output, as DiT's
  `forward_with_cfg` keeps `model_out[:, 3:]` for 4-channel latents)."""
  if guide_channels is None:
    return int(channels)
  return int(min(int(guide_channels), channels))


def check_guidance(cfg_scale: float, guide_channels: Optional[int], guidance_interval=None):
  """`guidance.check_guidance`, and no guidance interval (it is defined on the transport's time)."""
  guidance.check_guidance(cfg_scale, guide_channels, None)
  if guidance_interval is not None:
    raise ValueError("guidance_interval is defined on the transport's time t in [0, 1]; it is "
                     "not available with the Gaussian objective (drop --guidance_interval)")


def guided_model_fn(model_fn: ModelFn, cfg_scale: float, null_class: int, channels: int,
                    guide_channels: Optional[int] = 3, guidance_interval=None) -> ModelFn:
  """Classifier-free guidance for the Gaussian objective (`edit_jax.diffusion.guidance`: one
  forward on the doubled batch, u + s (c - u) on the first guide channels; the variance channels
  keep the conditional output). channels: the data channels C."""
  check_guidance(cfg_scale, guide_channels, guidance_interval)
  return guidance.guided_model_fn(model_fn, cfg_scale, null_class,
                                  resolve_guide_channels(guide_channels, channels))


def make_sample_fn(model, diffusion: GaussianDiffusion, cfg: GaussianSamplerConfig, *,
                   cfg_scale: float = 1.0, null_class: Optional[int] = None,
                   guide_channels: Optional[int] = 3, guidance_interval=None) -> Callable:
  """Pure `f(params, x_T, y, rng=None) -> samplers.Sample` for a linen SiT/DiT; wrap in jax.jit.
  Guidance when cfg_scale > 1 (null_class defaults to model.num_classes)."""
  cfg = cfg.validate()
  d = for_sampling(diffusion, cfg)
  c = int(model.in_channels)
  if d.learned_variance != bool(getattr(model, "learn_sigma", d.learned_variance)):
    raise ValueError(f"the diffusion's {d.model_var_type} variance does not fit a model with "
                     f"learn_sigma={model.learn_sigma}: build the diffusion with "
                     f"learn_sigma={model.learn_sigma}")
  check_guidance(cfg_scale, guide_channels, guidance_interval)
  null_class = model.num_classes if null_class is None else null_class
  use_cfg = guidance.uses_guidance(cfg_scale)

  def f(params, x_T, y, rng=None):
    model_fn = flax_model_fn(model, samplers_lib.sampling_variables(model, params))
    if use_cfg:
      model_fn = guided_model_fn(model_fn, cfg_scale, null_class, c, guide_channels)
    return sample_loop(model_fn, d, cfg, x_T, y, rng)

  return f


def make_loss_fn(model: Any, diffusion: GaussianDiffusion, *, train: bool = True,
                 apply_fn: Optional[Callable] = None):
  """DiT's training loss: `loss_fn(params, x0, y, rng, t=None) -> (loss, aux)`.

  x0 (B, H, W, C) data, y (B,) labels; t (B,) optional given chain indices (EDT's masked pass
  reuses the full pass's t, `edit_jax.diffusion.masked`). `rng` is split as `k_t, k_noise, k_drop`: t ~ U{0..S-1}
  over the diffusion's chain (DiT trains on all 1000 steps), noise ~ N(0, I), k_drop is the
  model's "label_dropout" stream (train mode). loss: mean over the batch of terms["loss"].
  aux: {"loss_per_sample", "t" (chain index, int32), "mse", and "vb" with a learned variance}.
  `apply_fn(params, x, t_model, y, train, rngs)` overrides the model call; it must return all
  output channels (learned variance: 2C).
  """
  if apply_fn is None:
    def apply_fn(params, x, t, y, train, rngs):
      return model.apply({"params": params}, x, t, y, train=train, rngs=rngs, full_output=True)

  def loss_fn(params, x0, y, rng, t=None):
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    x0 = jnp.asarray(x0, jnp.float32)
    if t is None:
      t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(x0, t, noise)
    out = apply_fn(params, x_t, diffusion.model_timesteps(t), y, train, {"label_dropout": k_drop})
    terms = diffusion.training_losses_from_output(out.astype(jnp.float32), x0, x_t, t, noise)
    per = terms["loss"]
    aux = {"loss_per_sample": per, "t": t}
    aux.update({k: v for k, v in terms.items() if k != "loss"})
    return per.mean(), aux

  return loss_fn
