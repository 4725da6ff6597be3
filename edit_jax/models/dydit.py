"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width and spatial token skipping.

A DyDiT is a SiT/DiT backbone (`edit_jax.models.sit`, same blocks, embedders and parameter names)
plus three small routers per block (spec edt_dydit.md section 2):

  attn_rate/router    Linear(D -> U) on the timestep embedding E_t = t_embedder(t) (not on t + y):
                      one logit per attention head;
  mlp_rate/router     Linear(D -> U): one logit per MLP channel group (the hidden layer of 4D
                      channels is split into H contiguous groups of 4D/H);
  token_selection     mlp_head_0 Linear(D -> D/16), ReLU, mlp_head_2 Linear(D/16 -> 1) on every
                      token of the residual stream after the attention residual (the MLP input).

U = H - 1 with unit 0 always on (router_format "forced": the alibaba-damo-academy/DyDiT release, a
constant 1 is put in front of the router's gates) or U = H (router_format "all": the first
NUS-HPC-AI-Lab release). Gates: y_soft = sigmoid((logit + L) / tau) with L logistic noise (the
difference of two Gumbel(0, 1) draws) from the rng stream "gumbel" when training, sigmoid(logit)
in evaluation; gate = 1[y_soft > 0.5] with a straight-through gradient (y_hard - sg(y_soft) +
y_soft), so forward values are exactly 0 or 1. tau = 5. Router biases start at +15 (width) and +35
(tokens): every gate is on, and the model computes its base SiT/DiT bit for bit.

Where the gates act (official semantics): the head gate (B, H) multiplies each head's attention
output before proj; the group gate (B, H) multiplies fc1's outputs before the GELU; the token gate
(B, N, 1) multiplies the MLP branch: x <- x + token * (gate_mlp * mlp(modulate(norm2(x)))).
Attention always sees every token.

Dense forward (training, evaluation, the official behaviour):
    out = model.apply(v, x, t, y)                               # (B, H, W, C), like SiT
    out, gates = forward_with_gates(model, v, x, t, y)          # gates: head/group (B, L, H),
                                                                # token (B, L, N, 1)
`complete_model=True` runs the same weights at full width without routers (the "complete model"
loss of the fine-tuning recipe). The gates and the FLOPs-ratio loss: `flops_ratio`.

Sparse inference (real savings, `edit_jax.diffusion.dydit`): the width gates depend on t only, so
for a fixed sampler grid they are a table masks[step, layer, unit] (`route`). A *segment model*
(`segment=((k_0, g_0, cap_0), ...)`, one entry per block) is the same module narrowed to k_l heads
and g_l MLP groups, whose parameters are gathered from the full ones by traced indices
(`slice_variables`); its token routers skip the MLP of inactive tokens by gathering at most cap_l
active tokens of the whole batch (B*N rows), running the MLP on them and scatter-adding the result
(`cap_l = 0`: dense token mask), with a dense fallback under `lax.cond` when more tokens are active,
so results never depend on the capacity.

Layouts: as SiT (NHWC images; t (B,) float, SiT's [0, 1] or DiT's integer steps; y (B,) int).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models import attention as attn_lib
from edit_jax.models import sit

GATES = "dydit"            # sow collection of the dense forward: per-block gates
LOGITS = "dydit_logits"    # sow collection: router logits (analysis / parity checks)
ROUTER_FORMATS = ("forced", "all")
WIDTH_BIAS_INIT = 15.0
TOKEN_BIAS_INIT = 35.0
TAU = 5.0


# --------------------------------------------------------------------------- gates
def gumbel_sigmoid_gate(logits, *, tau: float = TAU, train: bool = False, rng=None,
                        noise_scale=1.0):
  """Hard 0/1 gates with a straight-through gradient (official `_gumbel_sigmoid(hard=True)`).

  train: y_soft = sigmoid((logits + s * (g1 - g2)) / tau), g1, g2 ~ Gumbel(0, 1) (drawn as one
  logistic sample, the same distribution), s = noise_scale (1: official; a scalar, may be traced:
  `LossConfig.gate_noise_decay_*` takes it to 0, where the hard training gates equal the
  evaluation gates); eval: y_soft = sigmoid(logits) (no noise, no temperature).
  Returns y_hard - stop_gradient(y_soft) + y_soft (float32, values exactly 0 or 1).
  """
  logits = jnp.asarray(logits, jnp.float32)
  if train:
    if rng is None:
      raise ValueError("training gates need an rng (the 'gumbel' stream)")
    noise = jax.random.logistic(rng, logits.shape, jnp.float32)
    soft = jax.nn.sigmoid((logits + jnp.asarray(noise_scale, jnp.float32) * noise) / tau)
  else:
    soft = jax.nn.sigmoid(logits)
  hard = (soft > 0.5).astype(jnp.float32)
  return hard - jax.lax.stop_gradient(soft) + soft


