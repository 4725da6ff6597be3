"""Training: sharded SiT (with or without attention mediators) from one CPU to TPU pods.

    python -m edit_jax.main --config=configs/sit.py:S2-med64 --workdir=gs://bucket/run1

``train_and_evaluate(config, workdir)`` builds a ``("data", "fsdp")`` mesh, creates the train state
born sharded (params + AdamW state + EMA, by the model's logical axis names; see
``edit_jax.sharding``), resumes from ``workdir/checkpoints`` when possible (else initializes, or
loads ``config.init_from``), and runs one jitted, donated train step per global batch:

    rng_t = fold_in(rng_base, step);  loss = the objective's loss (``config.objective``:
      "transport" = SiT, edit_jax.diffusion.transport.make_loss_fn; "gaussian" = DiT,
      edit_jax.diffusion.gaussian.make_loss_fn with ``config.diffusion``)
    grads (optionally accumulated over micro-batches) -> [clip] -> AdamW -> EMA update

Recipe of the paper / official code (spec/sit_mediators.md section 6): AdamW lr 1e-4, no weight
decay, betas (0.9, 0.999), constant lr, no clipping, global batch 256, EMA decay 0.9999 updated
every step (initialized as a copy), label dropout 0.1, fp32. Options beyond it: bf16 compute with
fp32 master weights (``model.dtype``), rematerialization (``model.remat``), gradient clipping,
warm-up and cosine/linear schedules, gradient accumulation, EMA warm-up.

Multi-host: ``jax.distributed.initialize`` runs when ``config.distributed.enabled`` (or the
``EDIT_JAX_DISTRIBUTED`` environment variable) says so; each process reads its slice of every
global batch (``edit_jax.data``) and the slices are assembled with
``jax.make_array_from_process_local_data``. Only process 0 writes logs, TensorBoard and PNGs;
collectives (sampling, checkpointing, preemption checks) run on every process.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_jax import checkpoint as ckpt_lib
from edit_jax import data as data_lib
from edit_jax import elastic as elastic_lib
from edit_jax import hostmem
from edit_jax import metrics as metrics_lib
from edit_jax import models
from edit_jax import sharding as sharding_lib
from edit_jax.diffusion import gaussian as gaussian_lib
from edit_jax.diffusion import transport as transport_lib

# Re-exported: the official 256 -> 512 -> 1024 rule lives with the other checkpoint helpers.
resize_mediator_params = ckpt_lib.resize_mediator_params

# ImageNet classes used for sample grids by default (as in the DiT/SiT sample scripts).
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


class ConfigError(ValueError):
  """The experiment config is inconsistent; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def load_config_module(path):
  """The module of a config file, loaded by path (configs/*.py are files, not a package): lets
  one config build on another, e.g. ``load_config_module(Path(__file__).with_name("sit.py"))``."""
  import importlib.util  # noqa: PLC0415
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_edit_jax_config_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def default_config() -> ml_collections.ConfigDict:
  """Every training option with the official recipe's values (configs/*.py start from this)."""
  import ml_collections  # noqa: PLC0415 - only configs need it (not the step, models or benchmarks)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: a name from edit_jax.models.MODEL_NAMES; size fields left at 0 come from the name.
  c.model = ml_collections.ConfigDict(dict(
      # arch: "sit" (SiT/DiT, optional mediators), "edt", or "dydit" (SiT/DiT + routers, c.dydit)
      arch="sit", name="SiT-XL/2", input_size=32, in_channels=4, num_classes=1000,
      class_dropout_prob=0.1, learn_sigma=True, mediator_num=0, mediator_layers="all",
      attention_impl="xla", full_attention_impl="", dtype="float32", remat=False,
      hidden_size=0, depth=0, num_heads=0, patch_size=0, mlp_ratio=4.0, elastic_grid=0,
      # arch="edt" (EDT-S/2, EDT-B/2, EDT-XL/2 or a custom layout): empty = from the name
      stage_depths=(), stage_dims=(), stage_heads=()))
  # Elastic mediators (edit_jax.elastic; needs model.elastic_grid > 0): the mediator counts to
  # train, e.g. "4,16,64" ("" = static: model.mediator_num only); mode "uniform" (one n per step)
  # or "sandwich" (smallest + largest + num_random between, every step).
  c.elastic = ml_collections.ConfigDict(dict(mediators="", mode="uniform", num_random=1))
  # EDT's attention modulation matrix at sampling time (any full-attention model; docs/edt.md).
  # layers: "official" (EDT lists per size; DiT-XL/2 / -S/2 plug-in lists for SiT), "official_alt",
  # "all", or block indices "7,10". mode: post_softmax | log_bias.
  c.amm = ml_collections.ConfigDict(dict(enabled=False, layers="official", mode="post_softmax",
                                         in_train=False))
  # EDT token relation-enhanced masked training: L_full + L_masked (model.arch="edt" only).
  # ratios: one (lo, hi) per DownSample, () = official (U(0.4, 0.5), then U(0.1, 0.2));
  # mid_mask: auto (on for the XL layout) | on | off.
  c.masked_training = ml_collections.ConfigDict(dict(
      enabled=False, ratios=(), mid_mask="auto", mid_mask_block=4, mid_mask_ratio=(0.15, 0.25)))
  # Objective: "transport" (SiT's interpolants, c.transport) or "gaussian" (DiT's discrete
  # diffusion, c.diffusion = the create_diffusion flags; learned variance = model.learn_sigma).
  c.objective = "transport"
  c.transport = ml_collections.ConfigDict(dict(
      path_type="Linear", prediction="velocity", loss_weight="none",
      train_eps=-1.0, sample_eps=-1.0))  # < 0: the official defaults
  c.diffusion = ml_collections.ConfigDict(dict(gaussian_lib.DIFFUSION_DEFAULTS))
  c.data = ml_collections.ConfigDict(dict(
      name="latents", path="", image_size=256, channels=3, num_classes=1000, random_flip=True,
      latent_sample=True, space="pixels", latent_channels=4, tfds_name="", split="train",
      image_key="image", label_key="label", num_threads=4, prefetch=4, worker_count=0))
  c.global_batch_size = 256
  c.num_train_steps = 400_000
  c.grad_accum_steps = 1
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, b3=0.99, eps=1e-8, weight_decay=0.0,
      schedule="constant", warmup_steps=0, end_lr_factor=0.0, grad_clip=0.0))
  # name="adan": EDT's optimizer (edit_jax.optim.adan, betas b1/b2/b3 in the torch convention,
  # EDT: 0.98, 0.92, 0.99)
  c.ema_decay = 0.9999
  c.ema_warmup = False           # decay_t = min(decay, (1 + t) / (10 + t)) when True
  # Mesh: sizes for ("data", "fsdp"); one may be -1. fsdp_min_size: smaller tensors replicate.
  c.mesh_shape = (-1, 1)
  c.mesh_axes = ("data", "fsdp")
  c.fsdp_min_size = 2 ** 14
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.preemption_sync_every = 10   # multi-process: steps between agreeing on SIGTERM
  c.sample = ml_collections.ConfigDict(dict(
      every=10000, method="heun2", num_steps=50, cfg_scale=4.0, guide_channels=3,
      classes=IMAGENET_SAMPLE_CLASSES, per_class=2, vae_path="", seed=1, upscale=1,
      digit_accuracy=False,  # digits data: score grids with edit_jax.eval.digits' classifier
      eta=0.0, clip_denoised=False, respacing=""))  # objective="gaussian" (method ddpm / ddim)
  # DyDiT (model.arch = "dydit", edit_jax.models.dydit / edit_jax.diffusion.dydit): router options
  # and the fine-tuning loss; init_from a trained SiT/DiT (its routers start fresh, all gates on).
  c.dydit = ml_collections.ConfigDict(dict(
      router_format="forced", tau=5.0, router_bias=15.0, token_bias=35.0, token_router_ratio=16,
      width_routing=True, token_routing=True,
      target_ratio=0.5, flops_weight=2.0, target_hold_steps=100, target_warmup_steps=1000,
      complete_model_steps=0, t_bins=4,
      gate_noise_decay_start=0, gate_noise_decay_steps=0,  # 0: official (noise scale 1 always)
      router_lr_mult=1.0,  # routers' lr = this x the backbone's (1 = official); short runs: > 1
      reorder=False))  # magnitude-reorder heads / MLP groups of init_from weights (spec 4.4)
  c.init_from = ""               # workdir / converted dir / .pt / .npz to initialize params from
  c.init_from_ema = True
  c.init_from_grid = 0           # token grid of init_from weights if it differs (0: infer)
  c.distributed = ml_collections.ConfigDict(dict(
      enabled="auto", coordinator_address="", num_processes=0, process_id=-1))
  c.peak_tflops_per_device = 0.0  # 0: from metrics.PEAK_TFLOPS / CPU estimate
  c.max_train_seconds = 0.0      # > 0: stop (save + samples) after this much training time
  return c


