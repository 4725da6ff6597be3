"""Fine-tune an official SiT-XL/2 (or our converted / trained one) into ONE elastic-mediator model.

Presets (``--config=configs/elastic_finetune.py:<preset>``):
  XL2         from the official vanilla SiT-XL-2-256x256.pt: mediators in all 28 blocks, elastic
              over n in {4, 16, 64} (8 x 8 reference grid). qkv / proj / MLP / adaLN / embedders
              load from the checkpoint; the mediator bias tables and the depthwise conv start
              from the official init (they do not exist in a vanilla model).
  XL2-first4  the same with mediators in the first 4 blocks only (the paper's SiT-XL/2 setting
              according to secondary sources; spec section 3), the other 24 keep full attention.
  XL2-med64   from a static SiT-XL/2 + mediators n = 64 checkpoint (ours: a workdir of
              configs/sit.py:XL2-med64, or a converted official-layout file): converted exactly
              (edit_jax.elastic.adapt_init_params), so step 0 reproduces the n = 64 model.
  S2-med64    the small version (SiT-S/2 from a configs/sit.py:S2-med64 run) for trying the recipe.

    # 1. latents (once): python -m edit_jax.prepare --src=IMAGENET/train --dst=LAT256 --vae=VAE
    # 2. official weights -> Orbax (optional; init_from also reads the .pt directly):
    python -m edit_jax.convert SiT-XL-2-256x256.pt ckpt/sit_xl2
    # 3. fine-tune on a TPU slice (launch/tpu.sh wraps the same command for every host):
    python -m edit_jax.main --config=configs/elastic_finetune.py:XL2 --workdir=gs://BUCKET/xl2-elastic \
        --config.init_from=ckpt/sit_xl2 --config.data.path=LAT256 --config.sample.vae_path=VAE
    # 4. sample with the schedule from the ONE checkpoint (or at any single n):
    python -m edit_jax.sample --ckpt gs://BUCKET/xl2-elastic --mediators 4,16,64 \
        --switch_ratios 0.8,0.6 --first_several 3 --num_steps 250 --out samples/ --vae VAE
    # 5. a static checkpoint at one n for the official PyTorch code:
    python -m edit_jax.elastic export gs://BUCKET/xl2-elastic --mediators 64 --out xl2_n64.safetensors

Recipe: the official one (spec section 6: AdamW 1e-4, no weight decay, batch 256, EMA 0.9999,
label dropout 0.1, Linear path + velocity) with bf16 compute (fp32 master weights), a 2,000-step
warm-up (new attention parameters), FSDP over 4 devices, and n drawn uniformly from {4, 16, 64}
every step (`elastic.mode=sandwich` trains all three every step at 3x the cost per step).

Compute (`python benchmarks/elastic_finetune_compute.py`, numbers in
benchmarks/results/elastic_finetune_compute.json and docs/elastic.md): 693 GFLOP per training
image (2 FLOPs per multiply-add, 3 x the mean forward over n = 4 / 16 / 64), 1.77e14 per step,
3.5e19 for the 200K steps below. No TPU or GPU run was made for this recipe: wall-clock figures
are ESTIMATES from each chip's dense bf16 peak at an assumed MFU (e.g. ~3.4 h on a v5p-32 slice,
16 chips, at 40 % MFU), not measurements.
Expected result: NOT measured. 200K steps (~40 epochs of ImageNet) is a planning assumption for
adapting a converged model to new attention layers, not a tuned value; evaluate the EMA weights at
n = 4 / 16 / 64 and with the schedule (FID-50K, ADM evaluator) against the vanilla model's 2.06
(cfg 1.5) before relying on it.
"""
import pathlib
import re

from edit_jax.train import load_config_module

_PRESET = re.compile(r"^(S|B|L|XL)(2)(?:-(first4|med64))?$")
STEPS = {"S": 100_000, "B": 100_000, "L": 200_000, "XL": 200_000}


def _sit_preset(name: str):
  """configs/sit.py's preset `name`."""
  return load_config_module(pathlib.Path(__file__).with_name("sit.py")).get_config(name)


def get_config(preset: str = "XL2"):
  """configs/sit.py's <size>2-med64 preset (backbone, latents, batch 256, mesh, bf16 for L/XL)
  made elastic and set up to fine-tune from a converted checkpoint."""
  m = _PRESET.match(preset or "XL2")
  if not m:
    raise ValueError(f"unknown preset {preset!r}: expected XL2, XL2-first4, XL2-med64 or "
                     f"S2-med64 (any of S/B/L/XL with patch 2)")
  size, variant = m.group(1), m.group(3) or ""
  c = _sit_preset(f"{size}2-med64")
  c.model.update(dict(elastic_grid=8,
                      mediator_layers="0,1,2,3" if variant == "first4" else "all"))
  c.elastic.update(dict(mediators="4,16,64", mode="uniform", num_random=1))
  c.num_train_steps = STEPS[size]
  c.optim.update(dict(learning_rate=1e-4, warmup_steps=2000, schedule="constant"))
  c.init_from = ""  # required: official .pt / converted dir / workdir (see the docstring)
  c.init_from_ema = True
  return c
