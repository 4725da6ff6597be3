"""ODE and SDE samplers for SiT transports (official `transport/integrators.py` semantics).

Model function: `model_fn(x, t, y) -> out`, x (B, H, W, C) NHWC float32, t (B,), y (B,) int; `out`
is what the network predicts (velocity / score / noise, per `Transport.prediction`). Guidance is a
wrapper around `model_fn` (`edit_jax.diffusion.guidance`). Samplers are pure and traceable: call them inside
`jax.jit` (see `make_sample_fn`). Every sampler takes the initial noise x0 (t = 0) explicitly, and
the SDE samplers a PRNG key (a single key or one key per sample).

ODE (`ODEConfig`):
  "euler", "heun2": fixed grid `linspace(t0, t1, num_steps)`, i.e. num_steps - 1 steps (torchdiffeq
  fixed-grid semantics; heun2 = explicit trapezoid, 2 evaluations per step). "dopri5": adaptive
  (diffrax Dopri5 + PID controller, atol / rtol as torchdiffeq's mixed error norm); num_steps is
  irrelevant for the final state (officially it is only the number of output points).
SDE (`SDEConfig`, defaults = the official CLI: Euler, sigma form, norm 1, Mean last step 0.04, 250):
  dx = [v + w_t s] dt + sqrt(2 w_t) dW on `linspace(t0, t1, num_steps)`, t1 = 1 - last_step_size:
  num_steps - 1 noisy steps with constant dt = grid[1] - grid[0], then a deterministic last step
  at t1 ("Mean": x + (v + w s) h; "Euler": x + v h; "Tweedie": x / alpha + sigma^2 / alpha s;
  None: x).
  Each step evaluates the network ONCE (drift and score come from the same output; the official
  code evaluates twice with identical results). "Heun" uses 2 evaluations per step.
Noise: step k of sample i draws `normal(fold_in(key_i, k), (H, W, C))`, with key_i =
`jax.random.split(rng, B)[i]` (or the given per-sample keys), so a sample's trajectory does not
depend on the other samples in the batch.

Fixed-step loops run in `lax.scan`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.diffusion import guidance
from edit_jax.diffusion.transport import DIFFUSION_FORMS, Transport

ODE_METHODS = ("euler", "heun2", "dopri5")
FIXED_ODE_METHODS = ("euler", "heun2")
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def _choice(kind, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}: expected one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class ODEConfig:
  method: str = "dopri5"
  num_steps: int = 250
  atol: float = 1e-6
  rtol: float = 1e-3
  max_steps: int = 16384  # dopri5 only: step budget before diffrax gives up
  end: str = "interpolate"  # dopri5 only: "interpolate" (torchdiffeq, official) or "clip"

  kind = "ode"

  def validate(self):
    m = {"heun": "heun2"}.get(self.method, self.method)
    _choice("ODE method", m, ODE_METHODS)
    if m in FIXED_ODE_METHODS and self.num_steps < 2:
      raise ValueError(f"num_steps={self.num_steps}: a fixed-grid ODE needs >= 2 grid points")
    _choice("dopri5 end mode", self.end, ("interpolate", "clip"))
    if self.atol <= 0 or self.rtol <= 0:
      raise ValueError(f"atol={self.atol}, rtol={self.rtol} must be > 0")
    return dataclasses.replace(self, method=m)

  @property
  def fixed(self) -> bool:
    return self.method in FIXED_ODE_METHODS


@dataclasses.dataclass(frozen=True)
class SDEConfig:
  method: str = "Euler"
  num_steps: int = 250
  diffusion_form: str = "sigma"
  diffusion_norm: float = 1.0
  last_step: Optional[str] = "Mean"
  last_step_size: float = 0.04

  kind = "sde"
  fixed = True

  def validate(self):
    m = {"euler": "Euler", "heun": "Heun"}.get(self.method, self.method)
    _choice("SDE method", m, SDE_METHODS)
    _choice("diffusion form", self.diffusion_form, DIFFUSION_FORMS)
    last = None if self.last_step in (None, "None", "none") else self.last_step
    _choice("last step", last, LAST_STEPS)
    if self.num_steps < 2:
      raise ValueError(f"num_steps={self.num_steps}: the SDE grid needs >= 2 points")
    size = 0.0 if last is None else self.last_step_size
    if last is not None and not 0 < size < 1:
      raise ValueError(f"last_step_size={self.last_step_size} must be in (0, 1)")
    return dataclasses.replace(self, method=m, last_step=last, last_step_size=size)


SamplerConfig = Any  # ODEConfig | SDEConfig


class Sample(NamedTuple):
  x: jax.Array    # (B, H, W, C) final state
  nfe: jax.Array  # () int32: network evaluations (each over the whole, possibly CFG-doubled, batch)


class Program(NamedTuple):
  """A fixed-step sampler unrolled on the host: step k runs at t[k] with size dt[k]."""
  t: np.ndarray          # (S,) float32
  dt: np.ndarray         # (S,) float32
  last_t: Optional[float]  # SDE last step time (None: no last step)
  last_h: float
  evals_per_step: int
  last_evals: int

  @property
  def num_steps(self) -> int:
    return len(self.t)

  def eval_times(self) -> np.ndarray:
    """Times at which the network is evaluated, in order (for FLOPs/guidance accounting)."""
    if self.evals_per_step == 2:
      ts = np.stack([self.t, self.t + self.dt], 1).reshape(-1)
    else:
      ts = self.t.copy()
    if self.last_evals:
      ts = np.concatenate([ts, [self.last_t]])
    return ts.astype(np.float32)

  @property
  def nfe(self) -> int:
    return self.evals_per_step * self.num_steps + self.last_evals


def _is_gaussian(cfg) -> bool:
  return getattr(cfg, "kind", None) == "gaussian"


def program(transport: Transport, cfg: SamplerConfig) -> Program:
  """Time grid of a fixed-step sampler (official `check_interval` + `linspace`).

  A `gaussian.GaussianSamplerConfig` (with a `GaussianDiffusion` in place of the transport) gets
  its DDPM/DDIM program from `edit_jax.diffusion.gaussian.program` (t = chain indices)."""
  if _is_gaussian(cfg):
    from edit_jax.diffusion import gaussian  # noqa: PLC0415  (gaussian imports this module)
    return gaussian.program(transport, cfg)
  cfg = cfg.validate()
  if cfg.kind == "ode":
    if not cfg.fixed:
      raise ValueError(f"ODE method {cfg.method!r} is adaptive: it has no fixed program")
    t0, t1 = transport.check_interval(sde=False, eval=True)
    grid = np.linspace(t0, t1, cfg.num_steps, dtype=np.float32)
    return Program(grid[:-1], (grid[1:] - grid[:-1]).astype(np.float32), None, 0.0,
                   2 if cfg.method == "heun2" else 1, 0)
  t0, t1 = transport.check_interval(sde=True, eval=True, diffusion_form=cfg.diffusion_form,
                                    last_step_size=cfg.last_step_size)
  if not t0 < t1:
    raise ValueError(f"SDE interval [{t0}, {t1}] is empty: lower last_step_size")
  if cfg.diffusion_form == "SBDM" and t0 == 0 and transport.path_type != "VP":
    raise ValueError(
        "diffusion_form='SBDM' has w_t = (alpha_dot/alpha) sigma^2 - sigma sigma_dot, infinite at "
        "t0 = 0, and this transport's sample_eps is 0 (the official default for Linear/GVP + "
        "velocity): pass sample_eps > 0 to create_transport (e.g. 1e-3) or use the 'sigma' form")
  grid = np.linspace(t0, t1, cfg.num_steps, dtype=np.float32)
  dt = np.float32(grid[1] - grid[0])
  return Program(grid[:-1], np.full(cfg.num_steps - 1, dt, np.float32),
                 None if cfg.last_step is None else float(t1), float(cfg.last_step_size),
                 2 if cfg.method == "Heun" else 1, 0 if cfg.last_step is None else 1)


# --------------------------------------------------------------------------- keys and noise
def per_sample_keys(rng, batch: int):
  """(B,) typed keys: a single key is split into B; a (B,) key array is used as is."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.shape == ():
    return jax.random.split(rng, batch)
  if rng.shape != (batch,):
    raise ValueError(f"rng must be one key or {batch} per-sample keys; got key shape {rng.shape}")
  return rng