def eval_mask(logits):
  """The evaluation gate as a float32 0/1 mask: 1[sigmoid(logit) > 0.5] in float32 (equal to
  logit > 0 except for |logit| below ~1e-7, where the official float32 sigmoid rounds to 0.5)."""
  return (jax.nn.sigmoid(jnp.asarray(logits, jnp.float32)) > 0.5).astype(jnp.float32)


class Router(nn.Module):
  """`attn_rate` / `mlp_rate`: Linear(D -> units) on the timestep embedding, in float32."""
  units: int
  bias_init: float = WIDTH_BIAS_INIT

  @nn.compact
  def __call__(self, e):
    return attn_lib.dense(self.units, "router", ("embed", None), jnp.float32,
                          bias_init=nn.initializers.constant(self.bias_init))(
                              jnp.asarray(e, jnp.float32))


class TokenRouter(nn.Module):
  """`token_selection`: D -> hidden -> ReLU -> 1 per token, in float32. (B, N, D) -> (B, N, 1)."""
  hidden: int
  bias_init: float = TOKEN_BIAS_INIT

  @nn.compact
  def __call__(self, x):
    h = attn_lib.dense(self.hidden, "mlp_head_0", ("embed", None), jnp.float32)(
        jnp.asarray(x, jnp.float32))
    return attn_lib.dense(1, "mlp_head_2", (None, None), jnp.float32,
                          bias_init=nn.initializers.constant(self.bias_init))(nn.relu(h))


def _with_forced_unit(g, forced: bool):
  if not forced:
    return g
  return jnp.concatenate([jnp.ones(g.shape[:-1] + (1,), g.dtype), g], axis=-1)


