"""SiT (Scalable Interpolant Transformer) with optional Attention Mediators, in Flax linen.

Computes the same function as the official PyTorch `SiT` (willisma/SiT models.py) and the mediator
variant (LeapLabTHU/Attention-Mediators attention_mediator/models.py); see spec/sit_mediators.md.

Layouts: images are NHWC everywhere in this package. `SiT.__call__` takes x (B, H, W, C), t (B,) in
[0, 1] (0 = noise, 1 = data; unscaled, as SiT), y (B,) int labels in [0, num_classes] where
`num_classes` is the null (unconditional) class, and returns (B, H, W, in_channels): the
learned-sigma half is dropped, as the official `forward` does. The official model is NCHW;
`edit_jax.convert` converts checkpoints and tests transpose the golden NCHW tensors.

Logical axis names on parameters (for sharding rules, see edit_jax.sharding):
  "embed" (hidden size D), "mlp" (MLP hidden), "qkv" (3D), "heads_merged" (D after attention),
  "adaln" (6D / 2D modulation), "vocab" (label table rows), "patch_out" (final p*p*C), None.
Activations are constrained as ("activation_batch", "activation_length", "activation_embed").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models import amm as amm_lib
from edit_jax.models import attention as attn_lib
from edit_jax.models import attention_core

Dtype = Any

# name -> (depth, hidden_size, num_heads)
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
MODEL_NAMES = tuple(f"SiT-{s}/{p}" for s in SIZES for p in (2, 4, 8))
HEADS_BY_WIDTH = {d: h for (_, d, h) in SIZES.values()}
# AMM plug-in placement of the official EDT code (other_models/*_with_amm.py), by (depth, width):
# DiT-XL/2 blocks 15, 17, 19, 22, 24; DiT-S/2 blocks 8, 10 (spec/edt_dydit.md section 1.3).
OFFICIAL_AMM = {(28, 1152): (15, 17, 19, 22, 24), (12, 384): (8, 10)}


# --------------------------------------------------------------------------- embeddings
def sincos_pos_embed(hidden_size: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (grid*grid, D), float32, row-major tokens.

  Token (row i, col j): [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k / (D/4)).
  (The first half encodes the column, as the official `get_2d_sincos_pos_embed`.)
  """
  if hidden_size % 4:
    raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
  q = hidden_size // 4
  omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
  coords = np.arange(grid, dtype=np.float64)
  rows, cols = np.meshgrid(coords, coords, indexing="ij")

  def emb(pos):
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([emb(cols), emb(rows)], axis=1).astype(np.float32)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """Sinusoidal timestep features (B, dim): [cos(t f), sin(t f)], f_k = exp(-ln(P) k / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(x):
  """LayerNorm without affine params, eps 1e-6, computed in float32."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + 1e-6)).astype(dtype)