def step_noise(keys, k, shape):
  """Standard normal noise (B, *shape) for step k, one independent stream per sample key."""
  return jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, k), shape, jnp.float32))(keys)


# --------------------------------------------------------------------------- one step
def make_step(transport: Transport, cfg: SamplerConfig) -> Callable:
  """`step(model_fn, x, y, t, dt, noise, is_last=None) -> x_next` for a fixed-step sampler
  (a Gaussian DDPM/DDIM config dispatches to `gaussian.make_step`: t is then the chain index).

  t, dt: scalars; noise: (B, H, W, C) standard normal (SDE) or None (ODE).
  `is_last` (SDE only): None -> a regular step; a traced bool -> the SDE last step when true (then
  t = t1 and dt = last_step_size), computed from the same first evaluation (used by the dynamic
  sampler so that one compiled function serves every step).
  """
  if _is_gaussian(cfg):
    from edit_jax.diffusion import gaussian  # noqa: PLC0415
    return gaussian.make_step(transport, cfg)
  cfg = cfg.validate()
  path = transport.path

  def full(t, x):
    return jnp.full((x.shape[0],), t, jnp.float32)

  def ode_f(model_fn, x, y, t):
    tb = full(t, x)
    return transport.ode_drift(model_fn(x, tb, y), x, tb)

  if cfg.kind == "ode":
    if cfg.method == "euler":
      def step(model_fn, x, y, t, dt, noise=None, is_last=None):
        return x + dt * ode_f(model_fn, x, y, t)
    else:  # heun2 (torchdiffeq tableau: c = [0, 1], b = [1/2, 1/2])
      def step(model_fn, x, y, t, dt, noise=None, is_last=None):
        k1 = ode_f(model_fn, x, y, t)
        k2 = ode_f(model_fn, x + dt * k1, y, t + dt)
        return x + dt * (0.5 * k1 + 0.5 * k2)
    return step

  def w_fn(x, t):
    return path.diffusion(x, t, cfg.diffusion_form, cfg.diffusion_norm)

  def evaluate(model_fn, x, y, t):
    """One network evaluation -> (ode drift, score, w_t)."""
    tb = full(t, x)
    drift, score = transport.drift_and_score(model_fn(x, tb, y), x, tb)
    return drift, score, w_fn(x, t)

  last_update = _last_update(transport, cfg)

  if cfg.method == "Euler":
    def step(model_fn, x, y, t, dt, noise, is_last=None):
      drift, score, w = evaluate(model_fn, x, y, t)
      x_next = x + (drift + w * score) * dt + jnp.sqrt(2 * w) * (noise * jnp.sqrt(dt))
      if is_last is None:
        return x_next
      return jnp.where(is_last, last_update(x, drift, score, w, t, dt), x_next)
    return step

  def step(model_fn, x, y, t, dt, noise, is_last=None):
    xhat = x + jnp.sqrt(2 * w_fn(x, t)) * (noise * jnp.sqrt(dt))
    if is_last is not None:
      xhat = jnp.where(is_last, x, xhat)
    d1, s1, w1 = evaluate(model_fn, xhat, y, t)
    k1 = d1 + w1 * s1

    def second(_):
      d2, s2, w2 = evaluate(model_fn, xhat + dt * k1, y, t + dt)
      return xhat + 0.5 * dt * (k1 + (d2 + w2 * s2))

    if is_last is None:
      return second(None)
    x_next = jax.lax.cond(is_last, lambda _: xhat, second, None)
    return jnp.where(is_last, last_update(x, d1, s1, w1, t, dt), x_next)
  return step


