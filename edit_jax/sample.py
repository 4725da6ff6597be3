"""Sample images from SiT / DiT / EDT checkpoints: command line and `sample_images(...)` for notebooks.

    python -m edit_jax.sample --ckpt CKPT --out DIR --num_samples 64 --batch_size 32 \\
        [--objective transport|gaussian] [--mode sde|ode|ddpm|ddim] \\
        [--method Euler|Heun|euler|heun2|dopri5] [--num_steps 250] [--eta 0.0] \\
        [--respacing ddim50] [--clip_denoised] \\
        [--cfg_scale 4.0] [--guide_channels 3|all] [--guidance_interval 0.0,0.7] \\
        [--classes random|3,17,207|FILE] [--seed 0] [--vae PATH] [--raw_weights] [--overwrite] \\
        [--amm official|official_alt|none|all|7,10] [--amm_mode post_softmax|log_bias]
    # step-wise dynamic mediators: several checkpoints, fewest mediators first
    python -m edit_jax.sample --ckpt n4 --ckpt n16 --ckpt n64 --switch_ratios 0.8,0.6 \\
        --first_several 3 --distance l1 --out DIR ...
    # the same with ONE elastic-mediator checkpoint (edit_jax.elastic) run at n = 4, 16, 64
    python -m edit_jax.sample --ckpt elastic --mediators 4,16,64 --switch_ratios 0.8,0.6 ...
    python -m edit_jax.sample --ckpt elastic --mediators 16 ...     # static sampling at n = 16

CKPT: a training workdir (EMA weights of the newest step; --raw_weights for the raw ones), a
directory written by `python -m edit_jax.convert`, or an official .pt/.npz file
(`edit_jax.checkpoint.load_params_for_sampling`).

Outputs in DIR (never overwritten unless --overwrite): `samples.npz` (ADM format: `arr_0`,
N x H x W x 3 uint8, 1-channel images repeated to 3 channels; `arr_1`, (N,) int64 class labels),
`grid.png` (the first <= 64 images), `summary.json` (sampler, steps, guidance, NFE and GFLOPs per
image, images/s, dynamic schedule statistics, the labels).

Labels (`--classes`, alias `--labels`): `random` (uniform, the official default), comma-separated
class ids (`3,7`: cycled over the samples: 3, 7, 3, 7, ...), or a file of class ids (`.npy`, an
`.npz` with `arr_1` such as another run's samples.npz, or text with ids separated by commas,
spaces or newlines), cycled to --num_samples. Ids must be in [0, num_classes).
User errors (missing checkpoint, bad option, existing output) exit with status 2 and one line;
`--debug` shows the traceback. Pixel-space models (1 or 3 channels) are mapped from [-1, 1] to uint8 as the official
scripts (clip(127.5 x + 128)); latent models (4 channels) are decoded by the SD-VAE given with --vae
(or $EDIT_JAX_VAE). The batch is split over all local devices (NamedSharding).

--amm applies EDT's attention modulation matrix (training-free, edit_jax.models.amm) in the named
blocks of any full-attention model (SiT, DiT, EDT; mediator blocks are never modulated): default
"keep" uses the checkpoint's setting (EDT: its official blocks; SiT: none), "official" the EDT
code's list for the model (EDT-S/B: 7,10; EDT-XL: 23,25; DiT/SiT-XL/2: 15,17,19,22,24; -S/2: 8,10),
"official_alt" EDT's list for CFG >= 2 (S/B: 8; XL: 24), "none" switches it off.

Objective: what the checkpoint was trained with. By default it is read from the checkpoint
(training workdirs and converted directories record it, `convert` records gaussian for EDT
weights; an official file named `DiT-*` or `EDT-*` is taken as gaussian, any other unconverted
file as transport); `--objective` overrides. "transport" (SiT): `--mode sde|ode`. "gaussian" (DiT's discrete diffusion): `--mode ddpm|ddim` on the chain
`create_diffusion(str(num_steps))` (or `--respacing`, e.g. ddim50 or 100,50), `--eta` for DDIM,
`--clip_denoised` to clip x0 to [-1, 1].

Defaults follow the official scripts: SiT sample_ddp.py (SDE Euler-Maruyama, sigma diffusion,
Mean last step 0.04, 250 steps) and DiT sample_ddp.py (DDPM, 250 steps, no clipping); cfg 1.0,
uniform random labels.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax import cli
from edit_jax.diffusion import gaussian, guidance, samplers
from edit_jax.diffusion.transport import create_transport

OUTPUT_FILES = ("samples.npz", "grid.png", "summary.json")


@dataclasses.dataclass
class SampleConfig:
  ckpts: Sequence[str] = ()
  out: Optional[str] = None
  num_samples: int = 64
  batch_size: int = 32
  objective: Optional[str] = None       # "transport" | "gaussian" (None: from the checkpoint)
  mode: Optional[str] = None            # "sde" | "ode" (transport), "ddpm" | "ddim" (gaussian)
  method: Optional[str] = None          # sde: Euler|Heun; ode: euler|heun2|dopri5 (None: default)
  num_steps: int = 250
  atol: float = 1e-6
  rtol: float = 1e-3
  diffusion_form: str = "sigma"
  diffusion_norm: float = 1.0
  last_step: Optional[str] = "Mean"
  last_step_size: float = 0.04
  path_type: str = "Linear"
  prediction: str = "velocity"
  sample_eps: Optional[float] = None
  eta: float = 0.0                      # gaussian DDIM noise
  clip_denoised: bool = False           # gaussian: clip the x0 prediction to [-1, 1]
  respacing: str = ""                   # gaussian: chain ("" -> str(num_steps); "ddim50", ...)
  cfg_scale: float = 1.0
  guide_channels: Optional[int] = 3
  guidance_interval: Optional[Any] = None
  labels: Any = "random"                # "random", a list of ints, "3,7" or a file (cycled to N)
  seed: int = 0
  ema: bool = True
  vae: Optional[str] = None
  switch_ratios: Sequence[float] = ()
  mediators: Sequence[int] = ()         # elastic checkpoint: mediator counts (one per stage)
  first_several: int = 3
  distance: str = "l1"
  per_sample_switching: bool = True
  overwrite: bool = False
  progress: bool = True
  amm: Optional[Any] = None             # None: as the checkpoint; "none", "official", "7,10", ...
  amm_mode: Optional[str] = None        # None: as the checkpoint; "post_softmax" | "log_bias"
  grid_max: int = 64


OBJECTIVES = ("transport", "gaussian")
MODES = {"transport": ("sde", "ode"), "gaussian": ("ddpm", "ddim")}


def sampler_config(cfg: SampleConfig, objective: str = "transport"):
  mode = cfg.mode or MODES[objective][0]
  if mode not in MODES[objective]:
    other = "gaussian" if objective == "transport" else "transport"
    if mode in MODES[other]:
      raise ValueError(f"--mode {mode} samples the {other} objective but this checkpoint uses "
                       f"objective={objective!r}: use --mode {'/'.join(MODES[objective])} (or "
                       f"--objective {other} if the checkpoint's objective is recorded wrongly)")
    raise ValueError(f"unknown mode {mode!r}: expected one of "
                     f"{MODES['transport'] + MODES['gaussian']}")
  if objective == "gaussian":
    if cfg.method is not None:
      raise ValueError(f"--method {cfg.method} is a transport option; the gaussian objective "
                       f"chooses its sampler with --mode ddpm|ddim")
    return gaussian.GaussianSamplerConfig(method=mode, num_steps=cfg.num_steps, eta=cfg.eta,
                                          clip_denoised=cfg.clip_denoised,
                                          respacing=cfg.respacing).validate()
  if cfg.eta or cfg.respacing or cfg.clip_denoised:
    raise ValueError("--eta, --respacing and --clip_denoised apply to the gaussian objective "
                     "(DDPM/DDIM) only")
  if mode == "sde":
    return samplers.SDEConfig(method=cfg.method or "Euler", num_steps=cfg.num_steps,
                              diffusion_form=cfg.diffusion_form, diffusion_norm=cfg.diffusion_norm,
                              last_step=cfg.last_step, last_step_size=cfg.last_step_size).validate()
  return samplers.ODEConfig(method=cfg.method or "dopri5", num_steps=cfg.num_steps,
                            atol=cfg.atol, rtol=cfg.rtol).validate()


def resolve_objective(cfg: SampleConfig) -> tuple[str, Optional[dict]]:
  """(objective, Gaussian diffusion settings or None): --objective, else what the checkpoints
  record (they must agree), else "transport"."""
  from edit_jax import checkpoint  # noqa: PLC0415
  if cfg.objective is not None and cfg.objective not in OBJECTIVES:
    raise ValueError(f"objective={cfg.objective!r}: expected one of {list(OBJECTIVES)}")
  records = [checkpoint.load_objective(c) for c in cfg.ckpts]
  known = {r["objective"] for r in records if r is not None}
  if cfg.objective is None and len(known) > 1:
    raise ValueError(f"the checkpoints were trained with different objectives {sorted(known)}: a "
                     f"schedule needs one objective")
  objective = cfg.objective or (known.pop() if known else "transport")
  settings = [r.get("diffusion") for r in records if r is not None and r.get("diffusion")]
  if objective == "gaussian" and settings and any(x != settings[0] for x in settings):
    raise ValueError(f"the checkpoints record different diffusion settings: {settings}")
  return objective, (settings[0] if objective == "gaussian" and settings else None)


def _check_outputs(out: Optional[str], overwrite: bool):
  if out is None:
    return
  existing = [str(pathlib.Path(out) / f) for f in OUTPUT_FILES if (pathlib.Path(out) / f).exists()]
  if existing and not overwrite:
    raise FileExistsError(f"refusing to overwrite {', '.join(existing)}: choose another --out "
                          f"directory or pass --overwrite")


def read_class_file(path) -> np.ndarray:
  """Class ids from a file: .npy, .npz (``arr_1``, e.g. a samples.npz) or text (ints separated by
  commas, spaces or newlines). Raises ValueError naming the file when it holds no class ids."""
  path = pathlib.Path(path)
  try:
    if path.suffix == ".npy":
      arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
      with np.load(path, allow_pickle=False) as f:
        if "arr_1" not in f.files:
          raise ValueError(f"{path} has no `arr_1` (labels) array; its arrays are {f.files}")
        arr = f["arr_1"]
    else:
      toks = path.read_text().replace(",", " ").split()
      arr = np.asarray([int(t) for t in toks], np.int64)
  except (ValueError, OSError) as e:
    if isinstance(e, ValueError) and "arr_1" in str(e):
      raise
    raise ValueError(f"cannot read class ids from {path}: {e}") from None
  arr = np.asarray(arr)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{path} must hold a 1-D list of integer class ids, got {arr.dtype} "
                     f"{arr.shape}")
  return arr.astype(np.int64)


def parse_classes(spec) -> np.ndarray:
  """Class ids from "3,7" (comma-separated ints) or from the path of a file of class ids."""
  text = str(spec).strip()
  if text and all(ch.isdigit() or ch in ", -" for ch in text):
    try:
      return np.asarray([int(v) for v in text.split(",") if v.strip()], np.int64)
    except ValueError:
      pass
  if pathlib.Path(text).is_file():
    return read_class_file(text)
  raise ValueError(f"classes {text!r}: expected 'random', comma-separated class ids (3,7) or an "
                   f"existing file of class ids")


def _labels(cfg: SampleConfig, num_classes: int) -> np.ndarray:
  n = cfg.num_samples
  if isinstance(cfg.labels, str) and cfg.labels == "random":
    return np.asarray(jax.random.randint(jax.random.key(cfg.seed + 1_000_003), (n,), 0,
                                         num_classes), np.int32)
  labels = cfg.labels
  if isinstance(labels, (str, pathlib.Path)):
    labels = parse_classes(labels)
  labels = np.asarray(list(labels), np.int64)
  if labels.size == 0:
    raise ValueError("labels is empty: give 'random' or at least one class id")
  samplers.check_labels(labels, num_classes)
  return np.resize(labels, n).astype(np.int32)


def to_uint8(x) -> np.ndarray:
  """[-1, 1] NHWC float -> uint8 NHWC with 3 channels (as the official clip(127.5 x + 128))."""
  img = np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return img


def image_grid(images: np.ndarray, max_images: int = 64) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid of the first max_images images."""
  imgs = images[:max_images]
  n, h, w, c = imgs.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, im in enumerate(imgs):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
  return grid


