"""DyDiT fine-tuning of the quickstart model (SiT + 16 mediators on the digits) to a FLOPs target.

    python -m edit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart   # base model
    python -m edit_jax.main --config=configs/dydit_quickstart.py:0.5 \\
        --config.init_from=runs/quickstart --workdir=runs/dydit_quickstart_0.5

Preset = the target FLOPs ratio lambda (default 0.5; e.g. 0.7). The base model's weights load from
init_from; every block gets DyDiT routers (head and MLP-group routers on the timestep embedding,
a token router on the MLP input; biases +15 / +35, so training starts from the base model exactly)
and the weights are magnitude-reordered (unit 0 = the strongest head / group, always on).
Recipe (the official one compressed to 1,000 steps): AdamW lr 5e-4 constant with the routers at
10x (`dydit.router_lr_mult`; officially 1x over 50k-200k steps: with Adam a weight moves about lr
per step, and the router logits start at +15 / +35), batch 32, grad clip 1, target held at 1 for 50
steps then linear to lambda by step 300 (official formula), FLOPs-loss weight 2, 4-bin stratified
t, no complete-model phase (the official S/B setting), EMA 0.99 (the run is short). Not official:
the Gumbel noise of the training gates decays linearly to 0 over steps 500-800
(`dydit.gate_noise_decay_*`) and the last 200 steps train with the evaluation gates. Without it
(the 400-step recipe measured before) the router logits stay just above 0 and the target is met
only through the noise: in evaluation every head and group stayed on (docs/dydit.md).
Sized for a 2-core CPU: ~8 minutes idle. Sampling (heun2, 30 points, CFG 3) writes a digit grid.
Measured quality and speed (dense vs sparse sampling, FLOPs ratio beside time ratio):
docs/dydit.md and benchmarks/dydit_speed.py.
"""
import pathlib

from edit_jax.train import load_config_module


def _quickstart_config():
  return load_config_module(pathlib.Path(__file__).with_name("quickstart.py")).get_config()


def get_config(preset: str = ""):
  try:
    lam = float(preset) if preset else 0.5
  except ValueError:
    raise ValueError(f"preset {preset!r}: expected the target FLOPs ratio, e.g. "
                     f"configs/dydit_quickstart.py:0.7") from None
  c = _quickstart_config()
  c.model.arch = "dydit"
  c.dydit.update(dict(target_ratio=lam, flops_weight=2.0, target_hold_steps=50,
                      target_warmup_steps=300, complete_model_steps=0, t_bins=4, reorder=True,
                      router_lr_mult=10.0, gate_noise_decay_start=500,
                      gate_noise_decay_steps=300))
  c.num_train_steps = 1000
  c.max_train_seconds = 0.0
  c.optim.update(dict(learning_rate=5e-4, warmup_steps=0, schedule="constant", grad_clip=1.0))
  c.ema_decay = 0.99
  c.ema_warmup = False
  c.checkpoint_every = 500
  c.sample.every = 1000
  return c