def _materialize(t):
  """Identity on t (..., D) that XLA computes into its own buffer (see `materialize_cotangent`).

  GPU/TPU: `optimization_barrier`, which their compilers keep until after fusion. XLA:CPU removes
  optimization barriers before fusion, so there t goes through a dot with eye(2) over channel
  pairs, (..., D/2, 2) x (2, 2): exact (t*1 + u*0, no rounding), 4 flops per element, and a dot is
  never fused into elementwise consumers.
  """
  def cpu(v):
    pairs = v.reshape(v.shape[:-1] + (v.shape[-1] // 2, 2))
    eye = jnp.eye(2, dtype=v.dtype)
    out = jax.lax.dot_general(pairs, eye, (((pairs.ndim - 1,), (0,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST)
    return out.reshape(v.shape)
  if t.shape[-1] % 2:
    return jax.lax.optimization_barrier(t)
  return jax.lax.platform_dependent(t, cpu=cpu, default=jax.lax.optimization_barrier)


@jax.custom_jvp
def materialize_cotangent(x):
  """Identity on the residual stream x (B, N, D) whose cotangent XLA must materialize.

  Without it, the backward pass's residual-stream cotangent (dx of block l = dx of block l + 1 plus
  LayerNorm/gate terms) is a chain of elementwise ops that XLA fusion duplicates into every
  consumer (weight-gradient dots, gate/shift reductions): each block then recomputes the chain of
  all later blocks, so the gradient costs O(depth^2) elementwise work (issue 15: 12x the forward
  on CPU at depth 12). Forward values and the forward HLO are unchanged; jvp, vjp and remat work.
  """
  return x


@materialize_cotangent.defjvp
def _materialize_cotangent_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return x, _materialize(t)


def constrain(x):
  return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class TimestepEmbedder(nn.Module):
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    x = timestep_embedding(t).astype(self.dtype)
    x = attn_lib.dense(self.hidden_size, "mlp_0", (None, "embed"), self.dtype, kernel_init=init)(x)
    x = nn.silu(x)
    return attn_lib.dense(self.hidden_size, "mlp_2", ("mlp", "embed"), self.dtype, kernel_init=init)(x)


class LabelEmbedder(nn.Module):
  """Label table (num_classes + 1, D) with the null class `num_classes` when dropout is used."""
  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, y, train: bool = False):
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = self.param("embedding_table",
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (rows, self.hidden_size), jnp.float32)
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    return jnp.take(table, y, axis=0)


def apply_group_gate(h, group_gate):
  """h (..., hidden) times a per-channel-group gate: (B, G) per sample (h is (B, ..., hidden)) or
  (G,) for every row. Group u covers the contiguous channels [u hidden/G, (u+1) hidden/G)."""
  if group_gate is None:
    return h
  g = jnp.asarray(group_gate, h.dtype)
  g = jnp.repeat(g, h.shape[-1] // g.shape[-1], axis=-1)
  if g.ndim == 2:
    g = g.reshape(g.shape[:1] + (1,) * (h.ndim - 2) + g.shape[1:])
  return h * g


class Mlp(nn.Module):
  """fc1 -> tanh-GELU -> fc2. `group_gate` (optional call argument, DyDiT's MLP-group mask): (B, G)
  or (G,) multiplies fc1's outputs in G contiguous channel groups before the GELU."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, group_gate=None):
    x = attn_lib.dense(self.hidden, "fc1", ("embed", "mlp"), self.dtype)(x)
    x = apply_group_gate(x, group_gate)
    x = nn.gelu(x, approximate=True)
    return attn_lib.dense(self.out, "fc2", ("mlp", "embed"), self.dtype)(x)


class SiTBlock(nn.Module):
  """adaLN-Zero transformer block; attention is full or mediator by `mediator_num` (0 = full).

  active_heads / active_hidden (0 = all): a *narrowed* block that holds only k of the num_heads
  heads (each D / num_heads wide) and an MLP hidden layer of that many channels; its parameters are
  slices of the full block's (used by DyDiT's sparse inference, `edit_jax.models.dydit`).
  """
  hidden_size: int
  num_heads: int
  grid: int
  mlp_ratio: float = 4.0
  mediator_num: int = 0
  attention_impl: str = "xla"
  full_attention_impl: Optional[str] = None
  amm_mode: str = "post_softmax"
  amm_k: float = 0.5
  amm_period_factor: float = 4.0
  dtype: Dtype = jnp.float32
  active_heads: int = 0
  active_hidden: int = 0
  elastic_grid: int = 0

  def setup(self):
    d = self.hidden_size
    heads, hd = self.active_heads or self.num_heads, d // self.num_heads
    if self.mediator_num:
      self.attn = attn_lib.MediatorAttention(d, heads, self.grid, self.mediator_num,
                                             dtype=self.dtype, impl=self.attention_impl,
                                             head_dim=hd, elastic_grid=self.elastic_grid)
    else:
      self.attn = attn_lib.FullAttention(d, heads, dtype=self.dtype,
                                         implementation=self.full_attention_impl,
                                         amm_mode=self.amm_mode, head_dim=hd)
    self.mlp = Mlp(self.active_hidden or int(d * self.mlp_ratio), d, dtype=self.dtype)
    self.adaLN_modulation_1 = attn_lib.dense(6 * d, "adaLN_modulation_1", ("embed", "adaln"),
                                             self.dtype, kernel_init=nn.initializers.zeros_init())

  def __call__(self, x, c, use_amm: bool = False):
    """use_amm (static): multiply the attention probabilities by the AMM (full attention only)."""
    x = materialize_cotangent(x)
    mod = self.adaLN_modulation_1(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm(x), shift_msa, scale_msa)
    if use_amm and not self.mediator_num:
      h = self.attn(h, amm_lib.modulation_matrix(self.grid, self.amm_k, self.amm_period_factor))
    else:
      h = self.attn(h)
    x = x + gate_msa[:, None] * h
    x = x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
    return constrain(x)


class FinalLayer(nn.Module):
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    zeros = nn.initializers.zeros_init()
    mod = attn_lib.dense(2 * self.hidden_size, "adaLN_modulation_1", ("embed", "adaln"), self.dtype,
                         kernel_init=zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(layer_norm(x), shift, scale)
    return attn_lib.dense(self.patch_size ** 2 * self.out_channels, "linear", ("embed", "patch_out"),
                          self.dtype, kernel_init=zeros)(x)


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = p (torch PatchEmbed): (B, H, W, C) -> (B, (H/p)*(W/p), D)."""
  hidden_size: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    # torch xavier_uniform on the (D, C*p*p) view: fan_in = C*p*p, fan_out = D.
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="proj",
                kernel_init=nn.with_logical_partitioning(init, (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)


class PatchGridMixin:
  """What every patch-token backbone (SiT, DiT, DyDiT, EDT) derives from input_size, patch_size,
  in_channels, learn_sigma and class_dropout_prob, and its shared input / output layers."""

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def grid(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2

  def setup_io_layers(self, d: int):
    """x_embedder / t_embedder / y_embedder / final_layer at width d (call from setup; the
    official parameter names)."""
    self.x_embedder = PatchEmbed(d, self.patch_size, dtype=self.dtype)
    self.t_embedder = TimestepEmbedder(d, dtype=self.dtype)
    self.y_embedder = LabelEmbedder(self.num_classes, d, self.class_dropout_prob)
    self.final_layer = FinalLayer(d, self.patch_size, self.out_channels, dtype=self.dtype)


def check_model_inputs(self, x, t, y):
  """Host-side shape/label checks shared by the model families (skipped for traced labels)."""
  expect = (self.input_size, self.input_size, self.in_channels)
  if x.ndim != 4 or tuple(x.shape[1:]) != expect:
    hint = ""
    if x.ndim == 4 and x.shape[1] == self.in_channels and x.shape[-1] != self.in_channels:
      hint = " The input looks NCHW: transpose it to NHWC with x.transpose(0, 2, 3, 1)."
    raise ValueError(
        f"{type(self).__name__} was built for inputs (B, {expect[0]}, {expect[1]}, {expect[2]}) "
        f"(NHWC) but got {tuple(x.shape)}.{hint} To run at another resolution build the model with that "
        f"input_size (and convert/fine-tune the position-dependent parameters).")
  if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
    raise ValueError(f"t and y must have shape (B,) = ({x.shape[0]},); got t {t.shape}, "
                     f"y {y.shape}")
  try:  # host-side label check when y is concrete; skipped under jit (traced values)
    y_np = np.asarray(y)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    y_np = None
  if y_np is not None:
    hi = self.num_classes if self.class_dropout_prob > 0 else self.num_classes - 1
    if y_np.size and (y_np.min() < 0 or y_np.max() > hi):
      raise ValueError(
          f"labels must be in [0, {hi}] ({self.num_classes} classes"
          f"{', plus the null class ' + str(self.num_classes) if hi == self.num_classes else ''}); "
          f"got values in [{y_np.min()}, {y_np.max()}]")


def batch_doubled_cfg(model, x, t, y, cfg_scale, guide_channels: Optional[int] = 3,
                      full_output: bool = False):
  """The official `forward_with_cfg` of DiT/SiT/EDT for any model called as
  `model(x, t, y, full_output=...)`: the first half of x is used twice, guidance on the first
  `guide_channels` channels (None: the in_channels epsilon channels) placed in both halves."""
  half = x[: x.shape[0] // 2]
  out = model(jnp.concatenate([half, half], axis=0), t, y, full_output=full_output)
  k = model.in_channels if guide_channels is None else guide_channels
  eps, rest = out[..., :k], out[..., k:]
  cond, uncond = jnp.split(eps, 2, axis=0)
  guided = uncond + cfg_scale * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def unpatchify(h, g: int, p: int, c: int):
  """(B, g*g, p*p*C) with index (pi*p + pj)*C + c -> (B, g*p, g*p, C) NHWC."""
  b = h.shape[0]
  h = h.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return h.reshape(b, g * p, g * p, c)


def resolve_mediator_layers(depth: int, mediator_num: int, mediator_layers) -> tuple[int, ...]:
  """Indices of blocks that use mediator attention.

  mediator_layers: None or "all" (every block, the official code), an int k (the first k blocks,
  the paper's SiT-XL/2 setting), or a sequence of block indices.
  """
  if not mediator_num:
    return ()
  if mediator_layers is None or mediator_layers == "all":
    return tuple(range(depth))
  if isinstance(mediator_layers, (int, np.integer)) and not isinstance(mediator_layers, bool):
    k = int(mediator_layers)
    if not 0 <= k <= depth:
      raise ValueError(f"mediator_layers={k} (first k blocks) must be in [0, depth={depth}]")
    return tuple(range(k))
  if isinstance(mediator_layers, str):
    try:
      idx = tuple(int(s) for s in mediator_layers.replace(" ", "").split(",") if s)
    except ValueError as e:
      raise ValueError(f"mediator_layers={mediator_layers!r}: expected 'all', an int k, or a "
                       f"comma-separated list of block indices like '0,1,2,3'") from e
  else:
    idx = tuple(int(i) for i in mediator_layers)
  bad = [i for i in idx if not 0 <= i < depth]
  if bad:
    raise ValueError(f"mediator_layers has block indices {bad} outside [0, depth={depth})")
  return tuple(sorted(set(idx)))


class SiT(PatchGridMixin, nn.Module):
  """SiT backbone. See module docstring for layouts.

  Attributes mirror the official constructor; extra ones:
    mediator_num: mediators per mediator layer (0 = standard attention everywhere).
    mediator_layers: which blocks use mediators (see `resolve_mediator_layers`).
    attention_impl: "xla" (jnp reference) or "pallas" (fused kernel) for mediator layers.
    full_attention_impl: the full-attention core (edit_jax.models.attention_core): None
      (automatic: head-major jnp core on CPU, jax.nn.dot_product_attention elsewhere), "xla",
      "cudnn" (jax.nn.dot_product_attention's implementations) or "head_major".
    amm_layers: blocks that multiply their attention probabilities by EDT's AMM at sampling time
      (train=False; also in training with amm_in_train): None/"none" (off), "official" (the EDT
      code's DiT plug-in list: DiT-XL/2 15,17,19,22,24; DiT-S/2 8,10), "all" (every
      full-attention block; mediator blocks are left alone, they have no N x N attention map),
      or block indices. amm_mode: "post_softmax" | "log_bias" (edit_jax.models.amm).
    dtype: compute dtype (params stay float32). remat: rematerialize each block in training.
    elastic_grid: 0 = the official per-n mediator bias tables; R > 0 = elastic mediators: tables
      over an R x R reference mediator grid, so the same parameters run at any `mediator_num`
      (`model.clone(mediator_num=n)`; see edit_jax.elastic).
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  mediator_num: int = 0
  mediator_layers: Any = None
  attention_impl: str = "xla"
  full_attention_impl: Optional[str] = None
  amm_layers: Any = None
  amm_mode: str = "post_softmax"
  amm_in_train: bool = False
  amm_k: float = 0.5
  amm_period_factor: float = 4.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  elastic_grid: int = 0

  arch = "sit"

  @property
  def amm_blocks(self) -> tuple[int, ...]:
    """Blocks applying AMM at sampling time (full-attention blocks only; see `amm_layers`)."""
    spec = amm_lib.parse_layers(self.amm_layers)
    med = set(self.mediator_blocks)
    if spec is None or spec == ():
      return ()
    if spec == "all":
      return tuple(i for i in range(self.depth) if i not in med)
    if isinstance(spec, str):
      if spec != "official" or (self.depth, self.hidden_size) not in OFFICIAL_AMM:
        raise ValueError(
            f"amm_layers={spec!r}: the official plug-in placement exists only for DiT/SiT-XL/2 "
            f"(15,17,19,22,24) and -S/2 (8,10); give block indices for this model (depth "
            f"{self.depth}), e.g. amm_layers='{self.depth - 4},{self.depth - 2}'")
      spec = OFFICIAL_AMM[(self.depth, self.hidden_size)]
    idx = amm_lib.check_indices(spec, self.depth)
    bad = sorted(med & set(idx))
    if bad:
      raise ValueError(
          f"amm_layers names blocks {bad}, which use mediator attention: AMM modulates an N x N "
          f"attention map that mediator attention does not have (spec/edt_dydit.md 4.7). Remove "
          f"them, or use amm_layers='all' for every full-attention block")
    return idx

  @property
  def mediator_blocks(self) -> tuple[int, ...]:
    return resolve_mediator_layers(self.depth, self.mediator_num, self.mediator_layers)

  def validate(self):
    """Raises ValueError naming the bad value and the fix."""
    if self.input_size % self.patch_size:
      raise ValueError(
          f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}: use an "
          f"input size that is a multiple of {self.patch_size} (e.g. "
          f"{self.input_size - self.input_size % self.patch_size}) or another patch size")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.attention_impl not in ("xla", "pallas"):
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected 'xla' or 'pallas'")
    attention_core.check_implementation(self.full_attention_impl)
    if self.num_classes < 1:
      raise ValueError(f"num_classes={self.num_classes} must be >= 1")
    if self.mediator_num:
      attn_lib.check_mediator_num(self.mediator_num, self.num_tokens)
    if self.elastic_grid:
      if int(self.elastic_grid) != self.elastic_grid or self.elastic_grid < 1:
        raise ValueError(f"elastic_grid={self.elastic_grid} must be a positive int (the side R of "
                         f"the R x R reference mediator grid) or 0 for static mediators")
      if not self.mediator_num:
        raise ValueError(f"elastic_grid={self.elastic_grid} needs mediators: set mediator_num to "
                         f"the count to run at (e.g. {self.elastic_grid ** 2})")
    self.mediator_blocks  # noqa: B018  (validates mediator_layers)
    amm_lib.check_mode(self.amm_mode)
    self.amm_blocks  # noqa: B018  (validates amm_layers)

  def block_class(self):
    """The block module (rematerialized when `remat`); families built on SiT override it."""
    return nn.remat(SiTBlock, static_argnums=(3,)) if self.remat else SiTBlock

  def block_kwargs(self, i: int) -> dict:
    """Extra constructor arguments of block i (hook for families built on SiT)."""
    del i
    return {}

  def setup(self):
    self.validate()
    d = self.hidden_size
    self.setup_io_layers(d)
    block_cls = self.block_class()
    med = set(self.mediator_blocks)
    self.blocks = [
        block_cls(d, self.num_heads, self.grid, self.mlp_ratio,
                  mediator_num=self.mediator_num if i in med else 0,
                  attention_impl=self.attention_impl, full_attention_impl=self.full_attention_impl,
                  amm_mode=self.amm_mode, amm_k=self.amm_k,
                  amm_period_factor=self.amm_period_factor, dtype=self.dtype,
                  elastic_grid=self.elastic_grid if i in med else 0, name=f"blocks_{i}",
                  **self.block_kwargs(i))
        for i in range(self.depth)
    ]

  def check_inputs(self, x, t, y):
    check_model_inputs(self, x, t, y)

  def __call__(self, x, t, y, train: bool = False, full_output: bool = False):
    """x (B, H, W, C) NHWC, t (B,), y (B,) int -> (B, H, W, in_channels).

    full_output: return all `out_channels` (B, H, W, 2C with learn_sigma: eps then the variance
    values, as DiT's `forward`) instead of dropping the learned-sigma half (SiT's `forward`). The
    Gaussian diffusion objective (`edit_jax.diffusion.gaussian`) calls the model this way.
    """
    t, y = jnp.asarray(t), jnp.asarray(y)
    self.check_inputs(x, t, y)
    pos = jnp.asarray(sincos_pos_embed(self.hidden_size, self.grid))
    h = constrain(self.x_embedder(x.astype(self.dtype)) + pos.astype(self.dtype))
    c = (self.t_embedder(t) + self.y_embedder(y, train)).astype(self.dtype)
    amm_set = set(self.amm_blocks) if (not train or self.amm_in_train) else set()
    for i, block in enumerate(self.blocks):
      h = block(h, c, i in amm_set)
    h = self.final_layer(h, c)
    out = self.unpatchify(h)
    if full_output:
      return out.astype(jnp.float32)
    return out[..., :self.in_channels].astype(jnp.float32)

  def unpatchify(self, h):
    return unpatchify(h, self.grid, self.patch_size, self.out_channels)

  def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Optional[int] = 3,
                       full_output: bool = False):
    """Official batch-doubled classifier-free guidance (SiT's; DiT's with `full_output=True`).

    x (2B, H, W, C) (only the first half is used, twice), t (2B,), y (2B,) = [labels, null...].
    Guidance u + s (c - u) is applied to the first `guide_channels` channels (3: the official
    behaviour, inherited from DiT; None: all channels) and placed in both halves; the other channels
    keep each half's own output. With `full_output` the output has all `out_channels` (DiT: the
    variance channels follow each half's own output; `guide_channels=None` then guides the
    `in_channels` epsilon channels only).
    """
    return batch_doubled_cfg(self, x, t, y, cfg_scale, guide_channels, full_output)

  def cache_mediator_biases(self):
    for i in self.mediator_blocks:
      self.blocks[i].attn.cache_biases()


# --------------------------------------------------------------------------- construction helpers
def parse_model_name(name: str) -> dict:
  """'SiT-XL/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
  try:
    prefix, patch = name.split("/")
    size = prefix.split("-", 1)[1]
    depth, hidden, heads = SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError, IndexError):
    raise ValueError(f"unknown model name {name!r}: expected one of {', '.join(MODEL_NAMES)}") from None
  if patch not in (2, 4, 8):
    raise ValueError(f"unknown model name {name!r}: patch size must be 2, 4 or 8")
  return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)


# Model families built on this backbone: arch name -> module class (see `register_family`).
FAMILIES: dict = {}


def register_family(arch: str, cls) -> None:
  """Makes `build_model(arch=...)` / `model_from_config` build `cls` (a SiT subclass)."""
  FAMILIES[arch] = cls


def family_of(model) -> str:
  for arch, cls in FAMILIES.items():
    if type(model) is cls:
      return arch
  raise ValueError(f"{type(model).__name__} is not a registered model family ({sorted(FAMILIES)})")


def build_model(name: str = "SiT-XL/2", arch: str = "sit", **overrides) -> SiT:
  """A SiT by name ('SiT-S/2' ... 'SiT-XL/8'), with any field overridden.

  arch: the model family ("sit", or one registered with `register_family`, e.g. "dydit");
  the size names are shared by every family.
  Example: build_model("SiT-S/2", input_size=32, mediator_num=16).
  """
  if arch not in FAMILIES:
    raise ValueError(f"unknown model arch {arch!r}: expected one of {sorted(FAMILIES)}")
  cls = FAMILIES[arch]
  kwargs = parse_model_name(name) if name else {}
  kwargs.update(overrides)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f"unknown {cls.__name__} options {sorted(unknown)}; valid: {sorted(fields)}")
  if "amm_layers" in kwargs:
    kwargs["amm_layers"] = amm_lib.parse_layers(kwargs["amm_layers"])
  model = cls(**kwargs)
  model.validate()
  return model


def model_config(model: SiT) -> dict:
  """JSON-serialisable constructor arguments of `model` (inverse: `model_from_config`).

  Families other than plain SiT add "arch" (the family name)."""
  out = {}
  for f in dataclasses.fields(type(model)):
    if f.name in ("parent", "name"):
      continue
    v = getattr(model, f.name)
    if f.name == "dtype":
      v = jnp.dtype(v).name
    elif isinstance(v, tuple):
      v = list(v)
    out[f.name] = v
  arch = family_of(model)
  if arch != "sit":
    out["arch"] = arch
  return out


def model_from_config(cfg: dict) -> SiT:
  cfg = dict(cfg)
  arch = cfg.pop("arch", "sit")
  if "dtype" in cfg and isinstance(cfg["dtype"], str):
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
  if isinstance(cfg.get("mediator_layers"), list):
    cfg["mediator_layers"] = tuple(cfg["mediator_layers"])
  if isinstance(cfg.get("amm_layers"), list):
    cfg["amm_layers"] = tuple(cfg["amm_layers"])
  return build_model(None, arch=arch, **cfg)


def dummy_inputs(model: SiT, batch: int = 1):
  x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
  return x, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)


def init_variables(model: SiT, rng, batch: int = 1):
  """Boxed variables (with nn.Partitioned logical-axis metadata), jitted."""
  return jax.jit(lambda r: model.init(r, *dummy_inputs(model, batch)))(rng)


def init_params(model: SiT, rng) -> dict:
  """Fresh parameters as a plain pytree (no metadata boxes), computed with a jitted init."""
  return jax.jit(lambda r: nn.unbox(model.init(r, *dummy_inputs(model))["params"]))(rng)


def abstract_params(model: SiT):
  """ShapeDtypeStructs of the parameters, without computing them."""
  return jax.eval_shape(lambda r: nn.unbox(model.init(r, *dummy_inputs(model))["params"]),
                        jax.random.key(0))


def param_logical_axes(model: SiT):
  """Pytree of `jax.sharding.PartitionSpec` of logical axis names, matching the params tree."""
  boxed = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model))["params"], jax.random.key(0))
  return nn.get_partition_spec(boxed)


def precompute_mediator_biases(model: SiT, params) -> dict:
  """Variables {"params": params, "mediator_cache": ...} with every layer's position biases
  resized once, so repeated forwards (a sampling loop) skip the parameter-only work."""
  if not model.mediator_blocks:
    return {"params": params}
  _, cache = model.apply({"params": params}, method=SiT.cache_mediator_biases,
                         mutable=[attn_lib.CACHE])
  return {"params": params, **cache}


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


register_family("sit", SiT)