def _load_models(cfg: SampleConfig):
  from edit_jax import checkpoint  # noqa: PLC0415
  out = []
  for c in cfg.ckpts:
    model, params = checkpoint.load_params_for_sampling(c, ema=cfg.ema)
    out.append((model, params))
  return out


def _at_mediators(model_params, mediators):
  """[(model at n, params) for n in mediators] from one elastic checkpoint (the same params)."""
  from edit_jax import elastic  # noqa: PLC0415
  model, params = model_params
  if not elastic.is_elastic(model):
    if tuple(mediators) == (getattr(model, "mediator_num", 0),):
      return [(model, params)]
    raise ValueError(f"--mediators {','.join(map(str, mediators))}: this checkpoint is a static "
                     f"model with n={model.mediator_num} (not elastic); use an elastic checkpoint "
                     f"(config.elastic / python -m edit_jax.elastic init) or one --ckpt per n")
  return [(elastic.at(model, n), params) for n in mediators]


def with_amm(model, amm=None, amm_mode=None):
  """`model` with its AMM blocks / mode replaced (None: unchanged); validated."""
  kw = {}
  if amm is not None and str(amm).strip().lower() != "keep":
    from edit_jax.models import amm as amm_lib  # noqa: PLC0415
    kw["amm_layers"] = amm_lib.parse_layers(amm)
  if amm_mode is not None:
    kw["amm_mode"] = amm_mode
  if not kw:
    return model
  model = model.clone(**kw)
  model.validate()
  return model