def _last_update(transport: Transport, cfg: SDEConfig) -> Callable:
  """(x, drift, score, w, t1, h) -> state after the SDE last step (from one evaluation at t1)."""
  path = transport.path

  def update(x, drift, score, w, t1, h):
    if cfg.last_step == "Mean":
      return x + (drift + w * score) * h
    if cfg.last_step == "Euler":
      return x + drift * h
    if cfg.last_step == "Tweedie":  # official: the first sample's alpha / sigma (all equal here)
      a = path.alpha(jnp.float32(t1))[0]
      s = path.sigma(jnp.float32(t1))[0]
      return x / a + s ** 2 / a * score
    return x
  return update


def make_last_step(transport: Transport, cfg: SamplerConfig) -> Callable:
  """`last(model_fn, x, y, t1, h) -> x` (SDE last step; identity for ODEs / last_step=None)."""
  cfg = cfg.validate()
  if cfg.kind == "ode" or cfg.last_step is None:
    return lambda model_fn, x, y, t1, h: x
  update = _last_update(transport, cfg)

  def last(model_fn, x, y, t1, h):
    tb = jnp.full((x.shape[0],), t1, jnp.float32)
    drift, score = transport.drift_and_score(model_fn(x, tb, y), x, tb)
    w = transport.path.diffusion(x, jnp.float32(t1), cfg.diffusion_form, cfg.diffusion_norm)
    return update(x, drift, score, w, t1, h)
  return last