_EDT_ONLY = ("stage_depths", "stage_dims", "stage_heads")
_SIT_ONLY = ("mediator_num", "mediator_layers", "attention_impl", "hidden_size", "depth",
             "num_heads", "elastic_grid")


def get_model(config):
  """The model (SiT, or EDT when ``config.model.arch == "edt"``) described by ``config.model``,
  ``config.amm`` and ``config.masked_training`` (validated)."""
  mc = config.model.to_dict()
  arch = mc.pop("arch", "sit") or "sit"
  name = mc.pop("name")
  kwargs = _amm_kwargs(config)
  if arch == "edt":
    return _get_edt(config, name, mc, kwargs)
  if arch not in ("sit", "dydit"):
    raise ConfigError(f"model.arch={arch!r}: expected 'sit', 'edt' or 'dydit'")
  if arch == "dydit":
    if kwargs.get("amm_layers", "none") != "none":
      raise ConfigError("amm.enabled with model.arch='dydit': DyDiT blocks do not apply EDT's AMM; "
                        "set --config.amm.enabled=False")
    dc = config.dydit
    kwargs.update(router_format=dc.router_format, tau=float(dc.tau),
                  router_bias=float(dc.router_bias), token_bias=float(dc.token_bias),
                  token_router_ratio=int(dc.token_router_ratio),
                  width_routing=bool(dc.width_routing), token_routing=bool(dc.token_routing))
  if config.get("masked_training") is not None and config.masked_training.enabled:
    raise ConfigError("masked_training.enabled needs model.arch='edt' (EDT masks inside its "
                      "down-sampling modules; SiT has none): set --config.model.arch=edt or "
                      "--config.masked_training.enabled=False")
  for k in _EDT_ONLY:
    if mc.pop(k, ()):
      raise ConfigError(f"model.{k} is an EDT field: set --config.model.arch=edt, or leave it empty")
  for k, v in mc.items():
    if k in ("hidden_size", "depth", "num_heads", "patch_size") and not v:
      continue
    if k == "dtype":
      v = jnp.dtype(v)
    elif k == "mediator_layers":
      v = None if v in ("all", "", None) else v
    elif k == "full_attention_impl":
      v = v or None
    kwargs[k] = v
  try:
    return models.build_model(name, arch=arch, **kwargs)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def dydit_loss_config(config):
  """`edit_jax.diffusion.dydit.LossConfig` from ``config.dydit`` (raises ConfigError)."""
  from edit_jax.diffusion import dydit as dydit_diffusion  # noqa: PLC0415
  dc = config.dydit
  try:
    return dydit_diffusion.LossConfig(
        target_ratio=float(dc.target_ratio), flops_weight=float(dc.flops_weight),
        target_hold_steps=int(dc.target_hold_steps),
        target_warmup_steps=int(dc.target_warmup_steps),
        complete_model_steps=int(dc.complete_model_steps), t_bins=int(dc.t_bins),
        gate_noise_decay_start=int(dc.get("gate_noise_decay_start", 0)),
        gate_noise_decay_steps=int(dc.get("gate_noise_decay_steps", 0))).validate()
  except ValueError as e:
    raise ConfigError(f"config.dydit: {e}") from e


def _amm_kwargs(config) -> dict:
  ac = config.get("amm")
  if ac is None:
    return {}
  if not ac.enabled:
    return {"amm_layers": "none"}
  return {"amm_layers": ac.layers, "amm_mode": ac.mode, "amm_in_train": bool(ac.in_train)}


def _get_edt(config, name, mc, kwargs):
  """EDT from config.model (arch="edt"); mediator fields must stay at their defaults."""
  if mc.get("mediator_num"):
    raise ConfigError("model.mediator_num is a SiT option: EDT uses full attention with a "
                      "relative-position bias in every block (set --config.model.mediator_num=0)")
  if mc.get("elastic_grid"):
    raise ConfigError("model.elastic_grid is a SiT mediator option: EDT has no mediators (set "
                      "--config.model.elastic_grid=0)")
  for k in _SIT_ONLY:
    mc.pop(k, None)
  for k in _EDT_ONLY + ("patch_size",):
    if not mc.get(k):
      mc.pop(k, None)
  mc["full_attention_impl"] = mc.get("full_attention_impl") or None
  mt = config.get("masked_training")
  if mt is not None:
    mid = str(mt.mid_mask).lower()
    if mid not in ("auto", "on", "off", "true", "false"):
      raise ConfigError(f"masked_training.mid_mask={mt.mid_mask!r}: expected auto, on or off")
    mc.update(mask_ratios=tuple(tuple(r) for r in mt.ratios) if mt.ratios else None,
              mid_mask=None if mid == "auto" else mid in ("on", "true"),
              mid_mask_block=int(mt.mid_mask_block), mid_mask_ratio=tuple(mt.mid_mask_ratio))
  mc.update(kwargs)
  if not name:
    mc["arch"] = "edt"
  elif not str(name).startswith("EDT"):
    raise ConfigError(f"model.name={name!r} with model.arch='edt': use EDT-S/2, EDT-B/2, "
                      f"EDT-XL/2, or an empty name with model.stage_depths/dims/heads")
  try:
    return models.build_model(name or None, **mc)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model (EDT): {e}") from e


