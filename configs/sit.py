"""SiT on ImageNet latents, with or without attention mediators: presets for every size/resolution.

Preset string: ``<size><patch>[-med<n>][-<resolution>]``, e.g. ``S2``, ``S2-med64``, ``B2-med16``,
``XL2-med64``, ``B2-med64-512``, ``XL2-med64-1024``. size in S/B/L/XL, patch in 2/4/8, n a perfect
square (4, 16, 64 in the paper), resolution 256 (default), 512 or 1024.

    # 1. latents (once): python -m edit_jax.prepare --src=IMAGENET/train --dst=LAT256 --vae=VAE
    # 2. train:
    python -m edit_jax.main --config=configs/sit.py:S2-med64 --workdir=gs://BUCKET/s2-med64 \
        --config.data.path=LAT256 --config.sample.vae_path=VAE

Recipe (spec/sit_mediators.md section 6, the official train.py): AdamW lr 1e-4, no weight decay,
constant lr, no clipping, global batch 256, EMA 0.9999, label dropout 0.1, Linear path + velocity,
ImageNet 256 with ADM center crop + flip, SD-VAE latents x 0.18215, fp32 (set
``--config.model.dtype=bfloat16`` for bf16 compute with fp32 master weights).

Resolution presets fine-tune from the lower resolution as the official train_256to512.py /
train_512to1024.py: pass ``--config.init_from=<256 workdir or converted checkpoint>``; the
mediator axis biases are interpolated (align_corners=True), the 7x7 tables kept, the position
embedding regenerated (``edit_jax.checkpoint.resize_mediator_params``), the optimizer starts fresh.
README settings: 512 px batch 64 for 20 epochs, 1024 px batch 16 for 5 epochs, n = 64.

Sized for / expected results (FID-50K with the ADM evaluator; [paper] = reported numbers from the
paper notes in spec section 7, not reproduced here):
  S2, S2-med{4,16,64} @256: one TPU v4-8 (or 8 GPUs), mesh (-1, 1), ~400K steps (80 epochs).
      [paper] FID 58.61 vanilla; 57.67 / 54.55 / 53.57 with n = 4 / 16 / 64 (SDE, cfg 1).
  B2, B2-med64 @256: TPU v4-8 / v5e-16, 400K steps. SiT-B/2 vanilla [SiT paper] FID 33.0 (SDE).
  XL2, XL2-med64 @256: TPU v4-32 / v5p-32, mesh (-1, 4) (FSDP), bf16, 7M steps (1400 epochs).
      [paper] FID 2.06 vanilla, 2.01 with mediators (cfg 1.5).
  *-512: v4-32, batch 64, 400K steps from the 256 checkpoint. *-1024: v4-64, batch 16, 400K
  steps from the 512 checkpoint, remat on. No FID is published for these; FLOPs drop 15.7% (512)
  and 45.4% (1024) for B/2 n = 64.
No accelerator was available while writing these presets: the step times in docs/training.md are
CPU measurements of the quickstart; treat the hardware sizing above as a starting point.
"""
import re

from edit_jax.train import default_config

_PRESET = re.compile(r"^(S|B|L|XL)(2|4|8)(?:-med(\d+))?(?:-(256|512|1024))?$")
STEPS = {"S": 400_000, "B": 400_000, "L": 400_000, "XL": 7_000_000}
FSDP = {"S": 1, "B": 1, "L": 4, "XL": 4}


def get_config(preset: str = "S2-med64"):
  m = _PRESET.match(preset or "S2-med64")
  if not m:
    raise ValueError(f"unknown preset {preset!r}: expected <S|B|L|XL><2|4|8>[-med<n>][-<256|512|"
                     "1024>], e.g. S2-med64 or XL2-med64-512")
  size, patch, n, res = m.group(1), int(m.group(2)), int(m.group(3) or 0), int(m.group(4) or 256)
  c = default_config()
  c.model.update(dict(name=f"SiT-{size}/{patch}", input_size=res // 8, in_channels=4,
                      num_classes=1000, mediator_num=n, class_dropout_prob=0.1, learn_sigma=True))
  c.data.update(dict(name="latents", path="", image_size=res, num_classes=1000, random_flip=True,
                     latent_sample=True))
  c.global_batch_size = 256
  c.num_train_steps = STEPS[size]
  c.mesh_shape = (-1, FSDP[size])
  if size in ("L", "XL"):
    c.model.dtype = "bfloat16"
  c.checkpoint_every = 10_000
  c.log_every = 100
  c.sample.update(dict(every=20_000, method="heun2", num_steps=50, cfg_scale=4.0))
  if res > 256:
    # Fine-tuning from the lower resolution (official train_256to512.py / train_512to1024.py).
    c.global_batch_size = {512: 64, 1024: 16}[res]
    c.num_train_steps = 400_000
    c.init_from = ""  # required: --config.init_from=<workdir or converted checkpoint>
    c.init_from_grid = (res // 2) // 8 // patch
    c.mesh_shape = (-1, max(FSDP[size], 4 if res == 1024 else 1))
    c.model.remat = res == 1024
    c.checkpoint_every = 5_000
  return c