# --------------------------------------------------------------------------- full samplers
def sample_fixed(model_fn, transport: Transport, cfg: SamplerConfig, x0, y, rng=None) -> Sample:
  """Fixed-step ODE (euler / heun2) or SDE (Euler / Heun) sampler as one `lax.scan`."""
  cfg = cfg.validate()
  prog = program(transport, cfg)
  step = make_step(transport, cfg)
  last = make_last_step(transport, cfg)
  x0 = jnp.asarray(x0, jnp.float32)
  if cfg.kind == "sde":
    if rng is None:
      raise ValueError("the SDE sampler needs rng (a PRNG key or one key per sample)")
    keys = per_sample_keys(rng, x0.shape[0])
  else:
    keys = None

  def body(x, inp):
    k, t, dt = inp
    noise = step_noise(keys, k, x.shape[1:]) if keys is not None else None
    return step(model_fn, x, y, t, dt, noise), None

  ks = jnp.arange(prog.num_steps, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, x0, (ks, jnp.asarray(prog.t), jnp.asarray(prog.dt)))
  if prog.last_evals:
    x = last(model_fn, x, y, prog.last_t, prog.last_h)
  return Sample(x, jnp.int32(prog.nfe))


def _rms(a):
  return jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))


def initial_step(f, t0, y0, f0, rtol, atol, order: int = 5):
  """torchdiffeq / Hairer's initial step size for an order-`order` embedded pair (1 more eval)."""
  scale = atol + jnp.abs(y0) * rtol
  d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
  small = (d0 < 1e-5) | (d1 < 1e-5)
  h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
  f1 = f(t0 + h0, y0 + h0 * f0)
  d2 = _rms((f1 - f0) / scale) / h0
  md = jnp.maximum(d1, d2)
  h1 = jnp.where(md <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / md) ** (1.0 / order))
  return jnp.minimum(100 * h0, h1)


def sample_dopri5(model_fn, transport: Transport, cfg: ODEConfig, x0, y) -> Sample:
  """Adaptive Dopri5 solve from t0 to t1 (diffrax), returning the state at t1.

  Matches torchdiffeq's `dopri5` as the official sampler calls it: Hairer's initial step,
  I-controller (safety 0.9, factors [0.2, 10]), RMS error norm with atol + rtol max(|y0|, |y1|),
  and (with cfg.end = "interpolate") the last step is NOT clipped at t1: it may step past t1 (the
  network is then evaluated at t > 1, as officially) and the state at t1 comes from the dense
  interpolant.
  cfg.end = "clip" lands the last step exactly on t1 instead.
  NFE = 2 (initial step: f(t0) and one probe) + 1 (first stage) + 6 per attempted step.
  """
  import diffrax  # noqa: PLC0415
  cfg = cfg.validate()
  t0, t1 = transport.check_interval(sde=False, eval=True)
  x0 = jnp.asarray(x0, jnp.float32)

  def f(t, x):
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    return transport.ode_drift(model_fn(x, tb, y), x, tb)

  dt0 = initial_step(f, jnp.float32(t0), x0, f(jnp.float32(t0), x0), cfg.rtol, cfg.atol)
  if cfg.end == "clip":
    bound, event, saveat = t1, None, diffrax.SaveAt(t1=True)
  else:  # a step grows at most 10x, so it cannot pass t0 + 11 (t1 - t0) before the event fires
    bound = t0 + 12 * (t1 - t0)
    event = diffrax.Event(lambda t, y_, args, **kw: t >= t1)
    saveat = diffrax.SaveAt(ts=jnp.asarray([t1], jnp.float32))
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, x, args: f(t, x)), diffrax.Dopri5(), t0, bound, dt0=dt0, y0=x0,
      saveat=saveat, event=event,
      stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol),
      max_steps=cfg.max_steps, adjoint=diffrax.RecursiveCheckpointAdjoint())
  nfe = 3 + 6 * sol.stats["num_steps"]
  return Sample(sol.ys[-1], jnp.asarray(nfe, jnp.int32))


def sample(model_fn, transport: Transport, cfg: SamplerConfig, x0, y, rng=None) -> Sample:
  """Any sampler: dispatches on the config (ODE fixed / dopri5, SDE)."""
  cfg = cfg.validate()
  if cfg.kind == "ode" and not cfg.fixed:
    return sample_dopri5(model_fn, transport, cfg, x0, y)
  return sample_fixed(model_fn, transport, cfg, x0, y, rng)