def get_transport(config) -> transport_lib.Transport:
  tc = config.transport
  lw = tc.loss_weight
  return transport_lib.create_transport(
      tc.path_type, tc.prediction, None if lw in ("none", "None", "", None) else lw,
      None if tc.train_eps < 0 else tc.train_eps, None if tc.sample_eps < 0 else tc.sample_eps)


OBJECTIVES = ("transport", "gaussian")


def get_diffusion(config, model) -> gaussian_lib.GaussianDiffusion:
  """The training diffusion (all ``config.diffusion.diffusion_steps`` steps) of objective="gaussian"."""
  try:
    return gaussian_lib.diffusion_from_settings(config.diffusion.to_dict(), model.learn_sigma)
  except ValueError as e:
    raise ConfigError(f"config.diffusion: {e}") from e


def get_objective(config, model):
  """``Transport`` (objective="transport") or ``GaussianDiffusion`` (objective="gaussian")."""
  if config.get("objective", "transport") not in OBJECTIVES:
    raise ConfigError(f"objective={config.objective!r}: expected one of {list(OBJECTIVES)}")
  if config.get("objective", "transport") == "gaussian":
    return get_diffusion(config, model)
  return get_transport(config)


def make_loss_fn(config, model, objective):
  """The training loss ``loss_fn(params, x, y, rng) -> (loss, aux)`` of ``config.objective``
  (``objective``: the ``Transport`` or ``GaussianDiffusion`` of `get_objective`), or EDT's
  L_full + L_masked with that objective's loss for both passes when
  ``config.masked_training.enabled`` (edit_jax.diffusion.masked; the masked pass reuses the full
  pass's t with fresh noise). DyDiT models: `make_loss`."""
  gaussian = config.get("objective", "transport") == "gaussian"
  lib = gaussian_lib if gaussian else transport_lib
  mt = config.get("masked_training")
  if mt is not None and mt.enabled:
    from edit_jax.diffusion import masked  # noqa: PLC0415
    # the Gaussian loss needs every output channel (learned variance) from both passes
    kw = {"full_output": True} if gaussian else {}
    return masked.make_masked_loss_fn(
        model, lambda apply_fn: lib.make_loss_fn(model, objective, apply_fn=apply_fn), **kw)
  return lib.make_loss_fn(model, objective)


def make_loss(config, model, objective):
  """The trainer's loss: (loss_fn, takes_step, extra metric names).

  ``config.objective`` picks the objective for every model family (``objective`` =
  `get_objective`'s Transport or GaussianDiffusion). A DyDiT gets its fine-tuning loss on that
  objective (diffusion loss + FLOPs-ratio loss with the target warm-up, so it takes the step, and
  logs ``edit_jax.diffusion.dydit.LOG_KEYS``); other models `make_loss_fn`.
  """
  if not isinstance(model, models.DyDiT):
    return make_loss_fn(config, model, objective), False, ()
  from edit_jax.diffusion import dydit as dydit_diffusion  # noqa: PLC0415
  if not model.width_routing and not model.token_routing:
    raise ConfigError("config.dydit: width_routing and token_routing are both off: nothing to "
                      "fine-tune; use model.arch='sit'")
  make = (dydit_diffusion.make_gaussian_loss_fn
          if config.get("objective", "transport") == "gaussian"
          else dydit_diffusion.make_transport_loss_fn)
  return make(model, objective, dydit_loss_config(config)), True, dydit_diffusion.LOG_KEYS


def check_config(config, model: models.SiT, example_shape, num_classes: int):
  """Cross-checks model vs data and the step counters; raises ConfigError."""
  expect = (model.input_size, model.input_size, model.in_channels)
  if tuple(example_shape) != expect:
    raise ConfigError(
        f"data examples have shape {tuple(example_shape)} (H, W, C) but the model expects "
        f"{expect}: set --config.model.input_size={example_shape[0]} "
        f"--config.model.in_channels={example_shape[2]} (latents: image_size // 8, 4 channels)")
  if model.num_classes != num_classes:
    raise ConfigError(f"model.num_classes={model.num_classes} but the data has {num_classes} "
                      f"classes: set --config.model.num_classes={num_classes}")
  for k in ("num_train_steps", "log_every", "checkpoint_every", "global_batch_size"):
    if config[k] <= 0:
      raise ConfigError(f"config.{k}={config[k]} must be > 0")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ConfigError(f"ema_decay={config.ema_decay} must be in [0, 1)")
  if model.full_attention_impl == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(f"model.full_attention_impl='cudnn' needs an NVIDIA GPU with cuDNN, but this "
                      f"run's backend is {jax.default_backend()}: set "
                      f"--config.model.full_attention_impl= (empty: automatic, see "
                      f"edit_jax.models.attention_core)")
  if config.optim.schedule not in ("constant", "cosine", "linear"):
    raise ConfigError(f"optim.schedule={config.optim.schedule!r}: expected constant, cosine or "
                      "linear")
  if isinstance(model, models.DyDiT):
    dydit_loss_config(config)
  try:
    elastic_lib.check_config(config, model)
  except ValueError as e:
    raise ConfigError(f"config.elastic: {e}") from e
  gaussian = config.get("objective", "transport") == "gaussian"
  method = str(config.sample.method)
  if config.sample.every > 0 and gaussian != (method.lower() in gaussian_lib.METHODS):
    want = ("'ddpm' or 'ddim'" if gaussian else "'euler', 'heun2', 'dopri5' (ODE) or 'Euler', "
            "'Heun' (SDE)")
    raise ConfigError(f"sample.method={method!r} does not fit objective="
                      f"{config.get('objective', 'transport')!r}: use {want}")
  check_optim_config(config)
  if config.sample.every > 0:
    try:
      sampler_config(config.sample, config.get("objective", "transport"))
    except ValueError as e:
      raise ConfigError(f"config.sample: {e}") from None


