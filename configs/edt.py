"""EDT (Chen et al., NeurIPS 2024) on ImageNet latents: the official recipe for EDT-S/B/XL.

Preset string: ``<S|B|XL>2[-nomask][-noamm][-transport]``, e.g. ``S2``, ``B2``, ``XL2``,
``S2-nomask``, ``S2-transport``.

    # latents once: python -m edit_jax.prepare --src=IMAGENET/train --dst=LAT256 --vae=VAE
    python -m edit_jax.main --config=configs/edt.py:S2 --workdir=gs://BUCKET/edt-s2 \
        --config.data.path=LAT256 --config.sample.vae_path=VAE

Recipe (spec/edt_dydit.md 1.5, the official train_mask_adan.py): Adan (betas 0.98/0.92/0.99, no
weight decay, no clipping), lr 1e-3 (S, B) / 5e-4 (XL) decayed linearly to 5e-5 over 400K steps,
global batch 256, EMA 0.9999, label dropout 0.1, token relation-enhanced masked training
(L_full + L_masked, mask ratios U(0.4, 0.5) / U(0.1, 0.2) in the two DownSamples, the mid mask for
XL), AMM at sampling in the official blocks (7, 10 for S/B; 23, 25 for XL; use
--config.amm.layers=official_alt with CFG >= 2). Objective as published: DiT's Gaussian diffusion
(``objective="gaussian"``: 1000 linear betas, epsilon + learned sigma, loss = mse + vb; sample
grids DDPM 250 steps); not reproduced: the official loss-second-moment timestep sampler (uniform t
here). ``-transport``: SiT's transport objective instead (Heun ODE-50 grids).

Sized for / expected results ([paper] = the EDT README, FID-50K, no CFG, 400K steps, not
reproduced here): S2: one TPU v4-8 / 8 GPUs, [paper] FID 34.27 (2.66 GFLOPs). B2: v4-8 / v5e-16,
[paper] FID 19.18 (10.20 GFLOPs). XL2: v4-32, bf16, FSDP, [paper] FID 7.52 (the released layout
[6,4,4,7,7] costs 53.44 GFLOPs; the stated 51.83 belongs to a 12/12/4 split, see docs/edt.md).
No accelerator was available while writing this config.
"""
import re

from edit_jax.train import default_config

_PRESET = re.compile(r"^(S|B|XL)2((?:-nomask|-noamm|-transport)*)$")


def get_config(preset: str = "S2"):
  m = _PRESET.match(preset or "S2")
  if not m:
    raise ValueError(f"unknown preset {preset!r}: expected <S|B|XL>2[-nomask][-noamm]"
                     "[-transport], e.g. S2, XL2 or B2-nomask")
  size, flags = m.group(1), m.group(2)
  c = default_config()
  c.model.update(dict(arch="edt", name=f"EDT-{size}/2", input_size=32, in_channels=4,
                      num_classes=1000, class_dropout_prob=0.1, learn_sigma=True))
  c.data.update(dict(name="latents", path="", image_size=256, num_classes=1000, random_flip=True,
                     latent_sample=True))
  c.global_batch_size = 256
  c.num_train_steps = 400_000
  lr = 5e-4 if size == "XL" else 1e-3
  c.optim.update(dict(name="adan", learning_rate=lr, b1=0.98, b2=0.92, b3=0.99, eps=1e-8,
                      weight_decay=0.0, schedule="linear", end_lr_factor=5e-5 / lr, grad_clip=0.0))
  c.ema_decay = 0.9999
  c.masked_training.enabled = "-nomask" not in flags
  c.amm.update(dict(enabled="-noamm" not in flags, layers="official", mode="post_softmax"))
  if size == "XL":
    c.model.dtype = "bfloat16"
    c.mesh_shape = (-1, 4)
  c.checkpoint_every = 10_000
  if "-transport" in flags:
    c.objective = "transport"
    c.sample.update(dict(every=20_000, method="heun2", num_steps=50, cfg_scale=1.5))
  else:
    c.objective = "gaussian"
    c.sample.update(dict(every=20_000, method="ddpm", num_steps=250, eta=0.0,
                         clip_denoised=False, respacing="", cfg_scale=1.5))
  return c
