"""DiT: the SiT/DiT backbone trained with DiT's discrete Gaussian diffusion (objective="gaussian").

Preset string: ``<size><patch>[-med<n>][-<resolution>]`` as configs/sit.py (``S2``, ``XL2``,
``B2-med64``, ``XL2-med64-512``, ...), plus ``digits``: the quickstart's model, data and recipe
(configs/quickstart.py) with the Gaussian objective.

    # ImageNet latents (once): python -m edit_jax.prepare --src=IMAGENET/train --dst=LAT256 --vae=VAE
    python -m edit_jax.main --config=configs/dit.py:XL2 --workdir=gs://BUCKET/dit-xl2 \
        --config.data.path=LAT256 --config.sample.vae_path=VAE
    python -m edit_jax.main --config=configs/dit.py:digits --workdir=runs/dit-digits   # CPU, minutes

Recipe (facebookresearch/DiT train.py): ``create_diffusion(timestep_respacing="")`` = 1000 linear
betas, epsilon prediction, learned-range variance (learn_sigma=True: loss = mse + vb), t uniform
over 0..999; AdamW lr 1e-4, no weight decay, constant lr, global batch 256, EMA 0.9999, label
dropout 0.1, fp32. Sample grids as DiT sample.py: DDPM 250 steps, cfg 4.0 on 3 channels, no x0
clipping. The network is the SiT module (same weights layout as DiT: official DiT checkpoints load
with ``python -m edit_jax.convert DiT-XL-2-256x256.pt OUT --objective gaussian``); with
``-med<n>`` its attention uses n mediators. Resuming: rerun the same command (the objective must
match the workdir's).

Sized for / expected results (FID-50K, ADM evaluator; [paper] = published, not reproduced here):
  S2 / B2 @256: one TPU v4-8 (or 8 GPUs), 400K steps. [DiT paper, Table 4, cfg 1] DiT-S/2 FID 68.4,
      DiT-B/2 43.5 at 400K steps.
  XL2 @256: TPU v4-32 / v5p-32, mesh (-1, 4) (FSDP), bf16, 7M steps. [DiT paper] FID 9.62 (cfg 1),
      2.27 (cfg 1.5, 250 DDPM steps).
  digits: a 2-core CPU, ~1,500 steps in the quickstart's time budget; docs/results.md ("Gaussian
      diffusion vs transport on the digits") gives the measured digit FD / accuracy.
No accelerator was available while writing these presets.
"""
import importlib.util
import pathlib
import re

from edit_jax.train import default_config

_PRESET = re.compile(r"^(S|B|L|XL)(2|4|8)(?:-med(\d+))?(?:-(256|512|1024))?$")
STEPS = {"S": 400_000, "B": 400_000, "L": 400_000, "XL": 7_000_000}
FSDP = {"S": 1, "B": 1, "L": 4, "XL": 4}


def _gaussian(c):
  c.objective = "gaussian"
  c.model.learn_sigma = True  # DiT: learned-range variance, loss = mse + vb
  c.sample.update(dict(method="ddpm", num_steps=250, eta=0.0, clip_denoised=False, respacing=""))
  return c


def _digits():
  """configs/quickstart.py with the Gaussian objective (DDIM-50 grids, x0 clipped: pixel data)."""
  spec = importlib.util.spec_from_file_location(
      "_quickstart_config", pathlib.Path(__file__).with_name("quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = _gaussian(mod.get_config())
  c.sample.update(dict(method="ddim", num_steps=50, clip_denoised=True))
  return c


def get_config(preset: str = "XL2"):
  preset = preset or "XL2"
  if preset == "digits":
    return _digits()
  m = _PRESET.match(preset)
  if not m:
    raise ValueError(f"unknown preset {preset!r}: expected digits or <S|B|L|XL><2|4|8>[-med<n>]"
                     "[-<256|512|1024>], e.g. XL2, S2-med64 or XL2-512")
  size, patch, n, res = m.group(1), int(m.group(2)), int(m.group(3) or 0), int(m.group(4) or 256)
  c = default_config()
  c.model.update(dict(name=f"SiT-{size}/{patch}", input_size=res // 8, in_channels=4,
                      num_classes=1000, mediator_num=n, class_dropout_prob=0.1))
  c.data.update(dict(name="latents", path="", image_size=res, num_classes=1000, random_flip=True,
                     latent_sample=True))
  c.global_batch_size = 256
  c.num_train_steps = STEPS[size]
  c.mesh_shape = (-1, FSDP[size])
  if size in ("L", "XL"):
    c.model.dtype = "bfloat16"
  c.checkpoint_every = 10_000
  c.log_every = 100
  _gaussian(c)
  c.sample.update(dict(every=20_000, cfg_scale=4.0, guide_channels=3))
  if res > 256:
    c.global_batch_size = {512: 64, 1024: 16}[res]
    c.num_train_steps = 400_000
    c.init_from = ""  # required: --config.init_from=<256/512 workdir or converted checkpoint>
    c.init_from_grid = (res // 2) // 8 // patch
    c.mesh_shape = (-1, max(FSDP[size], 4 if res == 1024 else 1))
    c.model.remat = res == 1024
    c.checkpoint_every = 5_000
  return c