def sample_ode(model_fn, transport: Transport, x0, y, cfg: ODEConfig = ODEConfig()) -> Sample:
  return sample(model_fn, transport, cfg, x0, y)


def sample_sde(model_fn, transport: Transport, x0, y, rng, cfg: SDEConfig = SDEConfig()) -> Sample:
  return sample(model_fn, transport, cfg, x0, y, rng)


# --------------------------------------------------------------------------- flax models
def flax_model_fn(model, variables, full_output: bool = False) -> Callable:
  """`model_fn(x, t, y)` for a linen module (eval mode); full_output keeps the learned-sigma
  channels (the Gaussian objective needs them)."""
  if full_output:
    return lambda x, t, y: model.apply(variables, x, t, y, full_output=True)
  return lambda x, t, y: model.apply(variables, x, t, y)


def sampling_variables(model, params):
  """Variables for repeated forwards: mediator position biases resized once when supported."""
  try:
    from edit_jax import models  # noqa: PLC0415
  except ImportError:  # pragma: no cover
    return {"params": params}
  if isinstance(model, models.SiT):
    return models.precompute_mediator_biases(model, params)
  return {"params": params}


def num_label_values(model) -> Optional[int]:
  """How many label ids ``model`` embeds: num_classes, plus the null class when it has one."""
  n = getattr(model, "num_classes", None)
  if n is None:
    return None
  return int(n) + (1 if getattr(model, "class_dropout_prob", 0.0) > 0 else 0)


def check_labels(y, num_classes: int, allow_null: bool = False):
  """Raises ValueError unless every label is in [0, num_classes) (or == num_classes, the null
  class, when ``allow_null``). ``y``: concrete labels (numpy / jax array / list), any shape.

  Out-of-range ids would index past the embedding table, which under jit yields non-finite
  samples silently; every public sampling entry calls this before the jit boundary.
  """
  y = np.asarray(y)
  if y.size == 0:
    return
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
  hi = num_classes if allow_null else num_classes - 1
  lo_v, hi_v = int(y.min()), int(y.max())
  if lo_v < 0 or hi_v > hi:
    null = f" (or {num_classes}, the null class)" if allow_null else ""
    raise ValueError(f"labels must be in [0, {num_classes - 1}]{null} for this model "
                     f"({num_classes} classes), got [{lo_v}, {hi_v}]")


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def make_sample_fn(model, transport: Transport, cfg: SamplerConfig, *, cfg_scale: float = 1.0,
                   null_class: Optional[int] = None, guide_channels: Optional[int] = 3,
                   guidance_interval=None) -> Callable:
  """Pure `f(params, x0, y, rng) -> Sample` for a linen model; wrap it in `jax.jit`.

  Guidance is used when cfg_scale > 1 (official `using_cfg`); null_class defaults to
  `model.num_classes`. Labels y (B,) must be in [0, num_classes) (the null class num_classes is
  allowed when the model has one): concrete labels are checked on the host before tracing
  (ValueError); when `f` itself runs under an outer `jax.jit` the check runs in a host callback,
  so bad labels fail the call (JaxRuntimeError carrying the same message) instead of giving
  non-finite samples.
  """
  cfg = cfg.validate()
  if cfg.kind == "sde" or cfg.fixed:
    program(transport, cfg)  # validates the interval before any tracing
  guidance.check_guidance(cfg_scale, guide_channels, guidance_interval,
                          getattr(model, "in_channels", None))
  if null_class is None:
    null_class = getattr(model, "num_classes", None)
  if guidance.uses_guidance(cfg_scale) and null_class is None:
    raise ValueError("classifier-free guidance needs null_class (the label of the null class)")
  n_cls = getattr(model, "num_classes", None)
  allow_null = num_label_values(model) is not None and num_label_values(model) > (n_cls or 0)

  def f(params, x0, y, rng=None):
    if n_cls is not None:
      if _is_traced(y):
        jax.debug.callback(lambda v: check_labels(v, n_cls, allow_null), y)
      else:
        check_labels(y, n_cls, allow_null)
    model_fn = flax_model_fn(model, sampling_variables(model, params))
    if guidance.uses_guidance(cfg_scale):
      model_fn = guidance.guided_model_fn(model_fn, cfg_scale, null_class, guide_channels,
                                          guidance_interval)
    return sample(model_fn, transport, cfg, x0, y, rng)

  return f
