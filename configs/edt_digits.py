"""A small EDT on the 5,000 embedded MNIST digits (pixel space): plain vs masked training.

    python -m edit_jax.main --config=configs/edt_digits.py:masked --workdir=runs/edt-masked
    python -m edit_jax.main --config=configs/edt_digits.py:plain --workdir=runs/edt-plain

Presets: ``plain`` (one forward per step) and ``masked`` (EDT's token relation-enhanced masking:
L_full + L_masked, mask ratios U(0.4, 0.5) / U(0.1, 0.2)); append ``-adan`` for EDT's optimizer.
Everything else is identical (seed, data order, schedule), so the two are compared at equal
steps (benchmarks/edt_study.py; docs/results.md, section "EDT").

Model: EDT with the S/B stage layout (2, 2, 2, 3, 3 blocks), widths 96/128/160/128/96, head dim
32, patch 4 on 32x32x1 digits: token grids 8x8 -> 4x4 -> 2x2 -> 4x4 -> 8x8 (0.9M params,
0.05 GFLOPs/forward); AMM (sampling only) in the official blocks 7 and 10. Training: the
quickstart recipe (AdamW lr 3e-3, 100 warm-up steps, cosine, batch 32, grad clip 1, EMA 0.999
with warm-up, label dropout 0.1), 1,500 steps, SiT's transport objective.

Sized for a 2-core CPU: about 6 (plain) / 10 (masked) minutes. Expected result: see
docs/results.md ("EDT on digits"); samples in <workdir>/samples/latest.png.
"""
from edit_jax.train import default_config


def get_config(preset: str = "masked"):
  preset = preset or "masked"
  base, _, opt = preset.partition("-")
  if base not in ("plain", "masked") or opt not in ("", "adan"):
    raise ValueError(f"unknown preset {preset!r}: expected plain, masked, plain-adan or "
                     "masked-adan")
  c = default_config()
  c.seed = 0
  c.model.update(dict(
      arch="edt", name="", input_size=32, in_channels=1, num_classes=10, patch_size=4,
      stage_depths=(2, 2, 2, 3, 3), stage_dims=(64, 96, 128, 96, 64),
      stage_heads=(2, 3, 4, 3, 2), mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=False))
  c.amm.update(dict(enabled=True, layers="official", mode="post_softmax"))
  c.masked_training.enabled = base == "masked"
  c.data.update(dict(name="digits", image_size=32, channels=1, num_classes=10, random_flip=False,
                     num_threads=2))
  c.global_batch_size = 32
  c.num_train_steps = 1500
  if opt == "adan":
    c.optim.update(dict(name="adan", learning_rate=3e-3, b1=0.98, b2=0.92, b3=0.99,
                        warmup_steps=100, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  else:
    c.optim.update(dict(learning_rate=3e-3, warmup_steps=100, schedule="cosine",
                        end_lr_factor=0.05, grad_clip=1.0))
  c.ema_decay = 0.999
  c.ema_warmup = True
  c.mesh_shape = (-1, 1)
  c.log_every = 100
  c.checkpoint_every = 500
  c.sample.update(dict(every=1500, method="heun2", num_steps=30, cfg_scale=3.0, guide_channels=-1,
                       classes=tuple(range(10)), per_class=8, upscale=2, digit_accuracy=True))
  return c