def _decoder(model, cfg: SampleConfig):
  """Returns f(states (B, H, W, C)) -> uint8 (B, H', W', 3); raises before any sampling."""
  if model.in_channels in (1, 3):
    return to_uint8
  if model.in_channels == 4:
    from edit_jax.eval import vae  # noqa: PLC0415  (lazy: only latent models need it)
    try:
      vparams = vae.load_vae_params(cfg.vae)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"this model works on 4-channel VAE latents and needs the SD-VAE decoder: "
                       f"pass --vae PATH (or set ${vae.WEIGHTS_ENV}). {e}") from e
    return lambda z: vae.decode_latents(vparams, z, batch_size=cfg.batch_size)
  raise ValueError(f"cannot turn {model.in_channels}-channel samples into images: expected 1 or 3 "
                   f"(pixel space) or 4 (SD-VAE latents)")


def sample_images(ckpts=None, out: Optional[str] = None, *, models_and_params=None,
                  **kwargs) -> dict:
  """Samples images; returns {"images": (N, H, W, 3) uint8, "labels": (N,), "summary": dict}.

  ckpts: one checkpoint (static) or several (the dynamic mediator schedule, fewest mediators first);
  or pass `models_and_params=[(model, params), ...]` directly. out: directory for samples.npz /
  grid.png / summary.json (None: write nothing). kwargs: any `SampleConfig` field.
  """
  if isinstance(ckpts, (str, pathlib.Path)):
    ckpts = [str(ckpts)]
  cfg = SampleConfig(ckpts=list(ckpts or []), out=out, **kwargs)
  return run(cfg, models_and_params=models_and_params)


