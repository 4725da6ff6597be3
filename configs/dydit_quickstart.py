"""DyDiT fine-tuning of the quickstart model (SiT + 16 mediators on the digits) to a FLOPs target.

    python -m edit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart   # base model
    python -m edit_jax.main --config=configs/dydit_quickstart.py:0.5 \\
        --config.init_from=runs/quickstart --workdir=runs/dydit_quickstart_0.5

Preset = the target FLOPs ratio lambda (default 0.5; e.g. 0.7). The base model's weights load from
init_from; every block gets DyDiT routers (head and MLP-group routers on the timestep embedding,
a token router on the MLP input; biases +15 / +35, so training starts from the base model exactly)
and the weights are magnitude-reordered (unit 0 = the strongest head / group, always on).
Recipe (the official one scaled to the digits): AdamW lr 3e-4 constant, batch 32, 600 steps, target
held at 1 for 100 steps then linear to lambda by step 300, FLOPs-loss weight 2, 4-bin stratified t,
no complete-model phase (the official S/B setting), EMA 0.999 from the loaded weights.
Sized for a 2-core CPU: ~3-4 minutes. Sampling (heun2, 30 points, CFG 3) writes a digit grid.
Measured quality and speed (dense vs sparse sampling, FLOPs ratio beside time ratio):
docs/dydit.md and benchmarks/dydit_digits.py.
"""
import importlib.util
import pathlib


def _quickstart_config():
  path = pathlib.Path(__file__).with_name("quickstart.py")
  spec = importlib.util.spec_from_file_location("edit_jax_quickstart_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config(preset: str = ""):
  try:
    lam = float(preset) if preset else 0.5
  except ValueError:
    raise ValueError(f"preset {preset!r}: expected the target FLOPs ratio, e.g. "
                     f"configs/dydit_quickstart.py:0.7") from None
  c = _quickstart_config()
  c.model.arch = "dydit"
  c.dydit.update(dict(target_ratio=lam, flops_weight=2.0, target_hold_steps=100,
                      target_warmup_steps=300, complete_model_steps=0, t_bins=4, reorder=True))
  c.num_train_steps = 600
  c.max_train_seconds = 0.0
  c.optim.update(dict(learning_rate=3e-4, warmup_steps=0, schedule="constant", grad_clip=1.0))
  c.ema_decay = 0.999
  c.ema_warmup = False
  c.checkpoint_every = 300
  c.sample.every = 600
  return c