def check_optim_config(config):
  """Raises ConfigError for optimizer settings that cannot train (negative lr, betas >= 1, ...)."""
  oc = config.optim
  checks = [
      ("optim.learning_rate", oc.learning_rate, math.isfinite(oc.learning_rate)
       and oc.learning_rate > 0, "must be > 0 (the peak learning rate; e.g. 1e-4)"),
      ("optim.warmup_steps", oc.warmup_steps, oc.warmup_steps >= 0, "must be >= 0"),
      ("optim.end_lr_factor", oc.end_lr_factor, 0.0 <= oc.end_lr_factor <= 1.0,
       "must be in [0, 1] (the final lr as a fraction of the peak)"),
      ("optim.b1", oc.b1, 0.0 <= oc.b1 < 1.0, "must be in [0, 1)"),
      ("optim.b2", oc.b2, 0.0 <= oc.b2 < 1.0, "must be in [0, 1)"),
      ("optim.eps", oc.eps, oc.eps > 0, "must be > 0"),
      ("optim.weight_decay", oc.weight_decay, oc.weight_decay >= 0, "must be >= 0"),
      ("optim.grad_clip", oc.grad_clip, oc.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
      ("grad_accum_steps", config.grad_accum_steps, config.grad_accum_steps >= 1, "must be >= 1"),
      ("max_train_seconds", config.max_train_seconds, config.max_train_seconds >= 0,
       "must be >= 0 (0 = no time limit)"),
  ]
  for name, value, ok, rule in checks:
    if not ok:
      raise ConfigError(f"{name}={value} {rule}: set --config.{name}=<value>")


def check_workdir(workdir: str):
  """Raises ConfigError when a local ``workdir`` exists but is not a directory."""
  if "://" in workdir:
    return
  p = epath.Path(workdir)
  for q in [p, *p.parents]:
    if q.exists() and not q.is_dir():
      raise ConfigError(f"--workdir={workdir}: {q} is a file, not a directory; pass a directory "
                        "(it is created when missing)")
    if q.exists():
      return


# ----------------------------------------------------------------------------------------------
# State, optimizer, step
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """step () int32; params, ema_params: SiT params (fp32); opt_state: optax state."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def make_schedule(oc, num_steps: int) -> Callable:
  lr = oc.learning_rate
  warm = int(oc.warmup_steps)
  if oc.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif oc.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warm, 1), alpha=oc.end_lr_factor)
  else:
    main = optax.linear_schedule(lr, lr * oc.end_lr_factor, max(num_steps - warm, 1))
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW or Adan (``optim.name``) (+ optional global-norm clipping) with the schedule."""
  oc = config.optim
  schedule = make_schedule(oc, config.num_train_steps)
  name = oc.get("name", "adamw")
  if name == "adamw":
    tx = optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
  elif name == "adan":
    from edit_jax import optim  # noqa: PLC0415
    try:
      tx = optim.adan(schedule, b1=oc.b1, b2=oc.b2, b3=oc.get("b3", 0.99), eps=oc.eps,
                      weight_decay=oc.weight_decay)
    except ValueError as e:
      raise ConfigError(f"config.optim: {e}") from e
  else:
    raise ConfigError(f"optim.name={name!r}: expected 'adamw' or 'adan'")
  if oc.grad_clip and oc.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx)
  mult = float(config.dydit.get("router_lr_mult", 1.0)) if "dydit" in config and \
      config.model.get("arch", "sit") == "dydit" else 1.0
  if mult != 1.0:
    if not mult > 0:
      raise ConfigError(f"dydit.router_lr_mult={mult} must be > 0 (1 = the backbone's lr)")
    from edit_jax.models import dydit  # noqa: PLC0415
    tx = optax.chain(tx, dydit.scale_router_updates(mult))
  return tx, schedule


def _init_state_boxed(model: models.SiT, tx, rng) -> TrainState:
  variables = model.init({"params": rng}, *models.dummy_inputs(model))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def state_shardings(model, tx, mesh, rules, fsdp_min_size: int = 0):
  """(abstract unboxed TrainState, TrainState of NamedShardings)."""
  boxed = jax.eval_shape(lambda r: _init_state_boxed(model, tx, r), jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules, fsdp_min_size)
  return sharding_lib.strip_boxes(boxed), shardings


def create_train_state(model, tx, mesh, rng, rules=sharding_lib.DEFAULT_RULES,
                       fsdp_min_size: int = 0):
  """A fresh TrainState, born sharded: ``jax.jit(init, out_shardings=...)``.

  Returns (state, shardings). The EMA starts as a copy of the params (official update_ema(0)).
  """
  _, shardings = state_shardings(model, tx, mesh, rules, fsdp_min_size)
  init = jax.jit(lambda r: sharding_lib.strip_boxes(_init_state_boxed(model, tx, r)), out_shardings=shardings)
  return init(rng), shardings


def ema_decay_at(step, decay: float, warmup: bool):
  if not warmup:
    return jnp.float32(decay)
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))


def metrics_collection(extra=()):
  """TrainMetrics plus the averages of ``extra`` scalar names (from the loss's aux["log"])."""
  if not extra:
    return metrics_lib.TrainMetrics
  from clu import metrics as clu_metrics  # noqa: PLC0415
  return clu_metrics.Collection.create(
      loss=clu_metrics.Average.from_output("loss"),
      grad_norm=clu_metrics.Average.from_output("grad_norm"),
      learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
      nonfinite=clu_metrics.Average.from_output("nonfinite"),
      **{k: clu_metrics.Average.from_output(k) for k in extra})