def run(cfg: SampleConfig, models_and_params=None) -> dict:
  from edit_jax.diffusion import dynamic  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  # ---- validation before any work
  _check_outputs(cfg.out, cfg.overwrite)
  objective, diffusion_settings = resolve_objective(cfg)
  scfg = sampler_config(cfg, objective)
  if objective == "gaussian":
    # provisional (learned variance or not comes from the model): validates the chain now
    transport = gaussian.diffusion_from_settings(diffusion_settings, True)
    gaussian.check_guidance(cfg.cfg_scale, cfg.guide_channels, cfg.guidance_interval)
  else:
    transport = create_transport(cfg.path_type, cfg.prediction, sample_eps=cfg.sample_eps)
  if scfg.kind == "sde" or scfg.fixed:
    samplers.program(transport, scfg)
  if cfg.num_samples < 1 or cfg.batch_size < 1:
    raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size} must be >= 1")
  devices = jax.local_devices()
  if cfg.batch_size % len(devices):
    raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {len(devices)} local "
                     f"devices (the batch is split across them)")
  guidance.check_guidance(cfg.cfg_scale, cfg.guide_channels, cfg.guidance_interval)
  ratios = tuple(cfg.switch_ratios)
  mediators = tuple(int(n) for n in cfg.mediators)
  if models_and_params is None:
    if not cfg.ckpts:
      raise ValueError("no checkpoint given: pass --ckpt PATH (several for the dynamic schedule)")
    n_sources = len(cfg.ckpts)
  else:
    n_sources = len(models_and_params)
  n_models = n_sources
  if mediators:
    if n_sources != 1:
      raise ValueError(f"--mediators {','.join(map(str, mediators))} selects mediator counts of ONE "
                       f"elastic checkpoint, but {n_sources} checkpoints were given: pass a single "
                       f"--ckpt, or drop --mediators to schedule separate checkpoints")
    if any(b <= a for a, b in zip(mediators, mediators[1:])):
      raise ValueError(f"--mediators {','.join(map(str, mediators))} must be strictly increasing "
                       f"(the schedule goes from fewest to most mediators, e.g. 4,16,64)")
    n_models = len(mediators)
  rule = None
  if n_models > 1:
    rule = dynamic.SwitchRule(ratios, cfg.first_several, cfg.distance).validate(n_models)
    if not scfg.fixed:
      raise ValueError("the dynamic schedule needs a fixed-step sampler: use --mode sde, or --mode "
                       "ode with --method euler/heun2")
  elif ratios:
    raise ValueError(f"--switch_ratios {list(ratios)} given with a single checkpoint: the dynamic "
                     f"schedule needs one checkpoint per mediator count (--ckpt n4 --ckpt n16 ...)"
                     f" or one elastic checkpoint with --mediators 4,16,64")

  # ---- models
  mp = models_and_params if models_and_params is not None else _load_models(cfg)
  if mediators:
    mp = _at_mediators(mp[0], mediators)
  mp = [(with_amm(m, cfg.amm, cfg.amm_mode), p) for m, p in mp]
  models_ = [m for m, _ in mp]
  params = [p for _, p in mp]
  if n_models > 1:
    dynamic.check_schedule_models(models_, params)
  model = models_[-1]
  guidance.check_guidance(cfg.cfg_scale, cfg.guide_channels, cfg.guidance_interval,
                          model.in_channels)
  if objective == "gaussian":
    transport = gaussian.diffusion_from_settings(diffusion_settings, model.learn_sigma)
  decode = _decoder(model, cfg)
  labels = _labels(cfg, model.num_classes)

  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b = cfg.batch_size
  shape = (b, model.input_size, model.input_size, model.in_channels)
  n_batches = math.ceil(cfg.num_samples / b)
  use_cfg = guidance.uses_guidance(cfg.cfg_scale)

  if n_models > 1:
    runner = dynamic.DynamicSampler(
        models_, params, transport, scfg, rule, batch_size=b, cfg_scale=cfg.cfg_scale,
        guide_channels=cfg.guide_channels, guidance_interval=cfg.guidance_interval,
        per_sample=cfg.per_sample_switching, mesh=mesh if len(devices) > 1 else None)
  else:
    make = gaussian.make_sample_fn if objective == "gaussian" else samplers.make_sample_fn
    fn = make(model, transport, scfg, cfg_scale=cfg.cfg_scale, guide_channels=cfg.guide_channels,
              guidance_interval=cfg.guidance_interval)
    jitted = jax.jit(fn, out_shardings=samplers.Sample(batch_sh, repl))
    params_r = jax.device_put(params[0], repl)

  noise_fn = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=batch_sh)
  base = jax.random.key(cfg.seed)
  images, nfes, gfl, stage_hist, times, executed = [], [], [], [], [], []
  it = range(n_batches)
  if cfg.progress:
    from tqdm.auto import tqdm  # noqa: PLC0415
    it = tqdm(it, desc="sampling", unit="batch")
  t_start = time.perf_counter()
  for i in it:
    t0 = time.perf_counter()
    kb = jax.random.fold_in(base, i)
    x0 = noise_fn(jax.random.fold_in(kb, 0))
    rng = jax.random.fold_in(kb, 1)
    lab = np.zeros(b, np.int32)
    chunk = labels[i * b:(i + 1) * b]
    lab[:len(chunk)] = chunk
    if n_models > 1:
      res = runner.sample(x0, lab, rng)
      x = res.x
      nfes.append(float(res.nfe.mean()))
      gfl.append(res.gflops[:len(chunk)])
      stage_hist.append(res.stages[:, :len(chunk)])
      executed.append(res.gflops_executed)
    else:
      s = jitted(params_r, x0, jax.device_put(lab, batch_sh), rng)
      x = s.x
      nfes.append(float(s.nfe))
    imgs = np.asarray(decode(x))[:len(chunk)]
    images.append(imgs)
    times.append(time.perf_counter() - t0)
  total = time.perf_counter() - t_start
  images = np.concatenate(images)[:cfg.num_samples]

  # ---- accounting
  g_model = flops.gflops(model)
  if n_models > 1:
    gflops_img = float(np.concatenate(gfl).mean())
    stages = np.concatenate(stage_hist, axis=1)
    dyn = {
        "mediator_nums": [int(m.mediator_num) for m in models_],
        "switch_ratios": list(rule.ratios), "first_several": rule.first_several,
        "distance": rule.distance, "per_sample": cfg.per_sample_switching,
        "steps_per_stage_mean": [float((stages[:-1] == j).sum(0).mean())
                                 for j in range(n_models)],
        "gflops_static_largest_per_image": float(res.gflops_static),
        "gflops_executed_per_image": float(np.mean(executed)),
    }
  else:
    if scfg.fixed:
      ev = samplers.program(transport, scfg).eval_times()
      fwd = guidance.guidance_forwards(ev, cfg.cfg_scale, cfg.guidance_interval).sum()
    else:
      fwd = float(np.mean(nfes)) * (2 if use_cfg else 1)
    gflops_img = float(g_model * fwd)
    dyn = None
  steady = times[1:] if len(times) > 1 else times
  summary = {
      "checkpoints": [str(c) for c in cfg.ckpts],
      "mediators": [int(m.mediator_num) for m in models_],
      "elastic": bool(getattr(model, "elastic_grid", 0)),
      "num_samples": cfg.num_samples, "batch_size": b, "devices": len(devices),
      "device_kind": devices[0].device_kind, "image_shape": list(images.shape[1:]),
      "sampler": dataclasses.asdict(scfg) | {"kind": scfg.kind},
      "objective": objective,
      "transport": dataclasses.asdict(transport) if objective == "transport" else None,
      "diffusion": (gaussian.for_sampling(transport, scfg).describe()
                    if objective == "gaussian" else None),
      "cfg_scale": cfg.cfg_scale, "guide_channels": cfg.guide_channels,
      "guidance_interval": cfg.guidance_interval, "seed": cfg.seed,
      "model_arch": getattr(model, "arch", "sit"),
      "amm_blocks": list(getattr(model, "amm_blocks", ())), "amm_mode": model.amm_mode,
      "nfe_per_image": float(np.mean(nfes)),
      "gflops_per_forward": g_model,
      "gflops_per_image": gflops_img,
      "seconds_total": total,
      "images_per_second": cfg.num_samples / total,
      "images_per_second_steady": (b * len(steady)) / sum(steady),
      "dynamic": dyn,
      "labels": [int(v) for v in labels],
  }
  if cfg.out is not None:
    from PIL import Image  # noqa: PLC0415
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_outputs(cfg.out, cfg.overwrite)  # again: someone may have written meanwhile
    np.savez(out / "samples.npz", arr_0=images, arr_1=labels.astype(np.int64))
    Image.fromarray(image_grid(images, cfg.grid_max)).save(out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return {"images": images, "labels": labels, "summary": summary}


# --------------------------------------------------------------------------- CLI
def _parse_interval(s):
  return None if s in (None, "", "none") else guidance.parse_interval(s)


def build_parser() -> argparse.ArgumentParser:
  d = SampleConfig()
  ap = argparse.ArgumentParser(prog="python -m edit_jax.sample",
                               description="Sample images from SiT / DiT / EDT checkpoints.")
  ap.add_argument("--ckpt", action="append", required=True, dest="ckpts",
                  help="checkpoint (repeat for the dynamic schedule, fewest mediators first)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--num_samples", type=int, default=d.num_samples)
  ap.add_argument("--batch_size", type=int, default=d.batch_size)
  ap.add_argument("--objective", choices=OBJECTIVES, default=None,
                  help="what the checkpoint was trained with (default: recorded in it, else "
                       "transport)")
  ap.add_argument("--mode", choices=("sde", "ode", "ddpm", "ddim"), default=None,
                  help="transport: sde (default) | ode; gaussian: ddpm (default) | ddim")
  ap.add_argument("--method", default=None, help="SDE: Euler|Heun; ODE: euler|heun2|dopri5")
  ap.add_argument("--eta", type=float, default=d.eta, help="gaussian DDIM noise (0: deterministic)")
  ap.add_argument("--respacing", default=d.respacing,
                  help="gaussian: timestep respacing, e.g. 250, ddim50, 100,50 (default: num_steps)")
  ap.add_argument("--clip_denoised", action="store_true",
                  help="gaussian: clip the predicted x0 to [-1, 1] (pixel-space models)")
  ap.add_argument("--num_steps", type=int, default=d.num_steps)
  ap.add_argument("--atol", type=float, default=d.atol)
  ap.add_argument("--rtol", type=float, default=d.rtol)
  ap.add_argument("--diffusion_form", default=d.diffusion_form)
  ap.add_argument("--diffusion_norm", type=float, default=d.diffusion_norm)
  ap.add_argument("--last_step", default=d.last_step, help="Mean|Tweedie|Euler|None")
  ap.add_argument("--last_step_size", type=float, default=d.last_step_size)
  ap.add_argument("--path_type", default=d.path_type)
  ap.add_argument("--prediction", default=d.prediction)
  ap.add_argument("--sample_eps", type=float, default=None)
  ap.add_argument("--cfg_scale", type=float, default=d.cfg_scale)
  ap.add_argument("--guide_channels", default="3", help="int, or 'all'")
  ap.add_argument("--guidance_interval", default=None, help="t_lo,t_hi (t=0 noise, t=1 data)")
  ap.add_argument("--classes", "--labels", default="random", dest="labels",
                  help="'random', comma-separated class ids (cycled), or a file of class ids "
                       "(.npy, .npz with arr_1, or text)")
  ap.add_argument("--seed", type=int, default=d.seed)
  ap.add_argument("--raw_weights", action="store_true", help="raw instead of EMA weights")
  ap.add_argument("--vae", default=None, help="SD-VAE weights (latent models)")
  ap.add_argument("--mediators", default="",
                  help="elastic checkpoint: mediator counts, e.g. 4,16,64 (schedule, fewest first)"
                       " or 16 (static)")
  ap.add_argument("--switch_ratios", default="", help="rho_1,...,rho_{K-1} (dynamic schedule)")
  ap.add_argument("--first_several", type=int, default=d.first_several)
  ap.add_argument("--distance", default=d.distance, help="l1 (mae) or l2 (mse)")
  ap.add_argument("--batch_switching", action="store_true",
                  help="official batch-level switching instead of per-sample")
  ap.add_argument("--overwrite", action="store_true")
  ap.add_argument("--no_progress", action="store_true")
  ap.add_argument("--amm", default=None,
                  help="EDT's attention modulation matrix: keep (checkpoint's setting), none, "
                       "official, official_alt, all, or block indices '7,10'")
  ap.add_argument("--amm_mode", default=None, choices=("post_softmax", "log_bias"))
  cli.add_debug_flag(ap)
  return ap


def config_from_args(argv=None) -> SampleConfig:
  a = build_parser().parse_args(argv)
  gch = None if str(a.guide_channels).lower() in ("all", "none") else int(a.guide_channels)
  try:
    ratios = tuple(float(v) for v in a.switch_ratios.split(",") if v.strip())
  except ValueError:
    raise ValueError(f"--switch_ratios {a.switch_ratios!r}: expected comma-separated floats") \
        from None
  try:
    mediators = tuple(int(v) for v in a.mediators.split(",") if v.strip())
  except ValueError:
    raise ValueError(f"--mediators {a.mediators!r}: expected comma-separated perfect squares, "
                     f"e.g. 4,16,64") from None
  return SampleConfig(
      mediators=mediators, ckpts=a.ckpts, out=a.out, num_samples=a.num_samples,
      batch_size=a.batch_size, mode=a.mode,
      objective=a.objective, eta=a.eta, respacing=a.respacing, clip_denoised=a.clip_denoised,
      method=a.method, num_steps=a.num_steps, atol=a.atol, rtol=a.rtol,
      diffusion_form=a.diffusion_form, diffusion_norm=a.diffusion_norm,
      last_step=None if a.last_step in ("None", "none") else a.last_step,
      last_step_size=a.last_step_size, path_type=a.path_type, prediction=a.prediction,
      sample_eps=a.sample_eps, cfg_scale=a.cfg_scale, guide_channels=gch,
      guidance_interval=_parse_interval(a.guidance_interval), labels=a.labels, seed=a.seed,
      ema=not a.raw_weights, vae=a.vae, switch_ratios=ratios, first_several=a.first_several,
      distance=a.distance, per_sample_switching=not a.batch_switching, overwrite=a.overwrite,
      progress=not a.no_progress, amm=a.amm, amm_mode=a.amm_mode)


def main(argv=None):
  cfg = config_from_args(argv)
  res = run(cfg)
  s = res["summary"]
  print(f"wrote {cfg.num_samples} images to {cfg.out}: NFE/image {s['nfe_per_image']:.0f}, "
        f"GFLOPs/image {s['gflops_per_image']:.4g}, {s['images_per_second']:.3g} images/s")
  return res


if __name__ == "__main__":
  cli.run(main, "python -m edit_jax.sample")
