"""Side by side on this CPU: our jitted training step / forward vs an official-equivalent PyTorch SiT.

    python benchmarks/torch_reference.py --torch_python=/work/venvs/torch_i15/bin/python
    python benchmarks/torch_reference.py --cases=S2-med16 --rounds=5 --steps=3

Optional: needs a Python with torch (2.13.0 CPU was used). Without one it prints why and exits 0.
The PyTorch model below is written from the spec of the official code (SiT models.py with timm's
PatchEmbed / Attention (fused SDPA) / Mlp(GELU tanh), and AttentionWithMediators of
LeapLabTHU/Attention-Mediators): the same layers, shapes and order of operations; its training
step is the official one (Linear-path velocity loss with t ~ U[0, 1] and label dropout 0.1,
``loss.backward()``, ``AdamW(lr=1e-4, weight_decay=0)``, EMA 0.9999 over every parameter).
Ours: ``edit_jax.train.make_train_step`` (the same loss, AdamW and EMA, jitted, state donated) on
one CPU device.

The PyTorch side runs in a worker subprocess (``--torch_python``) that is told over stdin when to
time ``--steps`` steps; rounds alternate ours / PyTorch so both see the same machine load.
Reports wall and process-CPU seconds per step (min and median over rounds) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# name -> (depth, hidden, heads, patch, mediators, batch)
CASES = {
    "S2": (12, 384, 6, 2, 0, 8),
    "S2-med16": (12, 384, 6, 2, 16, 8),
    # S2 with the full-attention core of jax.nn.dot_product_attention (the CPU default before the
    # head-major core, edit_jax.models.attention_core); the PyTorch side is the same as S2
    "S2-dpa": (12, 384, 6, 2, 0, 8),
    "B2-med64": (12, 768, 12, 2, 64, 8),
}
DEFAULT_CASES = ("S2", "S2-med16")
FULL_ATTENTION_IMPL = {"S2-dpa": "xla"}  # ours; other cases: automatic (None)
INPUT, CHANNELS, CLASSES = 32, 4, 1000  # 256 px latents
# Untimed calls per kind on both sides before the rounds (XLA:CPU's heap reaches its steady
# size within a few steps: edit_jax/hostmem.py).
WARMUP = 3

# ----------------------------------------------------------------------------------------------
# The PyTorch worker (runs under --torch_python; imports only torch and numpy)
# ----------------------------------------------------------------------------------------------
WORKER = r'''
import json, math, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

depth, D, H, p, n_med, B, S, C, K, WARMUP = (int(a) for a in sys.argv[1:11])
torch.manual_seed(0)
g = S // p
N = g * g


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):  # timm Mlp: fc1 -> GELU(tanh) -> fc2
  def __init__(self, d, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):  # timm Attention(qkv_bias=True), fused SDPA
  def __init__(self, d, h):
    super().__init__()
    self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class MediatorAttention(nn.Module):  # AttentionWithMediators (spec section 3)
  def __init__(self, d, h, g, n):
    super().__init__()
    self.h, self.g, self.n, self.scale = h, g, n, (d // h) ** -0.5
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.dwc = nn.Conv2d(d, d, 3, padding=1, groups=d)
    self.pool = nn.AdaptiveAvgPool2d((int(n ** 0.5), int(n ** 0.5)))
    t = lambda *s: nn.Parameter(torch.randn(*s) * 0.02)
    self.an_bias, self.na_bias = t(h, n, 7, 7), t(h, n, 7, 7)
    self.ah_bias, self.aw_bias = t(1, h, n, g, 1), t(1, h, n, 1, g)
    self.ha_bias, self.wa_bias = t(1, h, g, 1, n), t(1, h, 1, g, n)

  def forward(self, x):
    b, num, c = x.shape
    h, g, n, hd = self.h, self.g, self.n, c // self.h
    q, k, v = self.qkv(x).reshape(b, num, 3, c).permute(2, 0, 1, 3).unbind(0)
    m = self.pool(q.reshape(b, g, g, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    heads = lambda t: t.reshape(b, t.shape[1], h, hd).permute(0, 2, 1, 3)
    q, k, v, m = heads(q), heads(k), heads(v), heads(m)
    pos1 = F.interpolate(self.an_bias, size=(g, g), mode="bilinear").reshape(1, h, n, num)
    pos1 = pos1 + (self.ah_bias + self.aw_bias).reshape(1, h, n, num)
    vm = ((m * self.scale) @ k.transpose(-2, -1) + pos1).softmax(-1) @ v
    pos2 = F.interpolate(self.na_bias, size=(g, g), mode="bilinear").reshape(1, h, n, num)
    pos2 = pos2.permute(0, 1, 3, 2) + (self.ha_bias + self.wa_bias).reshape(1, h, num, n)
    x = ((q * self.scale) @ m.transpose(-2, -1) + pos2).softmax(-1) @ vm
    x = x.transpose(1, 2).reshape(b, num, c)
    vi = v.transpose(1, 2).reshape(b, g, g, c).permute(0, 3, 1, 2)
    x = x + self.dwc(vi).permute(0, 2, 3, 1).reshape(b, num, c)
    return self.proj(x)


class Block(nn.Module):
  def __init__(self, d, h):
    super().__init__()
    self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.attn = MediatorAttention(d, h, g, n_med) if n_med else Attention(d, h)
    self.mlp = Mlp(d, 4 * d)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

  def forward(self, x, c):
    sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, cm))
    return x + gp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sp, cp))


class SiT(nn.Module):
  def __init__(self):
    super().__init__()
    self.x_embedder = nn.Conv2d(C, D, p, stride=p)
    self.t_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
    self.y_table = nn.Embedding(K + 1, D)
    self.pos_embed = nn.Parameter(torch.zeros(1, N, D), requires_grad=False)
    self.blocks = nn.ModuleList(Block(D, H) for _ in range(depth))
    self.norm_f = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    self.ada_f = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
    self.linear = nn.Linear(D, p * p * 2 * C)
    for mod in self.modules():  # not zero: the backward must do its full work
      if isinstance(mod, nn.Linear):
        nn.init.xavier_uniform_(mod.weight)

  def forward(self, x, t, y):
    x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    a = t[:, None].float() * f[None]
    c = self.t_mlp(torch.cat([torch.cos(a), torch.sin(a)], -1))
    if self.training:
      y = torch.where(torch.rand(y.shape[0]) < 0.1, torch.full_like(y, K), y)
    c = c + self.y_table(y)
    for blk in self.blocks:
      x = blk(x, c)
    sh, sc = self.ada_f(c).chunk(2, dim=1)
    x = self.linear(modulate(self.norm_f(x), sh, sc))
    x = x.reshape(x.shape[0], g, g, p, p, 2 * C)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 2 * C, g * p, g * p)
    return x.chunk(2, dim=1)[0]


model = SiT()
ema = SiT()
ema.load_state_dict(model.state_dict())
ema.requires_grad_(False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
x1 = torch.randn(B, C, S, S)
y = torch.randint(0, K, (B,))


def train_step():
  model.train()
  t = torch.rand(B)
  x0 = torch.randn_like(x1)
  xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
  loss = ((model(xt, t, y) - (x1 - x0)) ** 2).mean()
  opt.zero_grad()
  loss.backward()
  opt.step()
  with torch.no_grad():
    for e, q in zip(ema.parameters(), model.parameters()):
      e.mul_(0.9999).add_(q, alpha=1 - 0.9999)


@torch.no_grad()
def forward():
  model.eval()
  return model(x1, torch.full((B,), 0.5), y)


fns = {"train_step": train_step, "forward": forward}
for f in fns.values():
  for _ in range(WARMUP):
    f()
print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "params": sum(q.numel() for q in model.parameters())}), flush=True)
for line in sys.stdin:
  kind, steps = line.split()
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(int(steps)):
    fns[kind]()
  print(json.dumps({"wall": (time.perf_counter() - t0) / int(steps),
                    "cpu": (time.process_time() - c0) / int(steps)}), flush=True)
'''


class TorchWorker:
  def __init__(self, python: str, case: str):
    depth, d, h, p, n, b = CASES[case]
    self.proc = subprocess.Popen(
        [python, "-c", WORKER, *map(str, (depth, d, h, p, n, b, INPUT, CHANNELS, CLASSES, WARMUP))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = json.loads(self.proc.stdout.readline())

  def time(self, kind: str, steps: int) -> dict:
    self.proc.stdin.write(f"{kind} {steps}\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def torch_available(python: str) -> str | None:
  """None if `python` can import torch, else the reason."""
  if not python or not os.path.exists(python):
    return f"no torch Python at {python!r} (pass --torch_python=/path/to/venv/bin/python)"
  r = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
  return None if r.returncode == 0 else f"{python} cannot import torch: {r.stderr.strip()[-200:]}"


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------
class JaxSide:
  def __init__(self, case: str):
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from edit_jax import models, sharding, train  # noqa: PLC0415
    from edit_jax.diffusion import transport  # noqa: PLC0415
    depth, d, h, p, n, b = CASES[case]
    self.jax = jax
    c = train.default_config()
    model = models.build_model("", input_size=INPUT, in_channels=CHANNELS, num_classes=CLASSES,
                               hidden_size=d, depth=depth, num_heads=h, patch_size=p,
                               mediator_num=n, full_attention_impl=FULL_ATTENTION_IMPL.get(case))
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    rules = sharding.rules_from_config(c)
    tx, schedule = train.make_optimizer(c)
    self.ctx = (jax.set_mesh(mesh), nn.logical_axis_rules(rules))
    for cm in self.ctx:
      cm.__enter__()
    self.state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0), rules)
    # Random (not zero-initialized) weights, as on the PyTorch side.
    leaves, tree = jax.tree.flatten(self.state.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    self.state = self.state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    self.step = train.make_train_step(transport.make_loss_fn(model, train.get_transport(c)), tx,
                                      schedule, mesh, shardings)
    k1, k2 = jax.random.split(jax.random.key(1))
    self.batch = {"x": jax.random.normal(k1, (b, INPUT, INPUT, CHANNELS)),
                  "y": jax.random.randint(k2, (b,), 0, CLASSES)}
    self.fwd = jax.jit(lambda p, x, y: model.apply({"params": p}, x, jnp.full(x.shape[:1], 0.5), y))
    self.rng = jax.random.key(2)
    self.params_count = models.count_params(params)
    for kind in ("train_step", "forward"):
      self.time(kind, WARMUP)

  def time(self, kind: str, steps: int) -> dict:
    jax = self.jax
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      if kind == "train_step":
        self.state, m = self.step(self.state, self.batch, self.rng)
      else:
        out = self.fwd(self.state.params, self.batch["x"], self.batch["y"])
    jax.block_until_ready(self.state if kind == "train_step" else out)
    return {"wall": (time.perf_counter() - t0) / steps, "cpu": (time.process_time() - c0) / steps}


def summarize(samples: list[dict]) -> dict:
  import numpy as np  # noqa: PLC0415
  w = np.array([s["wall"] for s in samples])
  c = np.array([s["cpu"] for s in samples])
  return {"wall_min": float(w.min()), "wall_median": float(np.median(w)),
          "cpu_min": float(c.min()), "cpu_median": float(np.median(c)), "rounds": len(samples)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON",
                                                           "/work/venvs/torch_i15/bin/python"))
  ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"from {sorted(CASES)}")
  ap.add_argument("--kinds", default="train_step,forward")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=2, help="calls timed per round")
  ap.add_argument("--json", default="benchmarks/results/torch_reference.json")
  args = ap.parse_args(argv)
  why = torch_available(args.torch_python)
  if why:
    print(f"skipped: {why}")
    return None
  from benchmarks import common  # noqa: PLC0415
  print(common.device_description())
  results, rows = [], []
  for case in args.cases.split(","):
    if case not in CASES:
      ap.error(f"unknown case {case!r}: expected one of {sorted(CASES)}")
    worker = TorchWorker(args.torch_python, case)
    ours = JaxSide(case)
    for kind in args.kinds.split(","):
      samples = {"ours": [], "torch": []}
      for _ in range(args.rounds):  # interleaved
        samples["ours"].append(ours.time(kind, args.steps))
        samples["torch"].append(worker.time(kind, args.steps))
      s_ours, s_torch = summarize(samples["ours"]), summarize(samples["torch"])
      results.append({"case": case, "kind": kind, "batch": CASES[case][5], "ours": s_ours,
                      "torch": s_torch, "torch_info": worker.info,
                      "params_ours": ours.params_count})
      rows.append({"case": case, "kind": kind, "batch": CASES[case][5],
                   "ours s (min/med)": f"{s_ours['wall_min']:.3f} / {s_ours['wall_median']:.3f}",
                   "torch s (min/med)": f"{s_torch['wall_min']:.3f} / {s_torch['wall_median']:.3f}",
                   "ours/torch wall": f"{s_ours['wall_min'] / s_torch['wall_min']:.2f}",
                   "ours cpu s": f"{s_ours['cpu_min']:.3f}", "torch cpu s": f"{s_torch['cpu_min']:.3f}",
                   "ours/torch cpu": f"{s_ours['cpu_min'] / s_torch['cpu_min']:.2f}"})
    worker.close()
    for cm in reversed(ours.ctx):
      cm.__exit__(None, None, None)
  common.print_table(rows, list(rows[0]))
  if args.json:
    from edit_jax import hostmem  # noqa: PLC0415  (imported by JaxSide already)
    common.write_json(args.json, {
        "command": "python benchmarks/torch_reference.py " + " ".join(argv or sys.argv[1:]),
        "load_average": os.getloadavg(), "warmup_calls": WARMUP,
        "cpu_malloc": hostmem.status(), "results": results})
  return results


if __name__ == "__main__":
  main()
