"""FLOPs of a SiT or EDT forward pass in the papers' convention.

Convention (DiT/SiT/Attention-Mediators papers, fvcore): one multiply-add = one FLOP, counted per
forward pass at batch 1; the CFG batch doubling is not counted. Counted like fvcore counts the
official PyTorch model (with `TIMM_FUSED_ATTN=0` so the attention matmuls are visible):
  linear / conv / matmul           in * out multiply-adds per output position
  layer_norm (no affine)           4 per element
  adaptive_avg_pool2d              1 per input element
  upsample_bilinear2d              4 per output element (elastic mediators: also the resize of
                                   the R x R mediator axes of the bias tables to sqrt(n))
  elementwise ops, softmax, GELU,  not counted
  embedding lookups, bias adds

XLA's cost analysis counts 2 per multiply-add plus elementwise work; `xla_gflops` returns its
number divided by 2 for the cross-check (it is slightly larger than `gflops` because XLA also
counts elementwise ops).

    >>> from edit_jax import flops, models
    >>> round(flops.gflops(models.build_model("SiT-S/2", input_size=32)), 3)
    6.066

EDT: the official `EDT.get_flops()` counts the multiply-adds of every matmul (patch embedding,
t-MLP, every adaLN linear, qkv/proj, QK^T and AV, MLP, DownSample/UpSample/ConcatLayer linears,
final layer) and nothing else; `gflops(model, norms=False)` is exactly that (EDT-S/2 2.667,
EDT-B/2 10.218 GFLOPs at 256 px). The default `norms=True` adds the layer norms at 4 per element,
the convention of the SiT numbers above, so SiT and EDT can be compared on one scale. AMM (an
elementwise product) is not counted; its log_bias form adds one QK^T per AMM block at sampling.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from edit_jax import models


@dataclasses.dataclass
class FlopsBreakdown:
  """Multiply-adds per forward at batch 1, by part."""
  patch_embed: int = 0
  conditioning: int = 0          # timestep MLP + adaLN linears + final adaLN
  attention_linear: int = 0      # qkv + proj
  attention_core: int = 0        # QK^T, AV (full) or the four mediator matmuls
  mediator_extra: int = 0        # pooling, bias resizes, depthwise conv
  mlp: int = 0
  norms: int = 0
  final_linear: int = 0
  routers: int = 0               # DyDiT routers (timestep width routers + token routers)
  token_merge: int = 0           # EDT: DownSample / UpSample / ConcatLayer linears

  @property
  def total(self) -> int:
    return sum(dataclasses.asdict(self).values())

  @property
  def gflops(self) -> float:
    return self.total / 1e9


def block_flops(model: models.SiT, i: int) -> dict:
  """Multiply-adds of block i at batch 1, by part: attention_linear (qkv + proj), attention_core,
  mediator_extra, mlp, norms. The one per-block FLOPs model of the package (`breakdown`, DyDiT's
  FLOPs-ratio loss and the benchmarks all use it)."""
  d, n_tok, h, g = model.hidden_size, model.num_tokens, model.num_heads, model.grid
  hidden = int(d * model.mlp_ratio)
  out = dict(attention_linear=4 * n_tok * d * d, attention_core=0, mediator_extra=0,
             mlp=2 * n_tok * d * hidden, norms=2 * 4 * n_tok * d)
  if i in set(model.mediator_blocks):
    n = model.mediator_num
    out["attention_core"] = 4 * n * n_tok * d
    out["mediator_extra"] = (n_tok * d            # adaptive average pooling of the queries
                             + 9 * n_tok * d      # depthwise 3x3 conv on V
                             + 2 * 4 * h * n * g * g)  # two bilinear resizes of the 7x7 tables
    r = getattr(model, "elastic_grid", 0)
    if r and r * r != n:  # elastic: the R x R mediator axes of the six tables resized to sqrt(n)
      out["mediator_extra"] += 4 * (2 * h * n * 49 + 4 * h * n * g)
  else:
    out["attention_core"] = 2 * n_tok * n_tok * d
  return out


def block_costs(model: models.SiT):
  """(attention (L,), mlp (L,)) multiply-adds per block at batch 1, float64 numpy arrays.

  attention = qkv + proj + attention core (+ the mediator extras): the part that scales with the
  number of active heads; mlp = fc1 + fc2: the part that scales with active channel groups and
  tokens. For full attention these are DyDiT's per-block constants, e.g. DiT-XL/2 at 256 px:
  1.50995 and 2.71791 GMACs (4ND^2 + 2N^2D and 8ND^2).
  """
  attn, mlp = [], []
  for i in range(model.depth):
    b = block_flops(model, i)
    attn.append(b["attention_linear"] + b["attention_core"] + b["mediator_extra"])
    mlp.append(b["mlp"])
  return np.asarray(attn, np.float64), np.asarray(mlp, np.float64)


def breakdown(model) -> FlopsBreakdown:
  """Analytic multiply-add count of `model` (a SiT, DyDiT or EDT) per forward pass at batch 1.

  DyDiT models (`edit_jax.models.dydit`) are counted at full width (every gate on) plus their
  routers; `dynamic_gflops` gives the cost at given active fractions."""
  model.validate()
  if models.arch_of(model) == "edt":
    return edt_breakdown(model)
  d, n_tok, p, c = model.hidden_size, model.num_tokens, model.patch_size, model.in_channels
  f = FlopsBreakdown()
  f.patch_embed = n_tok * d * c * p * p
  f.conditioning = 256 * d + d * d + model.depth * d * 6 * d + d * 2 * d
  for i in range(model.depth):
    b = block_flops(model, i)
    f.attention_linear += b["attention_linear"]
    f.attention_core += b["attention_core"]
    f.mediator_extra += b["mediator_extra"]
    f.mlp += b["mlp"]
    f.norms += b["norms"]
  f.norms += 4 * n_tok * d
  f.final_linear = n_tok * d * p * p * model.out_channels
  router_flops = getattr(model, "router_flops", None)
  if router_flops is not None:
    f.routers = int(router_flops())
  return f


def dynamic_gflops(model: models.SiT, head_frac, group_frac, token_frac) -> float:
  """GFLOPs per forward at batch 1 when block l runs head_frac[l] of its heads and group_frac[l]
  of its MLP groups on token_frac[l] of its tokens (each (L,) or a scalar). DyDiT's accounting:
  attention scales with heads, the MLP with groups x tokens; everything else is unchanged."""
  attn, mlp = block_costs(model)
  saved = (attn * (1 - np.asarray(head_frac, np.float64))
           + mlp * (1 - np.asarray(group_frac, np.float64) * np.asarray(token_frac, np.float64)))
  return (breakdown(model).total - float(saved.sum())) / 1e9


def edt_breakdown(model) -> FlopsBreakdown:
  """EDT multiply-adds per forward at batch 1 (the official `get_flops` terms, plus norms)."""
  d0, p, c = model.hidden_size, model.patch_size, model.in_channels
  grids, stages = model.block_grids, model.block_stages
  f = FlopsBreakdown()
  n0 = model.num_tokens
  f.patch_embed = n0 * d0 * c * p * p
  f.conditioning = 256 * d0 + d0 * d0 + d0 * 2 * d0
  for i in range(model.depth):
    w, h = int(model.stage_dims[stages[i]]), int(model.stage_heads[stages[i]])
    n = grids[i] ** 2
    f.conditioning += d0 * 6 * w
    f.attention_linear += 4 * n * w * w
    f.attention_core += 2 * n * n * w
    f.mlp += 2 * n * w * int(w * model.mlp_ratio)
    f.norms += 2 * 4 * n * w
  sg, dims = model.stage_grids, model.stage_dims
  for s in range(model.num_down):  # DownSample: adaLN (c -> 8 C_in), LN on 4 C_in, reduction
    n_out, w_in, w_out = sg[s + 1] ** 2, int(dims[s]), int(dims[s + 1])
    f.conditioning += d0 * 8 * w_in if model.token_enhance else 0
    f.norms += 4 * n_out * 4 * w_in
    f.token_merge += n_out * 4 * w_in * w_out
  for s in range(model.num_down + 1, model.num_stages):  # UpSample + ConcatLayer
    n_in, n_out, w_in, w = sg[s - 1] ** 2, sg[s] ** 2, int(dims[s - 1]), int(dims[s])
    f.token_merge += n_in * w_in * 4 * w
    f.conditioning += d0 * 4 * w if model.token_enhance else 0
    f.norms += 4 * n_out * 2 * w
    f.token_merge += n_out * 2 * w * w
  f.norms += 4 * n0 * d0
  f.final_linear = n0 * d0 * p * p * model.out_channels
  return f


def gflops(model, norms: bool = True) -> float:
  """GFLOPs (1e9 multiply-adds) per forward pass at batch 1; norms=False drops the layer norms
  (the official EDT `get_flops` convention)."""
  b = breakdown(model)
  return (b.total - (0 if norms else b.norms)) / 1e9


def train_flops_per_example(model: models.SiT) -> float:
  """Multiply-adds per training example: forward + backward ~= 3 x forward."""
  return 3.0 * breakdown(model).total


def xla_gflops(model: models.SiT, batch: int = 1) -> float:
  """XLA's cost analysis of the forward (lowered HLO), divided by 2 (it counts 2 per
  multiply-add) and by the batch, in GFLOPs. Parameters are abstract arguments, so nothing is
  computed or constant-folded away."""
  params = models.abstract_params(model)
  x, t, y = models.dummy_inputs(model, batch)
  lowered = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)).lower(
      params, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(t.shape, t.dtype),
      jax.ShapeDtypeStruct(y.shape, y.dtype))
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) / 2 / batch / 1e9


def dot_gflops(model: models.SiT) -> float:
  """Multiply-adds of every dot_general / conv in the forward's jaxpr, GFLOPs (batch 1).

  An independent count of the matmul work from the traced program (no elementwise ops).
  """
  params = models.abstract_params(model)
  x, t, y = models.dummy_inputs(model, 1)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y))(params)
  return _count_dots(jaxpr.jaxpr) / 1e9


def _count_dots(jaxpr) -> int:
  import math  # noqa: PLC0415
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += math.prod(out) * math.prod(lhs[i] for i in lc)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      dn = eqn.params["dimension_numbers"]
      k_in = rhs[dn.rhs_spec[1]]
      k_spatial = math.prod(rhs[i] for i in dn.rhs_spec[2:])
      total += math.prod(out) * k_in * k_spatial
    for sub in _subjaxprs(eqn):
      total += _count_dots(sub)
  return total


def _subjaxprs(eqn):
  """Sub-jaxprs of an equation (pjit, remat, custom_jvp/vjp, scan bodies; cond branches)."""
  for v in eqn.params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr
      elif hasattr(item, "eqns"):
        yield item


# Reference table (fvcore on the official PyTorch code; spec/sit_mediators.md sections 1, 3, 7).
PUBLISHED = [
    # (name, image resolution, mediator_num, GFLOPs)
    ("SiT-S/2", 256, 0, 6.066),
    ("SiT-S/2", 256, 4, 5.493),
    ("SiT-S/2", 256, 16, 5.551),
    ("SiT-S/2", 256, 64, 5.785),
    ("SiT-B/2", 256, 0, 23.025),
    ("SiT-B/2", 256, 64, 22.463),
    ("SiT-L/2", 256, 0, 80.749),
    ("SiT-L/2", 256, 64, 79.252),
    ("SiT-XL/2", 256, 0, 118.689),
    ("SiT-XL/2", 256, 4, 114.679),
    ("SiT-XL/2", 256, 16, 115.087),
    ("SiT-XL/2", 256, 64, 116.716),
    ("SiT-B/2", 512, 0, 106.461),
    ("SiT-B/2", 512, 64, 89.720),
    ("SiT-B/2", 1024, 0, 657.640),
    ("SiT-B/2", 1024, 64, 358.746),
    ("SiT-S/4", 256, 0, 1.415),
    ("SiT-B/4", 256, 0, 5.570),
]


# Official EDT table (models_edt.py comments / README, spec/edt_dydit.md 1.2): GFLOPs at 256 px
# (norms=False) and millions of trainable parameters. EDT-XL/2's stated 51.83 G / 708.4 M do NOT
# belong to the released [6, 4, 4, 7, 7] layout (which is what the official code builds: 53.44 G,
# 698.52 M; see docs/edt.md); both are listed.
PUBLISHED_EDT = [
    # (name, resolution, stated GFLOPs, stated M params, this port's exact GFLOPs, exact params)
    ("EDT-S/2", 256, 2.66, 38.3, 2.667, 38_329_146),
    ("EDT-B/2", 256, 10.20, 152.2, 10.218, 152_262_100),
    ("EDT-XL/2", 256, 51.83, 708.4, 53.44, 698_523_098),
]


def model_at(name: str, resolution: int, mediator_num: int = 0, **kw):
  """A latent-space SiT or EDT for `resolution` px images (latent = resolution / 8)."""
  if name.startswith("EDT"):
    return models.build_model(name, input_size=resolution // 8, **kw)
  return models.build_model(name, input_size=resolution // 8, mediator_num=mediator_num, **kw)
