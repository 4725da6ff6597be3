"""DyDiT fine-tuning loss and sparse sampling that realizes the savings, for both objectives.

The model is `edit_jax.models.dydit.DyDiT` (routers, gates, FLOPs ratio, weight slicing).

Fine-tuning loss (`make_transport_loss_fn` for SiT's transport, `make_gaussian_loss_fn` for DiT's
Gaussian diffusion as published; spec edt_dydit.md 2.3-2.4, the official `train.py`):
  L = L_diffusion(dynamic forward, Gumbel gates) + [L_diffusion(complete model), first
      `complete_model_steps` steps] + w (mean_b ratio_b - target(step))^2
  target(step) = 1 for step < hold (100), then 1 - (1 - lambda) step / W until step W
  (`target_warmup_steps`), then lambda (official formula). t is stratified: sample b draws t from
  bin (b mod 4) of [t0, t1] (transport) or of the chain {0 .. T-1} (Gaussian: the official
  randint(0, 250) + 250 (b mod 4)); `t_bins`. L_diffusion is the transport's velocity loss or the
  Gaussian "loss" term (mse + vb with a learned variance, as DiT). The complete forward uses the
  same x_t, t and dropped labels. Needs the rng streams "label_dropout" and "gumbel".

Sparse sampling (`SparseSampler`; spec 4.4-4.5, 4.7): for a fixed-step sampler (ODE euler / heun2,
SDE Euler / Heun on a transport; DDPM / DDIM on a Gaussian diffusion, e.g. the published 250-step
DDPM) the evaluation times are known, and the width gates depend on t only:
  1. masks[step, eval, layer, unit] are computed once (`DyDiT.route` on the evaluation times);
  2. each step's *signature* is, per evaluation and layer, (active heads, active groups, token
     capacity), the counts bucketed upward to a multiple of `bucket` (padding units get gate 0);
  3. contiguous steps with identical masks form a *run*; ONE function per distinct signature is
     compiled ahead of time (`jit(...).lower(...).compile()` in the constructor): it gathers the
     run's weights once by traced index arrays (`slice_variables`) and integrates the run's steps
     in a `lax.fori_loop` with the narrowed model; the host loop only calls compiled executables;
  4. SDT: with token capacities (from `token_activity`, a calibration run, plus a margin) each
     narrowed block gathers at most `cap` active tokens of the whole (possibly CFG-doubled) batch,
     runs its MLP on them and scatter-adds back; a step with more active tokens takes the dense
     branch of a `lax.cond`, so results never depend on the capacity.
CFG halves share t, hence the width signature; guidance wraps each evaluation's narrowed model
(`edit_jax.diffusion.guidance`). Mediator attention layers are narrowed like full attention (the
per-head position tables and depthwise-conv channels are sliced). Adaptive dopri5 has no fixed grid:
use the dense model there (`samplers.make_sample_fn`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.diffusion import guidance, samplers
from edit_jax.diffusion.transport import Transport, _expand
from edit_jax.models import dydit as dydit_lib


# --------------------------------------------------------------------------- fine-tuning loss
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """DyDiT fine-tuning options (defaults: the official recipe; S/B use complete_model_steps 0,
  XL 30k; target_warmup_steps 1k by default, 5k in the lambda = 0.7 script)."""
  target_ratio: float = 0.5
  flops_weight: float = 2.0
  target_hold_steps: int = 100
  target_warmup_steps: int = 1000
  complete_model_steps: int = 0
  t_bins: int = 4
  # Not in the official recipe (0 = off: noise scale 1 throughout): from gate_noise_decay_start
  # the logistic noise of the training gates shrinks linearly to 0 over gate_noise_decay_steps,
  # so the hard gates the FLOPs loss sees at the end are the evaluation gates (short runs whose
  # logits still sit near 0 otherwise reach the target only through the noise).
  gate_noise_decay_start: int = 0
  gate_noise_decay_steps: int = 0

  def validate(self) -> "LossConfig":
    if not 0 < self.target_ratio <= 1:
      raise ValueError(f"target_ratio={self.target_ratio} must be in (0, 1] (the FLOPs fraction "
                       f"to keep, e.g. 0.5 or 0.7)")
    if self.flops_weight < 0:
      raise ValueError(f"flops_weight={self.flops_weight} must be >= 0 (official: 2.0)")
    for k in ("target_hold_steps", "target_warmup_steps", "complete_model_steps", "t_bins",
              "gate_noise_decay_start", "gate_noise_decay_steps"):
      if int(getattr(self, k)) != getattr(self, k) or getattr(self, k) < 0:
        raise ValueError(f"{k}={getattr(self, k)} must be an int >= 0")
    return self


def flops_target(step, cfg: LossConfig):
  """The FLOPs-ratio target at a training step (traced int ok): official warm-up schedule."""
  s = jnp.asarray(step, jnp.float32)
  lam = jnp.float32(cfg.target_ratio)
  tgt = lam
  if cfg.target_warmup_steps > 0:
    warm = 1.0 - (1.0 - lam) * s / cfg.target_warmup_steps
    tgt = jnp.where(s <= cfg.target_warmup_steps, warm, lam)
  return jnp.where(s < cfg.target_hold_steps, jnp.float32(1.0), tgt)


def gate_noise_scale(step, cfg: LossConfig):
  """Scale of the training gates' logistic noise at a step (traced int ok): 1 before
  gate_noise_decay_start, then linear to 0 over gate_noise_decay_steps (always 1 when 0)."""
  if cfg.gate_noise_decay_steps <= 0:
    return jnp.float32(1.0)
  s = jnp.asarray(step, jnp.float32) - cfg.gate_noise_decay_start
  return jnp.clip(1.0 - s / cfg.gate_noise_decay_steps, 0.0, 1.0).astype(jnp.float32)


def stratified_t(rng, batch: int, t0: float, t1: float, bins: int = 4):
  """(B,) times: sample b uniform in bin (b mod bins) of [t0, t1] (bins <= 1: uniform)."""
  u = jax.random.uniform(rng, (batch,), jnp.float32)
  if bins <= 1:
    return u * (t1 - t0) + t0
  b = (jnp.arange(batch) % bins).astype(jnp.float32)
  return t0 + (t1 - t0) * (b + u) / bins


def _dydit_loss(model, cfg: LossConfig, params, x_in, t_model, y, step, k_drop, k_gumbel,
                per_sample, full_output: bool):
  """The objective-independent part: dynamic forward -> per-sample loss (per_sample(out)), the
  complete-model phase (same x_t, t, dropped labels; `lax.cond` on the step) and the FLOPs loss.
  Returns (loss, per-sample loss (B,), flops ratio (B,), log dict)."""
  noise = gate_noise_scale(step, cfg)
  out, gates = dydit_lib.forward_with_gates(
      model, {"params": params}, x_in, t_model, y, train=True, full_output=full_output,
      rngs={"label_dropout": k_drop, "gumbel": k_gumbel}, gate_noise=noise)
  per = per_sample(out.astype(jnp.float32))
  diffusion = per.mean()
  ratio = dydit_lib.flops_ratio(model, gates)
  target = flops_target(step, cfg)
  lf = dydit_lib.flops_loss(ratio, target, cfg.flops_weight)
  complete = jnp.float32(0.0)
  if cfg.complete_model_steps > 0:
    def complete_loss(_):
      oc = model.apply({"params": params}, x_in, t_model, y, train=True, complete_model=True,
                       full_output=full_output, rngs={"label_dropout": k_drop})
      return per_sample(oc.astype(jnp.float32)).mean()
    complete = jax.lax.cond(jnp.asarray(step) < cfg.complete_model_steps, complete_loss,
                            lambda _: jnp.float32(0.0), None)
  log = {"diffusion_loss": diffusion, "complete_loss": complete, "flops_loss": lf,
         "flops_ratio": ratio.mean(), "flops_target": target, "gate_noise": noise}
  return diffusion + complete + lf, per, ratio, log


def make_transport_loss_fn(model: dydit_lib.DyDiT, transport: Transport, cfg: LossConfig):
  """`loss_fn(params, x1, y, rng, step) -> (loss, aux)` for the SiT transport objective.

  x1 (B, H, W, C) data, y (B,) labels, rng a key (split into t, noise, label dropout, gumbel),
  step the optimizer step (for the target warm-up and the complete-model phase).
  aux: loss_per_sample (B,), t (B,), flops_ratio (B,), log {diffusion_loss, complete_loss,
  flops_loss, flops_ratio, flops_target} (scalars for the training log).
  """
  cfg = cfg.validate()
  t0, t1 = transport.check_interval()

  def loss_fn(params, x1, y, rng, step):
    k_t, k_noise, k_drop, k_gumbel = jax.random.split(rng, 4)
    x1 = jnp.asarray(x1, jnp.float32)
    t = stratified_t(k_t, x1.shape[0], t0, t1, cfg.t_bins)
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
    xt, _ = transport.path.plan(_expand(t, x1), x0, x1)
    loss, per, ratio, log = _dydit_loss(
        model, cfg, params, xt, t, y, step, k_drop, k_gumbel,
        lambda out: transport.per_sample_loss(out, x0, x1, t), full_output=False)
    return loss, {"loss_per_sample": per, "t": t, "flops_ratio": ratio, "log": log}

  return loss_fn


def stratified_chain_t(rng, batch: int, num_timesteps: int, bins: int = 4):
  """(B,) int32 chain indices: sample b uniform over bin (b mod bins) of {0 .. T-1} (official:
  randint(0, 250) + [0, 250, 500, 750][b mod 4] for T = 1000); bins <= 1: uniform."""
  if bins <= 1:
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
  b = jnp.arange(batch) % bins
  lo = (b * num_timesteps) // bins
  hi = ((b + 1) * num_timesteps) // bins
  u = jax.random.uniform(rng, (batch,), jnp.float32)
  return jnp.minimum(lo + jnp.floor(u * (hi - lo)).astype(jnp.int32), hi - 1).astype(jnp.int32)


def make_gaussian_loss_fn(model: dydit_lib.DyDiT, diffusion, cfg: LossConfig):
  """`loss_fn(params, x0, y, rng, step) -> (loss, aux)` for DiT's Gaussian diffusion (DyDiT as
  published): the diffusion's training loss ("loss" = mse + vb with a learned variance) of the
  dynamic forward, plus the complete model's in the complete-model phase, plus the FLOPs loss;
  t stratified over the chain in `t_bins` bins. Same aux as `make_transport_loss_fn`."""
  cfg = cfg.validate()

  def loss_fn(params, x0, y, rng, step):
    k_t, k_noise, k_drop, k_gumbel = jax.random.split(rng, 4)
    x0 = jnp.asarray(x0, jnp.float32)
    t = stratified_chain_t(k_t, x0.shape[0], diffusion.num_timesteps, cfg.t_bins)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(x0, t, noise)
    loss, per, ratio, log = _dydit_loss(
        model, cfg, params, x_t, diffusion.model_timesteps(t), y, step, k_drop, k_gumbel,
        lambda out: diffusion.training_losses_from_output(out, x0, x_t, t, noise)["loss"],
        full_output=True)
    return loss, {"loss_per_sample": per, "t": t, "flops_ratio": ratio, "log": log}

  return loss_fn


LOG_KEYS = ("diffusion_loss", "complete_loss", "flops_loss", "flops_ratio", "flops_target",
            "gate_noise")


# --------------------------------------------------------------------------- plans
def _bucket(k: int, bucket: int, top: int) -> int:
  return int(min(top, max(1, -(-k // bucket) * bucket)))


def unit_selection(mask: np.ndarray, bucket: int):
  """(indices (kb,), gates (kb,)) for a 0/1 unit mask (H,): the active units in ascending order,
  then inactive ones as padding (gate 0) up to the bucketed count kb (>= 1)."""
  mask = np.asarray(mask) > 0.5
  active = np.nonzero(mask)[0]
  kb = _bucket(active.size, bucket, mask.size)
  pad = np.nonzero(~mask)[0][:kb - active.size]
  idx = np.concatenate([active, pad]).astype(np.int32)
  gates = np.concatenate([np.ones(active.size), np.zeros(pad.size)]).astype(np.float32)
  return idx, gates


class Run(NamedTuple):
  """Steps [start, stop) share their masks; `sig` indexes `SparsePlan.signatures`."""
  start: int
  stop: int
  sig: int
  kind: str                   # "step" (fori_loop over steps) or "last" (the SDE last step)
  head_idx: tuple             # per eval, per layer (kb,) int32
  group_idx: tuple
  head_gates: tuple           # per eval, per layer (kb,) float32
  group_gates: tuple


@dataclasses.dataclass
class SparsePlan:
  """Masks and runs of one fixed sampler grid (built on the host, once per sampler)."""
  head: np.ndarray            # (S', E, L, H) 0/1 evaluation masks; S' = steps (+1: SDE last step)
  group: np.ndarray           # (S', E, L, H)
  logit_margin: float         # min |router logit| over the grid (masks flip only below ~1e-6)
  signatures: list            # distinct (kind, per-eval per-layer (heads, groups, cap)) keys
  runs: list

  @property
  def num_signatures(self) -> int:
    return len(self.signatures)


# --------------------------------------------------------------------------- the sampler
@dataclasses.dataclass
class SparseResult:
  x: jax.Array                # (B, H, W, C)
  seconds: float
  gflops_dense: float         # per sample: the base network at full width (CFG doubling counted)
  gflops_masked: float        # per sample: DyDiT accounting with the masks (tokens: token_fraction)
  gflops_executed: float      # per sample: what the compiled segments run (bucketing, capacity)
  num_runs: int


class SparseSampler:
  """Sparse DyDiT sampling on a fixed-step sampler. Construct once, call `sample` many times.

  Args:
    model, params: a dense `DyDiT` and its parameters (width routing on).
    objective, sampler: a SiT `Transport` with a fixed-step `samplers.ODEConfig` (euler / heun2)
      or `SDEConfig`; or DiT's `gaussian.GaussianDiffusion` with a `gaussian.GaussianSamplerConfig`
      (DDPM or DDIM; the routers see the original timesteps of the respaced chain, as the
      network does).
    batch_size: B, the static batch of every `sample` call.
    cfg_scale, guide_channels, guidance_interval, null_class: classifier-free guidance (cfg > 1).
    bucket: width counts are rounded up to a multiple of this (fewer compiled signatures).
    token_fraction: None (token gates applied densely) or per (step, eval, layer) active-token
      fractions (S', E, L) from `token_activity`; capacities = ceil(max fraction over the steps of
      a width signature x (1 + capacity_margin) x rows / capacity_multiple) x capacity_multiple;
      a layer whose capacity saves less than `min_token_saving` of its rows stays dense.
    capacity_levels: 0 (default): one capacity per width signature (the worst step of it);
      L > 0: per step, the smaller of that and the step's own fraction (with the margin) rounded
      up to a multiple of rows / L (a few more capacities per layer; consecutive steps with equal
      capacities share a run: more compiled signatures for tighter capacities).
  Everything is validated, planned and compiled in the constructor; `compile_count` is the number
  of compiled segment functions (= `plan.num_signatures`).
  """

  def __init__(self, model: dydit_lib.DyDiT, params, objective,
               sampler: samplers.SamplerConfig, *, batch_size: int, cfg_scale: float = 1.0,
               guide_channels: Optional[int] = 3, guidance_interval=None,
               null_class: Optional[int] = None, bucket: int = 1, token_fraction=None,
               capacity_margin: float = 0.1, capacity_multiple: int = 8,
               min_token_saving: float = 0.1, capacity_levels: int = 0,
               _cache: Optional[dict] = None):
    if not isinstance(model, dydit_lib.DyDiT) or model.segment is not None:
      raise ValueError("SparseSampler needs a dense DyDiT model (edit_jax.models.dydit.DyDiT)")
    if not model.width_routing:
      raise ValueError("SparseSampler needs width routing (model.width_routing=True)")
    self.sampler = sampler.validate()
    self.gaussian = self.sampler.kind == "gaussian"
    if self.gaussian != (not isinstance(objective, Transport)):
      raise ValueError("pair a Transport with samplers.ODEConfig / SDEConfig, or a "
                       "gaussian.GaussianDiffusion with gaussian.GaussianSamplerConfig")
    if not self.sampler.fixed:
      raise ValueError(f"sparse DyDiT sampling needs a fixed-step sampler (ODE 'euler'/'heun2' or "
                       f"SDE 'Euler'/'Heun'); {self.sampler.method!r} chooses its own times: use "
                       f"the dense model (samplers.make_sample_fn) for it")
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be a positive int")
    if int(bucket) != bucket or bucket < 1:
      raise ValueError(f"bucket={bucket} must be an int >= 1")
    if int(capacity_levels) != capacity_levels or capacity_levels < 0:
      raise ValueError(f"capacity_levels={capacity_levels} must be an int >= 0 (0: one capacity "
                       f"per width signature; e.g. 8: per-step capacities in eighths of the rows)")
    if self.gaussian:
      from edit_jax.diffusion import gaussian  # noqa: PLC0415
      gaussian.check_guidance(cfg_scale, guide_channels, guidance_interval)
      self.diffusion = gaussian.for_sampling(objective, self.sampler)
      if self.diffusion.learned_variance != model.learn_sigma:
        raise ValueError(f"the diffusion's {self.diffusion.model_var_type} variance does not fit "
                         f"a model with learn_sigma={model.learn_sigma}")
      self.program = gaussian.program(objective, self.sampler)
      self._step = gaussian.make_step(objective, self.sampler)
      self._last = None
      self.stochastic = self.sampler.stochastic
    else:
      guidance.check_guidance(cfg_scale, guide_channels, guidance_interval, model.in_channels)
      self.diffusion = None
      self.program = samplers.program(objective, self.sampler)
      self._step = samplers.make_step(objective, self.sampler)
      self._last = samplers.make_last_step(objective, self.sampler)
      self.stochastic = self.sampler.kind == "sde"
    self.model, self.transport, self.batch_size = model, objective, int(batch_size)
    self.cfg_scale, self.guide_channels, self.guidance_interval = cfg_scale, guide_channels, \
        guidance_interval
    self.use_cfg = guidance.uses_guidance(cfg_scale)
    self.null_class = model.num_classes if null_class is None else null_class
    self.bucket = int(bucket)
    self.capacity_margin, self.capacity_multiple = float(capacity_margin), int(capacity_multiple)
    self.min_token_saving = float(min_token_saving)
    self.capacity_levels = int(capacity_levels)
    self.evals = self.program.evals_per_step
    self.rows = self.batch_size * model.num_tokens * (2 if self.use_cfg else 1)
    self.params = params
    self.variables = jax.jit(lambda p: samplers.sampling_variables(model, p))(params)
    self.token_fraction = None if token_fraction is None else np.asarray(token_fraction, np.float64)
    self.plan = self._make_plan()
    self._cache = {} if _cache is None else _cache  # signature -> executable (shared by copies)
    self._activity = self._cache.setdefault("__activity__", [])  # calibration records
    self._compiled = {s: self._compile(key) for s, key in enumerate(self.plan.signatures)}
    self._keys_fn = jax.jit(lambda r: samplers.per_sample_keys(r, self.batch_size)).lower(
        jax.eval_shape(lambda: jax.random.key(0))).compile()
    self._dummy_keys = jax.jit(lambda: jax.random.split(jax.random.key(0), self.batch_size))()

  # ------------------------------------------------------------------ planning
  def eval_times(self) -> np.ndarray:
    """(S', E) times the network sees; row S (SDE last step) has one evaluation (column 0).
    Gaussian: the original timestep timestep_map[chain index] of each step."""
    prog = self.program
    if self.gaussian:
      idx = prog.t.astype(np.int64)
      return self.diffusion.timestep_map[idx].astype(np.float32)[:, None]
    ts = np.stack([prog.t + e * prog.dt for e in range(self.evals)], axis=1)
    if prog.last_evals:
      ts = np.concatenate([ts, np.full((1, self.evals), prog.last_t, np.float32)], axis=0)
    return ts.astype(np.float32)

  def _make_plan(self) -> SparsePlan:
    m = self.model
    ts = self.eval_times()
    flat = ts.reshape(-1)
    head, group, la, lm = jax.jit(
        lambda v, t: m.apply(v, t, method=dydit_lib.DyDiT.route))(self.variables, flat)
    s_, e_ = ts.shape
    head = np.asarray(head).reshape(s_, e_, m.depth, m.num_heads)
    group = np.asarray(group).reshape(s_, e_, m.depth, m.num_heads)
    margin = float(min(np.abs(np.asarray(la)).min(), np.abs(np.asarray(lm)).min()))
    n_steps = self.program.num_steps
    all_widths = self._widths(head, group)
    step_caps = self._step_capacities(head, group, all_widths)
    signatures, runs, index = [], [], {}
    k = 0
    while k < s_:
      kind = "last" if k >= n_steps else "step"
      ne = 1 if kind == "last" else e_
      stop = k + 1
      if kind == "step":
        while stop < n_steps and np.array_equal(head[stop], head[k]) and \
            np.array_equal(group[stop], group[k]) and step_caps[stop] == step_caps[k]:
          stop += 1
      hsel = [[unit_selection(head[k, e, l], self.bucket) for l in range(m.depth)]
              for e in range(ne)]
      gsel = [[unit_selection(group[k, e, l], self.bucket) for l in range(m.depth)]
              for e in range(ne)]
      widths = all_widths[k]  # == the selections' sizes (both bucket the active counts)
      key = (kind, tuple(tuple(w + (step_caps[k].get((e, l), 0),)
                               for l, w in enumerate(widths[e])) for e in range(ne)))
      if key not in index:
        index[key] = len(signatures)
        signatures.append(key)
      runs.append(Run(k, stop, index[key], kind,
                      tuple(tuple(hsel[e][l][0] for l in range(m.depth)) for e in range(ne)),
                      tuple(tuple(gsel[e][l][0] for l in range(m.depth)) for e in range(ne)),
                      tuple(tuple(hsel[e][l][1] for l in range(m.depth)) for e in range(ne)),
                      tuple(tuple(gsel[e][l][1] for l in range(m.depth)) for e in range(ne))))
      k = stop
    return SparsePlan(head, group, margin, signatures, runs)

  def _cap(self, fraction: float, quantum: int) -> int:
    """Rows for an active-token fraction (margin, rounded up to `quantum`); 0 = stay dense."""
    cap = int(-(-np.ceil(fraction * (1 + self.capacity_margin) * self.rows) // quantum) * quantum)
    cap = max(cap, quantum)
    return cap if cap <= (1 - self.min_token_saving) * self.rows else 0

  def _step_capacities(self, head, group, widths) -> list:
    """Per step k: {(eval, layer): capacity} (absent = dense), from the calibrated fractions:
    the worst step of the width signature (capacity_levels 0) or the step's own (levels > 0)."""
    s_ = head.shape[0]
    if self.token_fraction is None:
      return [{} for _ in range(s_)]
    self._check_fraction_shape(head)
    caps = self._capacities(widths)
    per_sig = [caps[w] for w in widths]
    if not self.capacity_levels:
      return per_sig
    mult = self.capacity_multiple
    quantum = max(mult, int(-(-self.rows // (self.capacity_levels * mult)) * mult))
    out = []
    for k, sig_caps in enumerate(per_sig):
      c = {}
      for e in range(1 if k >= self.program.num_steps else head.shape[1]):
        for l in range(self.model.depth):
          # the step's own need on the coarse grid, never above the signature's capacity
          own = self._cap(self.token_fraction[k, e, l], quantum) or self.rows
          cap = min(own, sig_caps.get((e, l), self.rows))
          if cap < self.rows:
            c[(e, l)] = cap
      out.append(c)
    return out

  def _widths(self, head, group) -> list:
    """Per step: the bucketed (heads, groups) per eval and layer (the width signature)."""
    m = self.model
    n_steps = self.program.num_steps
    return [tuple(tuple((_bucket(int(head[k, e, l].sum()), self.bucket, m.num_heads),
                         _bucket(int(group[k, e, l].sum()), self.bucket, m.num_heads))
                        for l in range(m.depth))
                  for e in range(1 if k >= n_steps else head.shape[1]))
            for k in range(head.shape[0])]

  def _check_fraction_shape(self, head):
    m = self.model
    s_, e_ = head.shape[:2]
    if self.token_fraction.shape != (s_, e_, m.depth):
      raise ValueError(f"token_fraction has shape {self.token_fraction.shape}; this sampler needs "
                       f"(steps {s_}, evals {e_}, layers {m.depth}) (from token_activity)")

  def _capacities(self, widths) -> dict:
    """{width signature: {(eval, layer): capacity}} from the calibrated token fractions."""
    if self.token_fraction is None:
      return {}
    m = self.model
    fr = self.token_fraction
    worst: dict = {}
    for k, wk in enumerate(widths):
      ne = len(wk)
      w = worst.setdefault(wk, np.zeros((ne, m.depth)))
      np.maximum(w, fr[k, :ne], out=w)
    caps = {}
    for wk, w in worst.items():
      c = {}
      for e in range(w.shape[0]):
        for l in range(m.depth):
          cap = self._cap(w[e, l], self.capacity_multiple)
          if cap:
            c[(e, l)] = cap
      caps[wk] = c
    return caps

  # ------------------------------------------------------------------ compiled segments
  def _segment_fns(self, key):
    """(kind, narrowed models, fns) for a signature key; `fns(seg_vars, hg, gg, k, record)` gives
    one model function per evaluation of a step (guided when CFG is on)."""
    kind, per_eval = key
    m = self.model
    models_ = [m.clone(segment=tuple(per_eval[e]), parent=None) for e in range(len(per_eval))]
    recorder = self._record
    full = self.gaussian  # the Gaussian objective reads the learned-variance channels too

    def fns(seg_vars, head_gates, group_gates, k, record):
      out = []
      for e, mm in enumerate(models_):
        gates = tuple(zip(head_gates[e], group_gates[e]))

        def f(x, t, y, mm=mm, v=seg_vars[e], gates=gates, e=e):
          if not m.token_routing:
            return mm.apply(v, x, t, y, unit_gates=gates, full_output=full)
          o, st = mm.apply(v, x, t, y, unit_gates=gates, full_output=full,
                           mutable=[dydit_lib.GATES])
          tok = dydit_lib.stack_sown(st, m.depth)["token"]      # (B, L, N, 1)
          counts = tok.reshape(tok.shape[0], m.depth, -1).sum((0, 2))
          rows = tok.shape[0] * tok.shape[2]
          # calibration only: a host callback when `record` is set (skipped at run time otherwise)
          jax.lax.cond(record, lambda c: jax.debug.callback(recorder, k, e, c, rows),
                       lambda c: None, counts)
          return o

        if self.use_cfg and self.gaussian:
          from edit_jax.diffusion import gaussian  # noqa: PLC0415
          f = gaussian.guided_model_fn(f, self.cfg_scale, self.null_class, m.in_channels,
                                       self.guide_channels)
        elif self.use_cfg:
          f = guidance.guided_model_fn(f, self.cfg_scale, self.null_class, self.guide_channels,
                                       self.guidance_interval)
        out.append(f)
      return out

    return kind, models_, fns

  def _segment_fn(self, key):
    kind, models_, fns = self._segment_fns(key)
    m = self.model
    step, last, stochastic = self._step, self._last, self.stochastic

    def slice_all(variables, head_idx, group_idx):
      return [dydit_lib.slice_variables(m, variables, head_idx[e], group_idx[e])
              for e in range(len(models_))]

    if kind == "last":
      def fn(variables, x, y, keys, k0, k1, t_arr, dt_arr, head_idx, group_idx, hg, gg, record):
        del keys, k1, dt_arr
        seg = slice_all(variables, head_idx, group_idx)
        f = fns(seg, hg, gg, k0, record)[0]
        return last(f, x, y, t_arr[0], self.program.last_h)
      return fn

    def fn(variables, x, y, keys, k0, k1, t_arr, dt_arr, head_idx, group_idx, hg, gg, record):
      seg = slice_all(variables, head_idx, group_idx)

      def body(k, x):
        noise = samplers.step_noise(keys, k, x.shape[1:]) if stochastic else None
        f = fns(seg, hg, gg, k, record)
        return step(f[0] if len(f) == 1 else f, x, y, t_arr[k], dt_arr[k], noise)

      return jax.lax.fori_loop(k0, k1, body, x)
    return fn

  def _abstract_args(self, key):
    m = self.model
    kind, per_eval = key
    b = self.batch_size
    shp = (b, m.input_size, m.input_size, m.in_channels)
    sds = jax.ShapeDtypeStruct
    var_spec = jax.tree_util.tree_map(lambda a: sds(a.shape, a.dtype), self.variables)
    key_t = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    n = len(self._t_arr(kind))
    idx = lambda col: tuple(tuple(sds((w[col],), jnp.int32) for w in per_eval[e])  # noqa: E731
                            for e in range(len(per_eval)))
    gat = lambda col: tuple(tuple(sds((w[col],), jnp.float32) for w in per_eval[e])  # noqa: E731
                            for e in range(len(per_eval)))
    return (var_spec, sds(shp, jnp.float32), sds((b,), jnp.int32), key_t,
            sds((), jnp.int32), sds((), jnp.int32), sds((n,), jnp.float32), sds((n,), jnp.float32),
            idx(0), idx(1), gat(0), gat(1), sds((), jnp.bool_))

  def _compile(self, key):
    if key not in self._cache:
      self._cache[key] = jax.jit(self._segment_fn(key), donate_argnums=(1,)).lower(
          *self._abstract_args(key)).compile()
    return self._cache[key]

  @property
  def compile_count(self) -> int:
    return len(self._compiled)

  def _t_arr(self, kind):
    if kind == "last":
      return np.asarray([self.program.last_t], np.float32)
    return self.program.t

  def _dt_arr(self, kind):
    if kind == "last":
      return np.asarray([self.program.last_h], np.float32)
    return self.program.dt

  # ------------------------------------------------------------------ sampling
  def _check(self, x0, y):
    m = self.model
    shp = (self.batch_size, m.input_size, m.input_size, m.in_channels)
    if tuple(np.shape(x0)) != shp or tuple(np.shape(y)) != (self.batch_size,):
      raise ValueError(f"x0 must be {shp} (NHWC) and y ({self.batch_size},), got "
                       f"{np.shape(x0)} and {np.shape(y)}; the batch size is fixed at construction")

  def _keys(self, rng):
    if rng is None:
      if self.stochastic:
        raise ValueError(f"the {self.sampler.method} sampler needs rng (a PRNG key or one key "
                         f"per sample)")
      return self._dummy_keys
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ():
      return self._keys_fn(rng)
    return samplers.per_sample_keys(rng, self.batch_size)

  def _loop(self, x, y, keys, record: bool = False):
    flag = np.bool_(record)
    for run in self.plan.runs:
      fn = self._compiled[run.sig]
      x = fn(self.variables, x, y, keys, np.int32(run.start),
             np.int32(run.stop), self._t_arr(run.kind), self._dt_arr(run.kind), run.head_idx,
             run.group_idx, run.head_gates, run.group_gates, flag)
    return x

  def sample(self, x0, y, rng=None) -> SparseResult:
    """x0 (B, H, W, C) initial noise, y (B,) labels, rng: key(s) for the SDE / DDPM noise (the
    same streams as `samplers.sample_fixed` / `gaussian.sample_loop`: step k of sample i uses
    fold_in(key_i, k))."""
    self._check(x0, y)
    keys = self._keys(rng)
    x = jax.device_put(np.asarray(x0, np.float32))
    y = jax.device_put(np.asarray(y, np.int32))
    start = time.perf_counter()
    x = self._loop(x, y, keys)
    jax.block_until_ready(x)
    seconds = time.perf_counter() - start
    dense, masked, executed = self.gflops()
    return SparseResult(x, seconds, dense, masked, executed, len(self.plan.runs))

  # ------------------------------------------------------------------ calibration
  def _record(self, k, e, counts, rows):
    self._activity.append((int(k), int(e), np.asarray(counts), int(rows)))

  def token_activity(self, x0, y, rng=None) -> np.ndarray:
    """Active-token fractions (S', E, L) of the token routers along a trajectory (calibration for
    `token_fraction`): one run of this sampler with its host callback switched on (fractions of
    the rows each evaluation sees, CFG halves included; the maximum when an evaluation repeats)."""
    if not self.model.token_routing:
      raise ValueError("the model has no token routers (token_routing=False)")
    self._check(x0, y)
    keys = self._keys(rng)
    del self._activity[:]
    x = self._loop(jax.device_put(np.asarray(x0, np.float32)),
                   jax.device_put(np.asarray(y, np.int32)), keys, record=True)
    jax.block_until_ready(x)
    jax.effects_barrier()
    out = np.zeros(self.plan.head.shape[:2] + (self.model.depth,))
    for k, e, counts, rows in self._activity:
      out[k, e] = np.maximum(out[k, e], counts / rows)
    return out

  def with_token_capacity(self, token_fraction, **overrides) -> "SparseSampler":
    """A new sampler with SDT capacities from `token_fraction` (same model, grid and options;
    signatures it shares with this one reuse their compiled executables)."""
    kw = dict(batch_size=self.batch_size, cfg_scale=self.cfg_scale,
              guide_channels=self.guide_channels, guidance_interval=self.guidance_interval,
              null_class=self.null_class, bucket=self.bucket,
              capacity_margin=self.capacity_margin, capacity_multiple=self.capacity_multiple,
              min_token_saving=self.min_token_saving, capacity_levels=self.capacity_levels)
    kw.update(overrides)
    same_programs = set(overrides) <= {"bucket", "capacity_margin", "capacity_multiple",
                                       "min_token_saving", "capacity_levels"}
    return SparseSampler(self.model, self.params, self.transport, self.sampler,
                         token_fraction=token_fraction,
                         _cache=self._cache if same_programs else None, **kw)

  # ------------------------------------------------------------------ accounting
  def gflops(self, token_fraction=None):
    """(dense, masked, executed) GFLOPs per sample for one `sample` call, CFG doubling counted.
    dense: the base network at full width (no routers); masked: DyDiT's accounting with the
    grid's masks and `token_fraction` (default: the calibrated one, else all tokens);
    executed: the compiled segments' widths (bucketed) and capacities, routers included."""
    from edit_jax import flops  # noqa: PLC0415
    m = self.model
    base = flops.breakdown(m)
    routers = base.routers / 1e9
    dense_one = base.gflops - routers
    fr = self.token_fraction if token_fraction is None else np.asarray(token_fraction)
    fwd = guidance.guidance_forwards(self.program.eval_times(),
                                     self.cfg_scale if self.use_cfg else 1.0,
                                     self.guidance_interval)
    n_steps, e_ = self.program.num_steps, self.evals
    dense = masked = executed = 0.0
    i = 0
    for k in range(self.plan.head.shape[0]):
      ne = 1 if k >= n_steps else e_
      for e in range(ne):
        w = fwd[i]
        i += 1
        tok = np.ones(m.depth) if fr is None else fr[k, e]
        hf = self.plan.head[k, e].mean(-1)
        gf = self.plan.group[k, e].mean(-1)
        dense += w * dense_one
        masked += w * (flops.dynamic_gflops(m, hf, gf, tok))
        run = next(r for r in self.plan.runs if r.start <= k < r.stop and
                   (r.kind == "last") == (k >= n_steps))
        sig = self.plan.signatures[run.sig][1][e]
        kb = np.asarray([s[0] for s in sig]) / m.num_heads
        gb = np.asarray([s[1] for s in sig]) / m.num_heads
        cap = np.asarray([s[2] / self.rows if s[2] else 1.0 for s in sig])
        executed += w * flops.dynamic_gflops(m, kb, gb, cap)
    return float(dense), float(masked), float(executed)
