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
import pathlib

from edit_jax.train import load_config_module


def _sibling(name: str):
  """Another config file of this folder."""
  return load_config_module(pathlib.Path(__file__).with_name(f"{name}.py"))


def _gaussian(c):
  c.objective = "gaussian"
  c.model.learn_sigma = True  # DiT: learned-range variance, loss = mse + vb
  c.sample.update(dict(method="ddpm", num_steps=250, eta=0.0, clip_denoised=False, respacing=""))
  return c


def _digits():
  """configs/quickstart.py with the Gaussian objective (DDIM-50 grids, x0 clipped: pixel data)."""
  c = _gaussian(_sibling("quickstart").get_config())
  c.sample.update(dict(method="ddim", num_steps=50, clip_denoised=True))
  return c


def get_config(preset: str = "XL2"):
  """The configs/sit.py preset of the same name (backbone, data, batch, steps, mesh, resolution
  fine-tuning) with DiT's Gaussian diffusion and sampling settings."""
  preset = preset or "XL2"
  if preset == "digits":
    return _digits()
  try:
    c = _sibling("sit").get_config(preset)
  except ValueError as e:
    raise ValueError(f"{e} (configs/dit.py also accepts 'digits')") from None
  c = _gaussian(c)
  c.sample.update(dict(every=20_000, cfg_scale=4.0, guide_channels=3))
  return c