def make_train_step(loss_fn, tx, schedule, mesh, shardings, *, grad_accum_steps: int = 1,
                    ema_decay: float = 0.9999, ema_warmup: bool = False,
                    batch_axes=sharding_lib.BATCH, donate: bool = True,
                    metrics_fn: Callable | None = None, loss_takes_step: bool = False,
                    extra_metrics=()):
  """The jitted train step ``(state, batch, rng_base) -> (state, TrainMetrics)``.

  metrics_fn(loss=, grad_norm=, learning_rate=, nonfinite=) builds the step's metrics from scalars;
  default ``metrics.TrainMetrics.single_from_model_output`` (clu). ``dict`` returns a plain dict
  of scalars and needs no clu (benchmarks/device_check.py on machines without it).

  batch: {"x": (G, H, W, C) float32, "y": (G,) int32}, sharded over ``batch_axes``.
  loss_takes_step: call ``loss_fn(params, x, y, rng, step)`` (DyDiT's target warm-up).
  extra_metrics: names of scalars in the loss's ``aux["log"]`` to average into the metrics.
  The per-step rng is ``fold_in(rng_base, state.step)`` (micro-batch i: fold_in(that, i)).
  With ``grad_accum_steps = k`` the batch is split into k micro-batches (rows i, i+k, ...), their
  gradients are averaged in a ``lax.scan``, then one optimizer update is applied.
  """
  batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  bsh = NamedSharding(mesh, P(batch_axes))
  rep = NamedSharding(mesh, P())
  k = int(grad_accum_steps)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def extra_of(aux):
    log = aux.get("log", {}) if isinstance(aux, dict) else {}
    return {n: jnp.asarray(log[n], jnp.float32) for n in extra_metrics}

  def step_fn(state: TrainState, batch, rng_base):
    rng = jax.random.fold_in(rng_base, state.step)
    x, y = batch["x"], batch["y"]
    step_arg = (state.step,) if loss_takes_step else ()
    if k == 1:
      (loss, aux), grads = grad_fn(state.params, x, y, rng, *step_arg)
      extras = extra_of(aux)
    else:
      def split(a):  # (G, ...) -> (k, G/k, ...); micro-batch i = rows i, i+k, ... (device-local)
        a = a.reshape((a.shape[0] // k, k) + a.shape[1:])
        a = jnp.moveaxis(a, 1, 0)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, batch_axes)))

      def body(carry, inp):
        g_acc, l_acc, e_acc = carry
        xi, yi, i = inp
        (li, ai), gi = grad_fn(state.params, xi, yi, jax.random.fold_in(rng, i), *step_arg)
        return (jax.tree.map(jnp.add, g_acc, gi), l_acc + li,
                jax.tree.map(jnp.add, e_acc, extra_of(ai))), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      e0 = {n: jnp.float32(0.0) for n in extra_metrics}
      (grads, loss, extras), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0), e0),
                                              (split(x), split(y), jnp.arange(k)))
      grads = jax.tree.map(lambda g: g / k, grads)
      loss = loss / k
      extras = {n: v / k for n, v in extras.items()}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    m = (metrics_fn or metrics_collection(tuple(extra_metrics)).single_from_model_output)(
        loss=loss, grad_norm=grad_norm, learning_rate=jnp.asarray(schedule(state.step)),
        nonfinite=(~jnp.isfinite(loss)).astype(jnp.float32), **extras)
    return new_state, m

  return jax.jit(step_fn, in_shardings=(shardings, {"x": bsh, "y": bsh}, rep),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------
# Multi-host, preemption
# ----------------------------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _is_distributed_initialized() -> bool:
  try:
    return bool(jax.distributed.is_initialized())
  except AttributeError:  # pragma: no cover - older jax
    from jax._src import distributed  # noqa: PLC0415
    return distributed.global_state.client is not None


def _cluster_env_detected() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # multi-host TPU slice
    return True
  for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(k, "1") or 1) > 1:
      return True
  return False


def maybe_initialize_distributed(config=None) -> bool:
  """Calls ``jax.distributed.initialize`` when asked; returns whether it is initialized.

  ``config.distributed.enabled``: "auto" (initialize on a detected multi-host cluster: multi-host
  TPU slice, JAX_COORDINATOR_ADDRESS, SLURM/Open MPI with > 1 task), True or False. The
  ``EDIT_JAX_DISTRIBUTED`` environment variable overrides it. Explicit coordinator_address /
  num_processes / process_id are passed on (needed off TPU, e.g. GPUs or local tests).
  Must run before anything else touches the JAX backend.
  """
  if _is_distributed_initialized():
    return True
  dc = config.get("distributed") if config is not None else None
  enabled = str(dc.enabled if dc is not None else "auto").lower()
  env = os.environ.get("EDIT_JAX_DISTRIBUTED", "").lower()
  if env:
    enabled = env
  if enabled in _FALSE:
    return False
  if enabled not in _TRUE and not _cluster_env_detected():
    return False
  kwargs = {}
  if dc is not None:
    if dc.coordinator_address:
      kwargs["coordinator_address"] = dc.coordinator_address
    if dc.num_processes > 0:
      kwargs["num_processes"] = int(dc.num_processes)
    if dc.process_id >= 0:
      kwargs["process_id"] = int(dc.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


class PreemptionWatcher:
  """Turns SIGTERM, a first Ctrl-C (SIGINT) and Orbax/TPU preemption notices into a clean "save
  and stop" request.

  In multi-process runs the decision is agreed on every ``sync_every`` steps with one tiny
  all-gather, so every process stops at the same step.
  """

  def __init__(self, sync_every: int = 10, handle_sigint: bool = True):
    self.requested = threading.Event()
    self.interrupted = False
    self.sync_every = max(int(sync_every), 1)
    self._old = None
    self._old_int = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handler)
      if handle_sigint:
        self._old_int = signal.signal(signal.SIGINT, self._sigint)

  def _handler(self, signum, frame):  # noqa: ARG002
    logging.warning("received signal %d: will save a checkpoint and exit", signum)
    self.requested.set()

  def _sigint(self, signum, frame):  # noqa: ARG002
    """First Ctrl-C: save at the next step and stop; a second one interrupts at once."""
    logging.warning("Ctrl-C: saving a checkpoint at the next step, then stopping (press Ctrl-C "
                    "again to stop without saving)")
    self.interrupted = True
    self.requested.set()
    if self._old_int is not None:
      signal.signal(signal.SIGINT, self._old_int)
      self._old_int = None

  def should_stop(self, step: int, checkpointer: ckpt_lib.Checkpointer | None) -> bool:
    local = self.requested.is_set()
    if jax.process_count() == 1:
      return local or bool(checkpointer and checkpointer.reached_preemption(step))
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # noqa: PLC0415
    flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
    return bool(np.any(flags)) or bool(checkpointer and checkpointer.reached_preemption(step))

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None
    if self._old_int is not None:
      signal.signal(signal.SIGINT, self._old_int)
      self._old_int = None


# ----------------------------------------------------------------------------------------------
# Sampling grids
# ----------------------------------------------------------------------------------------------

def sample_labels(config, num_classes: int) -> np.ndarray:
  classes = [c for c in config.sample.classes if 0 <= c < num_classes]
  if not classes:
    classes = list(range(min(num_classes, 8)))
  return np.repeat(np.asarray(classes, np.int32), int(config.sample.per_class))