# --------------------------------------------------------------------------- block
class DyDiTBlock(sit.SiTBlock):
  """A SiT block with DyDiT routers (see the module docstring).

  Dense mode (segment=False): __call__(x, c, t_emb, train, complete_model) with routers.
  Segment mode (segment=True): a narrowed block (active_heads / active_hidden of SiTBlock) without
  width routers; `unit_gates` = (head gate (k,), group gate (g,)) zero the padding units of a
  bucketed signature; token_capacity > 0 runs the MLP only on the active tokens (gather/scatter).
  """
  router_format: str = "forced"
  tau: float = TAU
  router_bias: float = WIDTH_BIAS_INIT
  token_bias: float = TOKEN_BIAS_INIT
  token_router_ratio: int = 16
  width_routing: bool = True
  token_routing: bool = True
  segment: bool = False
  token_capacity: int = 0

  @property
  def forced(self) -> bool:
    return self.router_format == "forced"

  def setup(self):
    super().setup()
    units = self.num_heads - 1 if self.forced else self.num_heads
    if self.width_routing and not self.segment:
      self.attn_rate = Router(units, self.router_bias)
      self.mlp_rate = Router(units, self.router_bias)
    if self.token_routing:
      self.token_selection = TokenRouter(max(self.hidden_size // self.token_router_ratio, 1),
                                         self.token_bias)

  def route(self, t_emb):
    """Evaluation width masks and logits from E_t (T, D): head, group (T, H); logits (T, U)."""
    la, lm = self.attn_rate(t_emb), self.mlp_rate(t_emb)
    return (_with_forced_unit(eval_mask(la), self.forced),
            _with_forced_unit(eval_mask(lm), self.forced), la, lm)

  def _gate(self, logits, train, noise_scale=1.0):
    rng = self.make_rng("gumbel") if train else None
    return gumbel_sigmoid_gate(logits, tau=self.tau, train=train, rng=rng,
                               noise_scale=noise_scale)

  def __call__(self, x, c, t_emb=None, train: bool = False, complete_model: bool = False,
               unit_gates=None, gate_noise=1.0):
    x = sit.materialize_cotangent(x)  # as SiTBlock: a linear-in-depth backward (issue 15)
    mod = self.adaLN_modulation_1(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    if complete_model:  # full width, no routers: exactly SiTBlock
      x = x + gate_msa[:, None] * self.attn(sit.modulate(sit.layer_norm(x), shift_msa, scale_msa))
      x = x + gate_mlp[:, None] * self.mlp(sit.modulate(sit.layer_norm(x), shift_mlp, scale_mlp))
      return sit.constrain(x)
    head_gate = group_gate = None
    if self.segment:
      if unit_gates is not None:
        head_gate, group_gate = unit_gates
    elif self.width_routing:
      la, lm = self.attn_rate(t_emb), self.mlp_rate(t_emb)
      head_gate = _with_forced_unit(self._gate(la, train, gate_noise), self.forced)
      group_gate = _with_forced_unit(self._gate(lm, train, gate_noise), self.forced)
      self.sow(GATES, "head", head_gate)
      self.sow(GATES, "group", group_gate)
      self.sow(LOGITS, "attn_logits", la)
      self.sow(LOGITS, "mlp_logits", lm)
    x = x + gate_msa[:, None] * self.attn(
        sit.modulate(sit.layer_norm(x), shift_msa, scale_msa), head_gate=head_gate)
    if not self.token_routing:
      x = x + gate_mlp[:, None] * self.mlp(sit.modulate(sit.layer_norm(x), shift_mlp, scale_mlp),
                                           group_gate)
      return sit.constrain(x)
    tl = self.token_selection(x)
    self.sow(LOGITS, "token_logits", tl)
    token = self._gate(tl, train, gate_noise)
    self.sow(GATES, "token", token)
    if self.segment and self.token_capacity:
      return sit.constrain(self._sparse_mlp_branch(x, token[..., 0] > 0.5, shift_mlp, scale_mlp,
                                                   gate_mlp, group_gate))
    mlp_x = gate_mlp[:, None] * self.mlp(sit.modulate(sit.layer_norm(x), shift_mlp, scale_mlp),
                                         group_gate)
    return sit.constrain(x + token.astype(x.dtype) * mlp_x)

  # ------------------------------------------------------------------ sparse token skipping
  def _sparse_mlp_branch(self, x, keep, shift, scale, gate, group_gate):
    """x + keep * MLP branch, running the MLP on at most `token_capacity` rows of the flattened
    (B*N, D) batch (the active tokens), with a dense fallback when more tokens are active."""
    b, n, d = x.shape
    cap = int(self.token_capacity)
    flat = x.reshape(b * n, d)
    keep_flat = keep.reshape(b * n)
    count = keep_flat.sum(dtype=jnp.int32)
    self.sow(GATES, "token_count", count)

    def sparse(mdl, flat):
      idx = jnp.nonzero(keep_flat, size=cap, fill_value=b * n)[0]
      safe = jnp.minimum(idx, b * n - 1)
      row_b = safe // n
      rows = sit.layer_norm(flat[safe]) * (1 + scale[row_b]) + shift[row_b]
      out = gate[row_b] * mdl.mlp(rows, group_gate)
      return flat.at[idx].add(out.astype(flat.dtype), mode="drop")

    def dense(mdl, flat):
      xx = flat.reshape(b, n, d)
      mlp_x = gate[:, None] * mdl.mlp(sit.modulate(sit.layer_norm(xx), shift, scale), group_gate)
      return (xx + keep[..., None].astype(xx.dtype) * mlp_x).reshape(b * n, d)

    if cap >= b * n:
      return dense(self, flat).reshape(b, n, d)
    return nn.cond(count <= cap, sparse, dense, self, flat).reshape(b, n, d)


# --------------------------------------------------------------------------- model
class DyDiT(sit.SiT):
  """SiT/DiT with DyDiT routers. Extra fields:

    router_format: "forced" (H - 1 router outputs, unit 0 always on; alibaba-damo-academy/DyDiT)
      or "all" (H outputs; the first NUS-HPC-AI-Lab release).
    tau: Gumbel-sigmoid temperature (5). router_bias / token_bias: initial router biases (15, 35).
    token_router_ratio: the token router's hidden width is D / token_router_ratio (16).
    width_routing / token_routing: switch TDW / SDT off (ablations; official: both on).
    segment: None (the dense model) or a per-block tuple (heads, groups, token_capacity) describing
      a narrowed segment model for sparse inference (see the module docstring).
  """
  router_format: str = "forced"
  tau: float = TAU
  router_bias: float = WIDTH_BIAS_INIT
  token_bias: float = TOKEN_BIAS_INIT
  token_router_ratio: int = 16
  width_routing: bool = True
  token_routing: bool = True
  segment: Any = None

  @property
  def router_units(self) -> int:
    return self.num_heads - 1 if self.router_format == "forced" else self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def group_size(self) -> int:
    return self.mlp_hidden // self.num_heads

  def validate(self):
    super().validate()
    if self.router_format not in ROUTER_FORMATS:
      raise ValueError(f"router_format={self.router_format!r}: expected 'forced' (H-1 router "
                       f"outputs + unit 0 always on, alibaba-damo-academy/DyDiT) or 'all' (H "
                       f"outputs, the first NUS-HPC-AI-Lab release)")
    if self.mlp_hidden % self.num_heads:
      raise ValueError(f"the MLP hidden size {self.mlp_hidden} must split into num_heads="
                       f"{self.num_heads} equal channel groups")
    if not self.tau > 0:
      raise ValueError(f"tau={self.tau} must be > 0 (official: 5)")
    if self.segment is not None:
      seg = tuple(tuple(int(v) for v in s) for s in self.segment)
      if len(seg) != self.depth or any(len(s) != 3 for s in seg):
        raise ValueError(f"segment must hold one (heads, groups, token_capacity) per block "
                         f"({self.depth}), got {self.segment}")
      bad = [s for s in seg if not (1 <= s[0] <= self.num_heads and 1 <= s[1] <= self.num_heads
                                    and s[2] >= 0)]
      if bad:
        raise ValueError(f"segment entries {bad}: heads and groups must be in [1, "
                         f"{self.num_heads}], token capacity >= 0")

  def block_class(self):
    if self.remat:
      return nn.remat(DyDiTBlock, static_argnums=(4, 5))
    return DyDiTBlock

  def block_kwargs(self, i: int) -> dict:
    kw = dict(router_format=self.router_format, tau=self.tau, router_bias=self.router_bias,
              token_bias=self.token_bias, token_router_ratio=self.token_router_ratio,
              width_routing=self.width_routing, token_routing=self.token_routing)
    if self.segment is not None:
      k, g, cap = (int(v) for v in self.segment[i])
      kw.update(segment=True, active_heads=k, active_hidden=g * self.group_size,
                token_capacity=cap)
    return kw

  def router_flops(self) -> int:
    """Multiply-adds of the routers per forward at batch 1 (width routers once per sample, the
    token router on every token)."""
    d, n, hid = self.hidden_size, self.num_tokens, max(self.hidden_size // self.token_router_ratio, 1)
    per_block = (2 * d * self.router_units if self.width_routing else 0) + \
        (n * (d * hid + hid) if self.token_routing else 0)
    return self.depth * per_block

  def __call__(self, x, t, y, train: bool = False, complete_model: bool = False,
               full_output: bool = False, unit_gates: Optional[Sequence] = None,
               gate_noise=1.0):
    """x (B, H, W, C) NHWC, t (B,), y (B,) -> (B, H, W, in_channels) (all out_channels with
    full_output, e.g. DiT's learned sigma). unit_gates: segment models only, one (head gate (k,),
    group gate (g,)) per block. gate_noise: scale of the training gates' logistic noise (scalar,
    may be traced; 1 = official, 0 = the evaluation gates with a straight-through gradient)."""
    t, y = jnp.asarray(t), jnp.asarray(y)
    self.check_inputs(x, t, y)
    if self.segment is not None and complete_model:
      raise ValueError("a segment model is narrowed: it has no complete (full-width) forward")
    pos = jnp.asarray(sit.sincos_pos_embed(self.hidden_size, self.grid))
    h = sit.constrain(self.x_embedder(x.astype(self.dtype)) + pos.astype(self.dtype))
    t_emb = self.t_embedder(t)
    c = (t_emb + self.y_embedder(y, train)).astype(self.dtype)
    for i, block in enumerate(self.blocks):
      h = block(h, c, t_emb, train, complete_model,
                None if unit_gates is None else unit_gates[i], gate_noise)
    h = self.final_layer(h, c)
    out = self.unpatchify(h)
    if not full_output:
      out = out[..., :self.in_channels]
    return out.astype(jnp.float32)

  def route(self, t):
    """Evaluation width masks for timesteps t (T,): head, group (T, L, H) float 0/1, and the
    router logits (T, L, U) of both routers. They depend on t only (not on x or y)."""
    if self.segment is not None or not self.width_routing:
      raise ValueError("route() needs the dense model with width routers")
    t_emb = self.t_embedder(jnp.asarray(t))
    outs = [blk.route(t_emb) for blk in self.blocks]
    return tuple(jnp.stack([o[j] for o in outs], axis=1) for j in range(4))


sit.register_family("dydit", DyDiT)


# --------------------------------------------------------------------------- construction
def from_sit(base: sit.SiT, **dydit_fields) -> DyDiT:
  """The DyDiT with `base`'s architecture (a SiT/DiT module) and the given DyDiT fields."""
  cfg = sit.model_config(base)
  cfg.pop("arch", None)
  cfg.update(dydit_fields)
  return sit.model_from_config({**cfg, "arch": "dydit"})


def init_from_base(model: DyDiT, base_params, rng) -> dict:
  """DyDiT params: the base SiT/DiT params plus freshly initialised routers (bias +15 / +35).
  Raises if a base tensor is missing or has another shape."""
  from flax import traverse_util  # noqa: PLC0415
  fresh = sit.init_params(model, rng)
  f, b = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(base_params)
  missing = [k for k in f if k not in b and not _is_router_key(k)]
  bad = [k for k in f if k in b and tuple(np.shape(b[k])) != tuple(f[k].shape)]
  extra = [k for k in b if k not in f]
  if missing or bad or extra:
    raise ValueError(f"base params do not fit the DyDiT: missing {['/'.join(k) for k in missing]},"
                     f" wrong shape {['/'.join(k) for k in bad]}, unexpected "
                     f"{['/'.join(k) for k in extra]}")
  out = {k: (jnp.asarray(b[k]) if k in b else v) for k, v in f.items()}
  return traverse_util.unflatten_dict(out)


ROUTER_MODULES = ("attn_rate", "mlp_rate", "token_selection")


def _is_router_key(k) -> bool:
  return any(p in ROUTER_MODULES for p in k)


def is_router_path(path) -> bool:
  """Whether a pytree path (from `jax.tree_util.tree_map_with_path`) is a router parameter."""
  return any(getattr(p, "key", getattr(p, "name", None)) in ROUTER_MODULES for p in path)


def scale_router_updates(mult: float):
  """An optax transformation multiplying the router parameters' updates by `mult` (chain it after
  the optimizer: a router learning rate of mult x the backbone's). Short fine-tuning runs need it:
  with Adam a parameter moves about lr per step, and the router logits start at +15 / +35."""
  import optax  # noqa: PLC0415

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * mult if is_router_path(p) else u, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def forward_with_gates(model: DyDiT, variables, x, t, y, *, train: bool = False, rngs=None,
                       full_output: bool = False, logits: bool = False, gate_noise=1.0):
  """Dense forward returning (out, gates): gates = {"head": (B, L, H), "group": (B, L, H),
  "token": (B, L, N, 1)} (entries absent when that routing is off; with logits=True also
  "attn_logits" / "mlp_logits" (B, L, U) and "token_logits" (B, L, N, 1))."""
  cols = [GATES] + ([LOGITS] if logits else [])
  out, state = model.apply(variables, x, t, y, train=train, full_output=full_output, rngs=rngs,
                           mutable=cols, gate_noise=gate_noise)
  return out, stack_sown(state, model.depth)


def stack_sown(state, depth: int) -> dict:
  """{"blocks_i": {name: (value,)}} sown collections -> {name: stacked over blocks on axis 1}."""
  out = {}
  for col in (GATES, LOGITS):
    tree = state.get(col, {})
    names = sorted({n for i in range(depth) for n in tree.get(f"blocks_{i}", {})})
    for name in names:
      vals = [tree[f"blocks_{i}"][name][0] for i in range(depth) if name in tree.get(f"blocks_{i}", {})]
      out[name] = jnp.stack(vals, axis=1) if vals[0].ndim else jnp.stack(vals)
  return out


# --------------------------------------------------------------------------- FLOPs ratio
def flops_ratio(model: DyDiT, gates: dict):
  """Per-sample FLOPs ratio (B,) of the blocks (DyDiT's accounting, official `DynamicLoss`):

    ratio_b = 1 - sum_l [A_l (1 - mean_h head[b,l]) + M_l (1 - mean_g group[b,l] mean_n token[b,l])]
                  / sum_l (A_l + M_l)

  with A_l, M_l the attention / MLP multiply-adds of block l from `edit_jax.flops.block_costs`
  (embedders, adaLN, routers and the final layer are excluded, as officially). Written as one
  minus the saving, so all gates on give exactly 1. Missing gates count as all on.
  """
  from edit_jax import flops  # noqa: PLC0415
  attn, mlp = flops.block_costs(model)
  total = float((attn + mlp).sum())
  a = jnp.asarray(attn / total, jnp.float32)
  m = jnp.asarray(mlp / total, jnp.float32)
  ref = next(iter(gates.values()))
  ones = jnp.ones(ref.shape[:2], jnp.float32)
  head = gates["head"].mean(-1) if "head" in gates else ones
  group = gates["group"].mean(-1) if "group" in gates else ones
  token = gates["token"].reshape(gates["token"].shape[:2] + (-1,)).mean(-1) \
      if "token" in gates else ones
  saved = (a * (1 - head) + m * (1 - group * token)).sum(-1)
  return 1.0 - saved


def flops_loss(ratio, target, weight: float = 2.0):
  """w * (mean_b ratio_b - target)^2 (the target is met on the batch average)."""
  return weight * jnp.square(jnp.mean(ratio) - target)


# --------------------------------------------------------------------------- parameter surgery
def _take_units(a, idx, axis: int, units: int):
  """Units idx (k,) of `a` along `axis`, where that axis holds `units` contiguous equal blocks
  (e.g. heads of hd channels): a reshape, one gather of whole blocks, a reshape back."""
  shape = a.shape
  blocked = a.reshape(shape[:axis] + (units, shape[axis] // units) + shape[axis + 1:])
  out = jnp.take(blocked, jnp.asarray(idx, jnp.int32), axis=axis)
  return out.reshape(shape[:axis] + (-1,) + shape[axis + 1:])


def _slice_attention(p, idx, num_heads: int, dim: int):
  """Attention params (full or mediator) restricted to heads idx (k,), in that order."""
  h = num_heads
  qkv_k = p["qkv"]["kernel"]                        # (D, 3D): [q | k | v], head-major inside
  qkv_k = _take_units(qkv_k.reshape(qkv_k.shape[0], 3, dim), idx, 2, h)
  qkv_b = _take_units(p["qkv"]["bias"].reshape(3, dim), idx, 1, h)
  out = {
      "qkv": {"kernel": qkv_k.reshape(qkv_k.shape[0], -1), "bias": qkv_b.reshape(-1)},
      "proj": {"kernel": _take_units(p["proj"]["kernel"], idx, 0, h), "bias": p["proj"]["bias"]},
  }
  if "dwc" in p:
    out["dwc"] = {"kernel": _take_units(p["dwc"]["kernel"], idx, 3, h),
                  "bias": _take_units(p["dwc"]["bias"], idx, 0, h)}
    ix = jnp.asarray(idx, jnp.int32)
    for name in ("an_bias", "na_bias"):
      out[name] = jnp.take(p[name], ix, axis=0)
    for name in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
      out[name] = jnp.take(p[name], ix, axis=1)
  return out


def _slice_mlp(p, idx, groups: int):
  return {"fc1": {"kernel": _take_units(p["fc1"]["kernel"], idx, 1, groups),
                  "bias": _take_units(p["fc1"]["bias"], idx, 0, groups)},
          "fc2": {"kernel": _take_units(p["fc2"]["kernel"], idx, 0, groups),
                  "bias": p["fc2"]["bias"]}}


def slice_variables(model: DyDiT, variables, head_idx: Sequence, group_idx: Sequence,
                    keep_routers: bool = False):
  """Variables of a narrowed model: block l keeps heads head_idx[l] (k_l,) and MLP groups
  group_idx[l] (g_l,) (int arrays; traced values are fine, the lengths are static), in the given
  order. The width routers are dropped unless keep_routers (a permutation: `reorder_units`).
  A "mediator_cache" collection (precomputed position biases) is sliced along with the params.
  """
  params = variables["params"] if "params" in variables else variables
  out = dict(params)
  cache = variables.get(attn_lib.CACHE) if "params" in variables else None
  new_cache = dict(cache) if cache else None
  for i in range(model.depth):
    name = f"blocks_{i}"
    blk = dict(params[name])
    blk["attn"] = _slice_attention(params[name]["attn"], head_idx[i], model.num_heads,
                                   model.hidden_size)
    blk["mlp"] = _slice_mlp(params[name]["mlp"], group_idx[i], model.num_heads)
    if not keep_routers:
      blk.pop("attn_rate", None)
      blk.pop("mlp_rate", None)
    out[name] = blk
    if new_cache and name in new_cache:
      c = new_cache[name]["attn"]
      idx = jnp.asarray(head_idx[i], jnp.int32)
      new_cache[name] = {"attn": {k: jnp.take(v, idx, axis=0) for k, v in c.items()}}
  if "params" not in variables:
    return out
  res = dict(variables)
  res["params"] = out
  if new_cache:
    res[attn_lib.CACHE] = new_cache
  return res


def unit_importance(model: sit.SiT, params):
  """Magnitude importance per block: heads (L, H) = ||W_v[:, head]||_F * ||W_proj[head, :]||_F
  (the size of the head's value->output map) and MLP groups (L, H) = ||W_fc1[:, group]||_F *
  ||W_fc2[group, :]||_F. numpy float64."""
  h, d = model.num_heads, model.hidden_size
  hd, gs = d // h, int(d * model.mlp_ratio) // h
  heads, groups = [], []
  for i in range(model.depth):
    p = jax.device_get(params[f"blocks_{i}"])
    qkv = np.asarray(p["attn"]["qkv"]["kernel"], np.float64)
    proj = np.asarray(p["attn"]["proj"]["kernel"], np.float64)
    v = qkv[:, 2 * d:].reshape(d, h, hd)
    heads.append(np.linalg.norm(v, axis=(0, 2)) * np.linalg.norm(proj.reshape(h, hd, d), axis=(1, 2)))
    fc1 = np.asarray(p["mlp"]["fc1"]["kernel"], np.float64)
    fc2 = np.asarray(p["mlp"]["fc2"]["kernel"], np.float64)
    groups.append(np.linalg.norm(fc1.reshape(d, h, gs), axis=(0, 2))
                  * np.linalg.norm(fc2.reshape(h, gs, d), axis=(1, 2)))
  return np.stack(heads), np.stack(groups)


def reorder_units(model: DyDiT, variables):
  """Magnitude reordering before fine-tuning (spec 4.4): permutes each block's heads and MLP
  groups by decreasing `unit_importance`, so unit 0 (always on with the "forced" router format)
  is the most important. A function-preserving permutation of qkv columns, proj rows, the mediator
  tables and depthwise-conv channels, fc1 columns and fc2 rows (the output changes only by float
  summation order). Routers are left as they are (apply it to freshly initialised routers).
  Returns (variables, (head_perm (L, H), group_perm (L, H))).
  """
  params = variables["params"] if "params" in variables else variables
  hi, gi = unit_importance(model, params)
  hp = np.argsort(-hi, axis=1, kind="stable").astype(np.int32)
  gp = np.argsort(-gi, axis=1, kind="stable").astype(np.int32)
  out = jax.jit(lambda v, h, g: slice_variables(model, v, h, g, keep_routers=True))(
      variables, list(hp), list(gp))
  return out, (hp, gp)