def sampler_config(sc, objective: str = "transport"):
  """The validated sampler config of ``config.sample`` (ValueError): an
  ``edit_jax.diffusion.samplers`` ODE/SDE config for the transport, a
  ``GaussianSamplerConfig`` (DDPM/DDIM) for ``objective="gaussian"``."""
  from edit_jax.diffusion import guidance, samplers  # noqa: PLC0415
  if objective == "gaussian":
    cfg = gaussian_lib.GaussianSamplerConfig(
        method=sc.method, num_steps=sc.num_steps, eta=sc.get("eta", 0.0),
        clip_denoised=sc.get("clip_denoised", False), respacing=sc.get("respacing", ""))
  elif sc.method in ("Euler", "Heun"):
    cfg = samplers.SDEConfig(method=sc.method, num_steps=sc.num_steps)
  else:
    cfg = samplers.ODEConfig(method=sc.method, num_steps=sc.num_steps)
  cfg = cfg.validate()
  if objective != "gaussian" and sc.num_steps < 2:  # a Gaussian chain may be set by respacing
    raise ValueError(f"num_steps={sc.num_steps} must be >= 2 (grid points)")
  if sc.per_class < 1:
    raise ValueError(f"per_class={sc.per_class} must be >= 1")
  guidance.check_guidance(sc.cfg_scale, None, None)
  return cfg


def make_sampler(config, model, transport, mesh, ema_shardings):
  """A jitted ``(ema_params, x0, y, rng) -> samples`` (EMA model, CFG): edit_jax.diffusion.samplers
  for a ``Transport``, DDPM/DDIM (edit_jax.diffusion.gaussian) for a ``GaussianDiffusion``."""
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  sc = config.sample
  gaussian = isinstance(transport, gaussian_lib.GaussianDiffusion)
  cfg = sampler_config(sc, "gaussian" if gaussian else "transport")
  gc = None if sc.guide_channels is None or sc.guide_channels < 0 else int(sc.guide_channels)
  if gc is not None and gc > model.in_channels:
    gc = None
  if gaussian:
    fn = gaussian_lib.make_sample_fn(model, transport, cfg, cfg_scale=sc.cfg_scale,
                                     guide_channels=gc)
  else:
    fn = samplers.make_sample_fn(model, transport, cfg, cfg_scale=sc.cfg_scale, guide_channels=gc)
  rep = NamedSharding(mesh, P())
  return jax.jit(lambda p, x0, y, rng: fn(p, x0, y, rng).x,
                 in_shardings=(ema_shardings, rep, rep, rep), out_shardings=rep)


def samples_to_images(x: np.ndarray, config, vae_state) -> np.ndarray | None:
  """Samples (N, H, W, C) -> uint8 (N, H', W', 1|3): pixels directly, latents through the VAE."""
  if config.data.name == "latents" or config.data.get("space", "pixels") == "latents":
    if vae_state is None:
      return None
    from edit_jax.eval import vae  # noqa: PLC0415
    return vae.decode_latents(vae_state, x, batch_size=8)
  return metrics_lib.to_uint8(x)


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------

def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


# Model fields that change how the model is computed, not what it is: a checkpoint resumes across
# them (e.g. written with the XLA attention on CPU, resumed with the Pallas kernel in bfloat16;
# EDT's attention modulation matrix has no parameters, so its settings may change too).
RUNTIME_MODEL_FIELDS = ("attention_impl", "full_attention_impl", "dtype", "remat", "amm_layers",
                        "amm_mode", "amm_in_train", "amm_k", "amm_period_factor")


def _flat_config(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def compare_with_checkpoint(config, model, meta) -> tuple[list[str], list[str]]:
  """(blocking, other) differences between this run and a checkpoint's ``meta``.

  blocking: model fields that define the architecture (``model.<field>: saved -> now``); the
  other list: every other config field that differs (informative; the optimizer state's
  tensors are compared separately by the checkpointer).
  """
  now = models.model_config(model)
  saved = meta.get("model_config") or {}
  blocking = [f"model.{k}: {saved[k]!r} -> {now[k]!r}" for k in now
              if k in saved and k not in RUNTIME_MODEL_FIELDS and saved[k] != now[k]]
  flat_saved = _flat_config(meta.get("config"))
  flat_now = _flat_config(_config_json(config))
  others = [f"{k}: {flat_saved[k]!r} -> {flat_now[k]!r}" for k in sorted(flat_now)
            if k in flat_saved and flat_saved[k] != flat_now[k] and not k.startswith("model.")]
  return blocking, others


def _restore_or_init(config, model, tx, mesh, rules, ckpt, init_rng):
  abstract, shardings = state_shardings(model, tx, mesh, rules, config.fsdp_min_size)
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  restored = ckpt.restore(target, compare_meta=lambda meta: compare_with_checkpoint(
      config, model, meta))
  if restored is not None:
    state, meta = restored
    _, others = compare_with_checkpoint(config, model, meta)
    if others:
      logging.info("config differs from the checkpoint's (checkpoint -> now): %s",
                   "; ".join(others))
    logging.info("resumed from %s step %d", ckpt.directory, int(meta["step"]))
    return state, shardings, meta
  state, _ = create_train_state(model, tx, mesh, init_rng, rules, config.fsdp_min_size)
  if config.init_from:
    src_model, src_params, desc = ckpt_lib.load_init_params(
        config.init_from, ema=config.init_from_ema,
        num_heads=model.num_heads if models.arch_of(model) == "sit" else None)
    src_grid = config.init_from_grid or (src_model.grid if src_model is not None else model.grid)
    src_params, src_grid = elastic_lib.adapt_init_params(src_model, src_params, model, src_grid)
    merged, report = ckpt_lib.merge_params(state.params, src_params, src_grid=src_grid,
                                           dst_grid=model.grid, place=ckpt_lib.place_like)
    logging.info("init_from %s: loaded %d tensors%s", desc, len(report["loaded"]),
                 f" (resized mediator biases {src_grid}->{model.grid})"
                 if src_grid != model.grid else "")
    if report["missing"]:
      logging.info("init_from: %d tensors missing from the source keep their fresh init: %s",
                    len(report["missing"]), ", ".join(report["missing"]))
    if report["mismatched"]:
      logging.warning("init_from: %d tensors with other shapes keep their fresh init: %s",
                      len(report["mismatched"]), ", ".join(report["mismatched"]))
    if report["unused"]:
      logging.warning("init_from: %d source tensors are not used by this model: %s",
                      len(report["unused"]), ", ".join(report["unused"]))
    params = merged
    if isinstance(model, models.DyDiT) and config.dydit.reorder:
      from edit_jax.models import dydit  # noqa: PLC0415
      host = jax.tree.map(np.asarray, jax.device_get(params))
      host, (hp, gp) = dydit.reorder_units(model, host)
      params = jax.tree.map(lambda src, like: ckpt_lib.place_like(np.asarray(src), like),
                            host, params)
      logging.info("dydit.reorder: heads and MLP groups of every block sorted by magnitude "
                   "(block 0 head order %s, group order %s)", hp[0].tolist(), gp[0].tolist())
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ema_params)(params)
    state = state.replace(params=params, opt_state=opt_state, ema_params=ema)
  return state, shardings, None


def _check_resumed_objective(wd: epath.Path, config):
  """A workdir with checkpoints resumes only with the objective it was trained with (checked before
  config.json is rewritten)."""
  ckdir = ckpt_lib.checkpoint_dir(str(wd))
  if not (wd / "config.json").exists() or not ckdir.exists():
    return
  if not any(p.name.isdigit() for p in ckdir.iterdir()):
    return
  saved = json.loads((wd / "config.json").read_text()).get("objective", "transport")
  if saved != config.get("objective", "transport"):
    raise ConfigError(f"{wd} holds checkpoints trained with objective={saved!r} but the config says "
                      f"objective={config.objective!r}: pass --config.objective={saved} to resume "
                      f"it, or use another workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until ``config.num_train_steps`` (resuming from ``workdir``); returns a summary.

  Summary: {"step", "total", "loss" (last logged), "stopped" ("done" | "preempted" (SIGTERM) |
  "interrupted" (Ctrl-C) | "time_limit"), "workdir", "state" (the final TrainState), "samples"
  (PNG of this step's samples or None), "digit_accuracy" (digits data: share of those samples the
  offline classifier assigns to their label, else None), "digit_samples"}.
  Nothing is written to ``workdir`` before the config, the data, the mesh and the checkpoint (a
  checkpoint of another configuration raises ``CheckpointMismatchError`` naming what differs)
  have been validated. Re-running a finished run trains nothing and writes its final samples if
  they are missing.
  Raises FloatingPointError when the loss becomes non-finite (nothing is saved after the last
  finite check, so the last checkpoint stays good), ConfigError / MeshError / DataError for bad
  settings.
  """
  maybe_initialize_distributed(config)
  workdir = str(workdir)
  if "://" not in workdir:  # Orbax needs absolute local paths
    workdir = os.path.abspath(workdir)
  pidx, pcount = jax.process_index(), jax.process_count()
  is_main = pidx == 0
  if jax.default_backend() == "cpu" and not hostmem.status()["applied"]:
    logging.warning("XLA:CPU host allocator settings are not active (%s): every step page-faults "
                    "its buffers in, ~1/3 slower (edit_jax/hostmem.py)", hostmem.status()["reason"])

  check_workdir(workdir)
  model = get_model(config)
  transport = get_objective(config, model)  # a Transport or a GaussianDiffusion
  mesh = sharding_lib.make_mesh(config.mesh_shape, tuple(config.mesh_axes))
  sharding_lib.check_batch_size(config.global_batch_size, mesh, config.grad_accum_steps, pcount)
  pipeline = data_lib.make_pipeline(config.data, seed=config.seed,
                                    global_batch_size=config.global_batch_size,
                                    process_index=pidx, process_count=pcount)
  check_config(config, model, pipeline.shape, pipeline.num_classes)
  rules = sharding_lib.rules_from_config(config)
  tx, schedule = make_optimizer(config)

  wd = epath.Path(workdir)
  _check_resumed_objective(wd, config)
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), max_to_keep=config.keep_checkpoints,
                               async_save=config.async_checkpointing)
  base = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(base)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings, meta = _restore_or_init(config, model, tx, mesh, rules, ckpt, init_rng)
    start = int(jax.device_get(state.step))
    if meta is not None and int(meta.get("data_position", start)) != start:
      logging.warning("checkpoint data_position %s != step %d; following the step",
                      meta.get("data_position"), start)
    # One jitted step (static), or one per mediator-count tuple (elastic), picked per step; the
    # loss of the run's objective (transport or Gaussian diffusion) for the model at each n
    # (a DyDiT: its fine-tuning loss, which takes the step and logs extra metrics).
    loss_fn, takes_step, extra_metrics = make_loss(config, model, transport)
    step_for = elastic_lib.step_selector(
        config, model, transport,
        lambda lf: make_train_step(
            lf, tx, schedule, mesh, shardings, grad_accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
            batch_axes=sharding_lib.BATCH, loss_takes_step=takes_step,
            extra_metrics=extra_metrics),
        loss_for=lambda m: loss_fn if m is model else make_loss(config, m, transport)[0])
    bsh = sharding_lib.batch_sharding(mesh)
    sampler = vae_state = None
    if config.sample.every > 0:
      sampler = make_sampler(config, model, transport, mesh, shardings.ema_params)
      if config.sample.vae_path:
        from edit_jax.eval import vae  # noqa: PLC0415
        vae_state = vae.load_vae_params(config.sample.vae_path)
    # Everything is validated and the checkpoint (if any) fits: only now touch the workdir.
    if is_main:
      ckpt_lib.write_json(wd / "config.json", _config_json(config))
    writer = metrics_lib.Writer(str(wd / "tensorboard"), enabled=is_main)
    if is_main:
      metrics_lib.log_parameter_overview(state.params)
      logging.info("model %s (mediators %s): %s params, %.3f GFLOPs/forward; mesh %s; global "
                   "batch %d", config.model.name or "custom", model.mediator_num or "none",
                   f"{models.count_params(state.params):,}",
                   _gflops(model), dict(mesh.shape), config.global_batch_size)
      writer.text(start, "config", "```\n" + str(config) + "\n```")

    flops_per_image = 2.0 * 3.0 * step_for.forward_gflops() * 1e9
    peak = metrics_lib.peak_tflops_per_device(override=config.peak_tflops_per_device)
    total = int(config.num_train_steps)
    labels = sample_labels(config, pipeline.num_classes)
    sample_key = jax.random.key(config.sample.seed)
    # Host arrays: valid jit inputs (replicated) on every process of a multi-host run.
    x0 = np.asarray(jax.random.normal(sample_key, (len(labels),) + tuple(pipeline.shape)))
    y0 = labels

    def save(step, reason):
      if is_main:
        logging.info("saving checkpoint at step %d (%s)", step, reason)
      ckpt.save(step, state, {"step": step, "data_position": step,
                              "model_config": models.model_config(model),
                              "config": _config_json(config)})

    def write_samples(step):
      if sampler is None:
        return
      x = np.asarray(jax.device_get(sampler(state.ema_params, x0, y0, sample_key)))
      if is_main:
        imgs = samples_to_images(x, config, vae_state)
        if imgs is None:
          import io  # noqa: PLC0415
          buf = io.BytesIO()
          np.save(buf, x)
          (wd / "samples").mkdir(parents=True, exist_ok=True)
          (wd / "samples" / f"step_{step:07d}_latents.npy").write_bytes(buf.getvalue())
          logging.info("step %d: saved latent samples (set config.sample.vae_path to decode them "
                       "to a PNG grid)", step)
          return
        grid = metrics_lib.make_grid(imgs, nrow=int(config.sample.per_class) if len(
            set(labels.tolist())) > 1 else int(math.sqrt(len(labels))) or 1)
        up = int(config.sample.get("upscale", 1))
        if up > 1:
          grid = np.repeat(np.repeat(grid, up, axis=0), up, axis=1)
        path = str(wd / "samples" / f"step_{step:07d}.png")
        writer.image(step, "samples", grid, png_path=path)
        metrics_lib.save_png(str(wd / "samples" / "latest.png"), grid)
        logging.info("step %d: wrote %s", step, path)
        acc = None
        if config.sample.get("digit_accuracy", False) and config.data.name == "digits":
          acc = _log_digit_accuracy(step, x, labels, writer)
        ckpt_lib.write_json(wd / "samples" / LATEST_SAMPLES, {
            "step": step, "num_train_steps": total, "png": path, "num_samples": len(labels),
            "digit_accuracy": acc})
        sampled["info"] = {"step": step, "digit_accuracy": acc, "num_samples": len(labels),
                           "png": path}

    sampled = {"info": _read_latest_samples(wd) if is_main else None}

    watcher = PreemptionWatcher(config.preemption_sync_every)
    it = pipeline.iterate(start)
    acc = None
    timer = metrics_lib.Timer()
    t_start = time.perf_counter()
    steps_since = 0
    last_checked = start
    last_saved = ckpt.latest_step()
    last_scalars: dict[str, float] = {}
    stopped = "done"
    step = start
    try:
      while step < total:
        batch = data_lib.to_global(next(it), bsh)
        state, m = step_for(step)(state, batch, train_rng)
        acc = m if acc is None else acc.merge(m)
        step += 1
        steps_since += 1
        log_now = step % config.log_every == 0 or step == total
        save_now = step % config.checkpoint_every == 0 or step == total
        if log_now or save_now:
          scalars = {k: float(v) for k, v in acc.compute().items()}
          if scalars["nonfinite"] > 0 or not math.isfinite(scalars["loss"]):
            raise FloatingPointError(
                f"loss became non-finite (nan/inf) between steps {last_checked} and {step}; "
                f"stopping without saving. The last good checkpoint is "
                f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in "
                f"{ckpt.directory}. Lower optim.learning_rate, set optim.grad_clip, add "
                "optim.warmup_steps, or use model.dtype=float32.")
          last_checked = step
          scalars.pop("nonfinite")
          dt = timer.lap()
          scalars.update(metrics_lib.throughput(steps_since, dt, config.global_batch_size,
                                                flops_per_image, jax.device_count(), peak))
          if not math.isfinite(scalars["mfu"]):
            scalars.pop("mfu")
          eta = (total - step) / max(scalars["steps_per_sec"], 1e-9)
          if is_main:
            logging.info(metrics_lib.progress_line(step, total, scalars, eta))
            if extra_metrics:
              logging.info("step %d: %s", step, ", ".join(
                  f"{n} {scalars[n]:.4f}" for n in extra_metrics if n in scalars))
            writer.scalars(step, scalars)
          last_scalars = scalars
          acc, steps_since = None, 0
        if save_now:
          save(step, "periodic" if step < total else "final")
          last_saved = step
        if config.sample.every > 0 and (step % config.sample.every == 0 or step == total):
          write_samples(step)
          timer.lap()  # sampling time is not training throughput
        out_of_time = (config.max_train_seconds > 0 and log_now and step < total
                       and _agree(time.perf_counter() - t_start > config.max_train_seconds))
        if out_of_time:
          logging.warning("max_train_seconds=%s reached at step %d of %d: saving, writing samples "
                          "and stopping early", config.max_train_seconds, step, total)
          if last_saved != step:
            save(step, "time limit")
            last_saved = step
          if config.sample.every > 0 and step % config.sample.every:
            write_samples(step)
          stopped = "time_limit"
          break
        if step < total and watcher.should_stop(step, ckpt):
          if last_saved != step:
            save(step, "Ctrl-C" if watcher.interrupted else "preemption/SIGTERM")
            last_saved = step
          stopped = "interrupted" if watcher.interrupted else "preempted"
          logging.warning("stopping at step %d of %d after %s; continue by rerunning the same "
                          "command", step, total,
                          "Ctrl-C" if watcher.interrupted else "a termination request")
          break
      if start >= total and sampler is not None:
        # Already trained (a re-run, or a run stopped between its final save and its samples):
        # write the final samples if they are missing, train nothing.
        info = sampled["info"]
        if _agree(not info or info.get("step") != step):
          write_samples(step)
    finally:
      watcher.close()
      ckpt.wait()
      writer.flush()
      writer.close()
    ckpt.close()
  elapsed = time.perf_counter() - t_start
  if is_main:
    logging.info("finished at step %d (%s) in %s", step, stopped,
                 metrics_lib.format_duration(elapsed))
  info = sampled["info"] or {}
  return {"step": step, "total": total, "loss": last_scalars.get("loss", float("nan")),
          "stopped": stopped, "workdir": workdir, "state": state,
          "samples": info.get("png") if info.get("step") == step else None,
          "digit_accuracy": info.get("digit_accuracy") if info.get("step") == step else None,
          "digit_samples": info.get("num_samples")}


# samples/latest.json: {"step", "num_train_steps", "png", "num_samples", "digit_accuracy"}
LATEST_SAMPLES = "latest.json"


def _read_latest_samples(wd) -> dict | None:
  try:
    return json.loads((wd / "samples" / LATEST_SAMPLES).read_text())
  except Exception:  # noqa: BLE001 - missing or unreadable: treated as "no samples yet"
    return None


def _log_digit_accuracy(step, samples, labels, writer):
  """Share of sampled digits that the offline classifier (edit_jax.eval.digits, trained once
  and cached, 98% held-out accuracy) assigns to their conditioning label. Informative only."""
  try:
    from edit_jax.eval import digits  # noqa: PLC0415
    acc = digits.conditional_accuracy(np.clip(samples, -1.0, 1.0), labels)
  except Exception as e:  # noqa: BLE001 - a metric must never stop training
    logging.warning("digit accuracy unavailable: %s", e)
    return None
  logging.info("step %d: %.1f%% of the %d sampled digits are classified as their label "
               "(offline classifier)", step, 100 * acc, len(labels))
  writer.scalars(step, {"sample_digit_accuracy": acc})
  return float(acc)


def _agree(flag: bool) -> bool:
  """True on every process if it is True on process 0 (host-local decisions made global)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _gflops(model) -> float:
  from edit_jax import flops  # noqa: PLC0415
  return flops.gflops(model)


__all__ = [
    "TrainState", "default_config", "get_model", "get_transport", "get_diffusion",
    "get_objective", "make_optimizer",
    "create_train_state", "make_train_step", "train_and_evaluate", "resize_mediator_params",
    "maybe_initialize_distributed", "state_shardings", "ConfigError", "make_loss",
]
