"""EDT (Chen et al., NeurIPS 2024; xinwangChen/EDT `models_edt.py`) in Flax linen.

Computes the same function as the official `EDT` (spec/edt_dydit.md section 1; parity with the
official code's tensors in tests/golden/edt). A U-shaped latent transformer with S stages (S odd;
5 in every official size): S//2 encoder stages, each followed by a 2x2 token-merging DownSample,
a bottleneck stage, then S//2 decoder stages, each preceded by a pixel-shuffle UpSample and a
ConcatLayer long skip. Layout of the official sizes (256 px, 32x32x4 latents, patch 2):

    stage      0 (enc)   1 (enc)   2 (mid)   3 (dec)   4 (dec)
    grid       16x16     8x8       4x4       8x8       16x16
    EDT-S/2    312 / 6   416 / 8   520 / 10  416 / 8   312 / 6     blocks 2,2,2,3,3
    EDT-B/2    624 / 12  832 / 16  1040 / 20 832 / 16  624 / 12    blocks 2,2,2,3,3
    EDT-XL/2   936 / 18  1248 / 24 1560 / 30 1248 / 24 936 / 18    blocks 6,4,4,7,7
                                                                    (width / heads; head dim 52)

Modules (official names, which the converter maps 1:1):
  EDT block  DiT adaLN-Zero block (LN without affine, shift/scale/gate x 2, tanh-GELU MLP) whose
             attention adds a learned BEiT/Swin 2-D relative-position bias ((2g-1)^2, heads) table
             to the logits before softmax, and multiplies the probabilities by the AMM
             (edit_jax.models.amm) in the AMM blocks at sampling time.
  DownSample 2x2 space-to-depth gather in the official order [x[0::2,0::2], x[1::2,0::2],
             x[0::2,1::2], x[1::2,1::2]] (rows, cols) concatenated on channels (4C), LN (no
             affine) on 4C, adaLN shift/scale (Linear(c -> 8C), "token information enhancement"),
             the training mask (zeroes the C-channel chunk of each masked fine token), Linear(4C ->
             C_out, no bias), + fixed sin-cos embedding of the coarse grid ("positional encoding
             supplement").
  UpSample   Linear(C_in -> 4 C_out, no bias), then pixel shuffle: channel (p1*2 + p2)*C_out + c
             of coarse token (h, w) goes to fine token (2h + p1, 2w + p2).
  ConcatLayer  cat([upsampled, skip]) (2C), LN (no affine), adaLN (Linear(c -> 4C)), Linear(2C ->
             C), + fixed sin-cos embedding. Skips: the tensors ENTERING encoder stages 0, 1, ...,
             consumed last-in first-out (stage 3 receives DownSample 1's output, stage 4 the patch
             embedding + position embedding).
  Conditioning c = t_emb + y_emb has width stage_dims[0] (= hidden_size) everywhere.

Layouts: x (B, H, W, C) NHWC, t (B,) (SiT time in [0, 1] or DDPM steps 0..999: the network only
embeds it), y (B,) int in [0, num_classes] (num_classes = null class). Returns (B, H, W,
in_channels), or all out_channels (learned sigma) with `full_output=True`. Tokens are row-major.

Masked training (token relation-enhanced masking, spec 1.4 / 4.3): `masked=True` draws, from the
"mask" rng stream, one ratio p ~ U(mask_ratios[i]) per down-sampling module i per forward and masks
every fine token independently with probability p (keep = u >= p) inside that DownSample; for
the XL layout (or `mid_mask=True`) a fraction p ~ U(mid_mask_ratio) of the stage-0 tokens entering
block `mid_mask_block` is replaced by the stage-0 sin-cos embedding. Shapes never change (masks
are data), so a masked train step compiles once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models import amm as amm_lib
from edit_jax.models import attention as attn_lib
from edit_jax.models import attention_core
from edit_jax.models import sit

Dtype = Any

# name -> (stage_depths, stage_dims, stage_heads)
SIZES = {
    "S": ((2, 2, 2, 3, 3), (312, 416, 520, 416, 312), (6, 8, 10, 8, 6)),
    "B": ((2, 2, 2, 3, 3), (624, 832, 1040, 832, 624), (12, 16, 20, 16, 12)),
    "XL": ((6, 4, 4, 7, 7), (936, 1248, 1560, 1248, 936), (18, 24, 30, 24, 18)),
}
MODEL_NAMES = tuple(f"EDT-{s}/2" for s in SIZES)

# Official AMM block lists (global block index), by stage layout (`is_local` in models_edt.py):
#   "official"      S/B (CFG <= 1.5): 7, 10; XL: 23, 25 (the released default)
#   "official_alt"  S/B for CFG >= 2: 8; XL: the commented alternative 24
#   "official_512"  EDT-S at 512 px: 10 (the official code pairs it with a 1.3 cos profile that is
#                   commented out; this port keeps the default profile)
OFFICIAL_AMM = {
    (2, 2, 2, 3, 3): {"official": (7, 10), "official_alt": (8,), "official_512": (10,)},
    (6, 4, 4, 7, 7): {"official": (23, 25), "official_alt": (24,)},
}
XL_LAYOUT = (6, 4, 4, 7, 7)


def relative_position_index(grid: int) -> np.ndarray:
  """(N, N) int32 index into a ((2g-1)^2, H) table (BEiT/Swin): token i = (ri, ci), j = (rj, cj)
  -> (ri - rj + g - 1) * (2g - 1) + (ci - cj + g - 1)."""
  r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  r, c = r.reshape(-1), c.reshape(-1)
  dr = r[:, None] - r[None, :] + grid - 1
  dc = c[:, None] - c[None, :] + grid - 1
  return (dr * (2 * grid - 1) + dc).astype(np.int32)


def space_to_depth(x):
  """(B, H, W, C) -> (B, H/2, W/2, 4C) in EDT's order [x00, x10, x01, x11] (row, col offsets)."""
  return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                         axis=-1)


def depth_to_space(x):
  """(B, h, w, 4C) -> (B, 2h, 2w, C): channel (p1*2 + p2)*C + c -> pixel (2i + p1, 2j + p2)
  (einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c', the official UpSample)."""
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


class RelativePositionBias(nn.Module):
  grid: int
  num_heads: int

  @nn.compact
  def __call__(self):
    """(H, N, N) float32 bias."""
    g, h = self.grid, self.num_heads
    trunc = nn.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
    table = self.param("relative_position_bias_table",
                       nn.with_logical_partitioning(trunc, (None, None)),
                       ((2 * g - 1) ** 2, h), jnp.float32)
    idx = relative_position_index(g)
    return jnp.take(table, jnp.asarray(idx.reshape(-1)), axis=0).reshape(g * g, g * g, h) \
        .transpose(2, 0, 1)


class EDTAttention(nn.Module):
  """Official `AttentionBlock`: qkv, softmax(q k^T / sqrt(hd) + relpos bias) [* AMM] V, proj.

  x (B, N, C) with N = grid^2 row-major -> (B, N, C). `amm` (static): None or the (N, N) matrix.
  """
  dim: int
  num_heads: int
  grid: int
  rel_pos_bias: bool = True
  amm_mode: str = "post_softmax"
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, amm: Optional[np.ndarray] = None):
    b, n, d = x.shape
    h = self.num_heads
    qkv = attn_lib.dense(3 * d, "qkv", ("embed", "qkv"), self.dtype)(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    bias = RelativePositionBias(self.grid, h, name="rel_pos_bias")()[None] \
        if self.rel_pos_bias else None
    o = amm_lib.amm_attention(q, k, v, amm, bias, self.amm_mode, self.implementation)
    attn_lib.maybe_sow_attention(self, lambda: amm_lib.attention_probs(q, k, bias, amm))
    return attn_lib.dense(d, "proj", ("heads_merged", "embed"), self.dtype)(o.reshape(b, n, d))


class EDTBlock(nn.Module):
  """adaLN-Zero block at one stage width; c has the conditioning width (stage_dims[0])."""
  width: int
  num_heads: int
  grid: int
  mlp_ratio: float = 4.0
  rel_pos_bias: bool = True
  amm_mode: str = "post_softmax"
  amm_k: float = 0.5
  amm_period_factor: float = 4.0
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, use_amm: bool = False):
    """x (B, N, width) tokens, c (B, stage_dims[0]) -> (B, N, width)."""
    x = sit.materialize_cotangent(x)  # residual-stream cotangent materialized (issue 15)
    w = self.width
    mod = attn_lib.dense(6 * w, "adaLN_modulation_1", ("embed", "adaln"), self.dtype,
                         kernel_init=nn.initializers.zeros_init())(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    m = amm_lib.modulation_matrix(self.grid, self.amm_k, self.amm_period_factor) if use_amm else None
    attn = EDTAttention(w, self.num_heads, self.grid, self.rel_pos_bias, self.amm_mode,
                        self.implementation, self.dtype, name="attn")
    x = x + gate_msa[:, None] * attn(sit.modulate(sit.layer_norm(x), shift_msa, scale_msa), m)
    mlp = sit.Mlp(int(w * self.mlp_ratio), w, dtype=self.dtype, name="mlp")
    x = x + gate_mlp[:, None] * mlp(sit.modulate(sit.layer_norm(x), shift_mlp, scale_mlp))
    return sit.constrain(x)


class DownSample(nn.Module):
  """(B, g*g, C_in) -> (B, (g/2)^2, C_out); keep: None or (B, g*g) 0/1 per fine token."""
  width_in: int
  width_out: int
  grid: int
  token_enhance: bool = True
  pos_supplement: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, keep=None):
    b, n, cin = x.shape
    g = self.grid
    x = space_to_depth(x.reshape(b, g, g, cin)).reshape(b, n // 4, 4 * cin)
    x = sit.layer_norm(x)
    if self.token_enhance:
      mod = attn_lib.dense(8 * cin, "adaLN_modulation_1", ("embed", "adaln"), self.dtype)(nn.silu(c))
      shift, scale = jnp.split(mod, 2, axis=-1)
      x = sit.modulate(x, shift, scale)
    if keep is not None:
      k4 = space_to_depth(keep.reshape(b, g, g, 1).astype(x.dtype)).reshape(b, n // 4, 4)
      x = (x.reshape(b, n // 4, 4, cin) * k4[..., None]).reshape(b, n // 4, 4 * cin)
    x = attn_lib.dense(self.width_out, "reduction", ("embed", "mlp"), self.dtype,
                       use_bias=False)(x)
    if self.pos_supplement:
      x = x + jnp.asarray(sit.sincos_pos_embed(self.width_out, g // 2), x.dtype)
    return sit.constrain(x)


class UpSample(nn.Module):
  """(B, g*g, C_in) -> (B, (2g)^2, C_out): Linear(C_in -> 4 C_out, no bias) + pixel shuffle."""
  width_out: int
  grid: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    g = self.grid
    x = attn_lib.dense(4 * self.width_out, "expand", ("embed", "mlp"), self.dtype,
                       use_bias=False)(x)
    return depth_to_space(x.reshape(b, g, g, 4 * self.width_out)).reshape(b, 4 * n,
                                                                            self.width_out)


class ConcatLayer(nn.Module):
  """cat([up, skip]) (B, N, 2C) -> (B, N, C): LN, adaLN, Linear(2C -> C), + sin-cos embedding."""
  width: int
  grid: int
  token_enhance: bool = True
  pos_supplement: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    x = sit.layer_norm(x)
    if self.token_enhance:
      mod = attn_lib.dense(4 * self.width, "adaLN_modulation_1", ("embed", "adaln"),
                           self.dtype)(nn.silu(c))
      shift, scale = jnp.split(mod, 2, axis=-1)
      x = sit.modulate(x, shift, scale)
    x = attn_lib.dense(self.width, "cat", ("embed", "mlp"), self.dtype)(x)
    if self.pos_supplement:
      x = x + jnp.asarray(sit.sincos_pos_embed(self.width, self.grid), x.dtype)
    return sit.constrain(x)


def _pairs(v) -> tuple:
  return tuple(tuple(float(a) for a in p) for p in v)


class EDT(sit.PatchGridMixin, nn.Module):
  """EDT backbone; see the module docstring for layouts and the official correspondence.

  Attributes (official constructor -> here): hidden_size = stage_dims[0]; stages_depth ->
  stage_depths; dims -> stage_dims; num_heads (per stage) -> stage_heads; local/size -> amm_layers
  (None: the official list for the official S/B or XL layouts, no AMM otherwise; "official",
  "official_alt", "official_512", "all", "none" or block indices), mid_mask (None: on for the XL
  layout, as `size="XL"`). Extras: amm_mode ("post_softmax" | "log_bias"), amm_in_train (apply AMM
  in training forwards too; the paper found it hurts), rel_pos_bias / token_enhance /
  pos_supplement (ablation switches of paper Table 4), mask_ratios (one (lo, hi) per DownSample;
  None = the official U(0.4, 0.5) then U(0.1, 0.2)),
  mid_mask_block, mid_mask_ratio, full_attention_impl, dtype, remat.
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  stage_depths: tuple = SIZES["S"][0]
  stage_dims: tuple = SIZES["S"][1]
  stage_heads: tuple = SIZES["S"][2]
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  amm_layers: Any = None
  amm_mode: str = "post_softmax"
  amm_in_train: bool = False
  amm_k: float = 0.5
  amm_period_factor: float = 4.0
  rel_pos_bias: bool = True
  token_enhance: bool = True
  pos_supplement: bool = True
  mask_ratios: Optional[tuple] = None
  mid_mask: Optional[bool] = None
  mid_mask_block: int = 4
  mid_mask_ratio: tuple = (0.15, 0.25)
  full_attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat: bool = False

  arch = "edt"

  # ------------------------------------------------------------------ derived properties
  @property
  def hidden_size(self) -> int:
    return int(self.stage_dims[0])

  @property
  def depth(self) -> int:
    return int(sum(self.stage_depths))

  @property
  def num_stages(self) -> int:
    return len(self.stage_depths)

  @property
  def num_down(self) -> int:
    return self.num_stages // 2

  @property
  def num_heads(self) -> tuple:
    return tuple(int(h) for h in self.stage_heads)

  @property
  def mediator_num(self) -> int:
    return 0

  @property
  def mediator_blocks(self) -> tuple:
    return ()

  @property
  def stage_grids(self) -> tuple[int, ...]:
    """Token grid side of each stage (e.g. 16, 8, 4, 8, 16)."""
    g, out = self.grid, []
    for s in range(self.num_stages):
      out.append(g)
      if s < self.num_down:
        g //= 2
      elif s < self.num_stages - 1:
        g *= 2
    return tuple(out)

  @property
  def block_stages(self) -> tuple[int, ...]:
    return tuple(s for s, n in enumerate(self.stage_depths) for _ in range(n))

  @property
  def block_grids(self) -> tuple[int, ...]:
    return tuple(self.stage_grids[s] for s in self.block_stages)

  @property
  def amm_blocks(self) -> tuple[int, ...]:
    """Global indices of the blocks that apply AMM at sampling time."""
    spec = amm_lib.parse_layers(self.amm_layers)
    layout = tuple(int(v) for v in self.stage_depths)
    if spec is None:
      return OFFICIAL_AMM.get(layout, {}).get("official", ())
    if spec == "all":
      return tuple(range(self.depth))
    if isinstance(spec, str):
      lists = OFFICIAL_AMM.get(layout)
      if lists is None or spec not in lists:
        known = ", ".join(f"{k} for {list(v)}" for k, v in OFFICIAL_AMM.items())
        raise ValueError(f"amm_layers={spec!r} is defined only for the official stage layouts "
                         f"({known}); this model has stage_depths={list(layout)}: give block "
                         f"indices instead, e.g. amm_layers='{self.depth - 2}'")
      return lists[spec]
    return amm_lib.check_indices(spec, self.depth)

  @property
  def mask_ratio_pairs(self) -> tuple:
    """(lo, hi) of the masking ratio per DownSample; None = official: U(0.4, 0.5) in the first,
    U(0.1, 0.2) in every later one (the official forward resets the range after the first)."""
    if self.mask_ratios is None:
      return (((0.4, 0.5),) + ((0.1, 0.2),) * (self.num_down - 1)) if self.num_down else ()
    return _pairs(self.mask_ratios)

  @property
  def uses_mid_mask(self) -> bool:
    if self.mid_mask is None:
      return tuple(int(v) for v in self.stage_depths) == XL_LAYOUT
    return bool(self.mid_mask)

  def validate(self):
    """Raises ValueError naming the bad value and the fix."""
    attention_core.check_implementation(self.full_attention_impl)
    s = len(self.stage_depths)
    if s < 1 or s % 2 == 0:
      raise ValueError(f"stage_depths={list(self.stage_depths)}: EDT needs an odd number of stages "
                       f"(encoder stages, a bottleneck, as many decoder stages), e.g. [2,2,2,3,3]")
    if len(self.stage_dims) != s or len(self.stage_heads) != s:
      raise ValueError(f"stage_dims ({len(self.stage_dims)}) and stage_heads "
                       f"({len(self.stage_heads)}) need one entry per stage ({s})")
    if any(int(n) < 1 for n in self.stage_depths):
      raise ValueError(f"stage_depths={list(self.stage_depths)}: every stage needs >= 1 block")
    for i in range(s // 2):
      if self.stage_dims[i] != self.stage_dims[s - 1 - i]:
        raise ValueError(
            f"stage_dims={list(self.stage_dims)}: decoder stage {s - 1 - i} must have the width of "
            f"encoder stage {i} ({self.stage_dims[i]}) because it is concatenated with its skip")
    for i, (d, h) in enumerate(zip(self.stage_dims, self.stage_heads)):
      if d % 4:
        raise ValueError(f"stage_dims[{i}]={d} must be divisible by 4 (2-D sin-cos embedding)")
      if h < 1 or d % h:
        raise ValueError(f"stage_dims[{i}]={d} is not divisible by stage_heads[{i}]={h}")
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size={self.input_size} is not divisible by patch_size="
                       f"{self.patch_size}")
    div = 2 ** (s // 2)
    if self.grid % div or self.grid < div:
      raise ValueError(
          f"token grid {self.grid} (input_size {self.input_size} / patch {self.patch_size}) must "
          f"be a multiple of {div} for {s // 2} 2x2 down-samplings: change input_size or the "
          f"number of stages")
    if self.num_classes < 1:
      raise ValueError(f"num_classes={self.num_classes} must be >= 1")
    amm_lib.check_mode(self.amm_mode)
    self.amm_blocks  # noqa: B018  (validates amm_layers)
    ratios = self.mask_ratio_pairs
    if len(ratios) != s // 2:
      raise ValueError(f"mask_ratios={ratios}: need one (lo, hi) pair per down-sampling module "
                       f"({s // 2})")
    for lo, hi in ratios + (tuple(float(v) for v in self.mid_mask_ratio),):
      if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"mask ratio range ({lo}, {hi}) must satisfy 0 <= lo <= hi < 1")
    if self.uses_mid_mask and not 0 <= self.mid_mask_block < self.stage_depths[0]:
      raise ValueError(f"mid_mask_block={self.mid_mask_block} must index a block of stage 0 "
                       f"(0..{self.stage_depths[0] - 1}); set mid_mask=False to disable it")

  # ------------------------------------------------------------------ modules
  def setup(self):
    self.validate()
    d0 = self.hidden_size
    self.setup_io_layers(d0)
    block_cls = nn.remat(EDTBlock, static_argnums=(3,)) if self.remat else EDTBlock
    grids, stages = self.block_grids, self.block_stages
    self.blocks = [
        block_cls(int(self.stage_dims[stages[i]]), int(self.stage_heads[stages[i]]), grids[i],
                  self.mlp_ratio, self.rel_pos_bias, self.amm_mode, self.amm_k,
                  self.amm_period_factor, self.full_attention_impl, self.dtype, name=f"blocks_{i}")
        for i in range(self.depth)]
    sg = self.stage_grids
    self.down_blocks = [
        DownSample(int(self.stage_dims[s]), int(self.stage_dims[s + 1]), sg[s], self.token_enhance,
                   self.pos_supplement, self.dtype, name=f"down_blocks_{s}")
        for s in range(self.num_down)]
    ups, cats = [], []
    for j, s in enumerate(range(self.num_down + 1, self.num_stages)):
      ups.append(UpSample(int(self.stage_dims[s]), sg[s - 1], self.dtype, name=f"up_blocks_{j}"))
      cats.append(ConcatLayer(int(self.stage_dims[s]), sg[s], self.token_enhance,
                              self.pos_supplement, self.dtype, name=f"concat_blocks_{j}"))
    self.up_blocks, self.concat_blocks = ups, cats

  def check_inputs(self, x, t, y):
    sit.check_model_inputs(self, x, t, y)

  def __call__(self, x, t, y, train: bool = False, masked: bool = False,
               full_output: bool = False):
    """x (B, H, W, C) NHWC, t (B,), y (B,) int -> (B, H, W, in_channels [or out_channels]).

    masked=True runs EDT's masked forward (needs the "mask" rng stream); train=True enables label
    dropout (rng "label_dropout") and turns AMM off unless amm_in_train.
    """
    t, y = jnp.asarray(t), jnp.asarray(y)
    self.check_inputs(x, t, y)
    pos0 = jnp.asarray(sit.sincos_pos_embed(self.hidden_size, self.grid))
    h = sit.constrain(self.x_embedder(x.astype(self.dtype)) + pos0.astype(self.dtype))
    c = (self.t_embedder(t) + self.y_embedder(y, train)).astype(self.dtype)
    amm_on = (not train) or self.amm_in_train
    amm_set = set(self.amm_blocks) if amm_on else set()
    b = x.shape[0]
    if masked:
      rng = self.make_rng("mask")
      k_mid, k_down = jax.random.split(rng)
    skips = []
    depth = 0
    for s in range(self.num_stages):
      if s < self.num_down:
        skips.append(h)
      if s > self.num_down:
        j = s - self.num_down - 1
        h = self.up_blocks[j](h)
        h = self.concat_blocks[j](jnp.concatenate([h, skips.pop()], axis=-1), c)
      for j in range(self.stage_depths[s]):
        if masked and s == 0 and self.uses_mid_mask and j == self.mid_mask_block:
          keep = random_keep(k_mid, (b, h.shape[1]), self.mid_mask_ratio)[..., None].astype(h.dtype)
          h = h * keep + (1 - keep) * pos0.astype(h.dtype)
        h = self.blocks[depth](h, c, depth in amm_set)
        depth += 1
      if s < self.num_down:
        keep = None
        if masked:
          keep = random_keep(jax.random.fold_in(k_down, s), (b, h.shape[1]),
                             self.mask_ratio_pairs[s])
        h = self.down_blocks[s](h, c, keep)
    h = self.final_layer(h, c)
    out = sit.unpatchify(h, self.grid, self.patch_size, self.out_channels)
    if not full_output:
      out = out[..., :self.in_channels]
    return out.astype(jnp.float32)

  def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Optional[int] = 3,
                       full_output: bool = True):
    """Official batch-doubled CFG (as SiT.forward_with_cfg). x (2B, H, W, C) (the first half is
    used twice), t (2B,), y (2B,) = [labels, null...]; guidance on the first `guide_channels`
    channels (3: official; None: the in_channels epsilon channels), placed in both halves.
    Returns all out_channels by default, as the official EDT.forward_with_cfg."""
    return sit.batch_doubled_cfg(self, x, t, y, cfg_scale, guide_channels, full_output)


def random_keep(rng, shape, ratio):
  """0/1 float32 keep mask: p ~ U(ratio) once (shared by the batch, as the official
  `random.uniform`), then keep = u >= p for u ~ U[0, 1) per token (masked with probability p)."""
  k_p, k_u = jax.random.split(rng)
  lo, hi = float(ratio[0]), float(ratio[1])
  p = jax.random.uniform(k_p, (), jnp.float32, lo, hi)
  return (jax.random.uniform(k_u, shape, jnp.float32) >= p).astype(jnp.float32)


# --------------------------------------------------------------------------- construction helpers
def parse_model_name(name: str) -> dict:
  """'EDT-S/2' -> dict(stage_depths=..., stage_dims=..., stage_heads=..., patch_size=2)."""
  try:
    prefix, patch = name.split("/")
    size = prefix.split("-", 1)[1]
    depths, dims, heads = SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError, IndexError):
    raise ValueError(f"unknown model name {name!r}: expected one of {', '.join(MODEL_NAMES)}") \
        from None
  if patch not in (1, 2, 4):
    raise ValueError(f"unknown model name {name!r}: patch size must be 1, 2 or 4")
  return dict(stage_depths=depths, stage_dims=dims, stage_heads=heads, patch_size=patch)


_TUPLE_FIELDS = ("stage_depths", "stage_dims", "stage_heads", "mid_mask_ratio")


def _normalise(kwargs: dict) -> dict:
  out = dict(kwargs)
  for k in _TUPLE_FIELDS:
    if k in out and out[k] is not None and not isinstance(out[k], tuple):
      out[k] = tuple(out[k])
  for k in ("stage_depths", "stage_dims", "stage_heads"):
    if k in out:
      out[k] = tuple(int(v) for v in out[k])
  if out.get("mask_ratios") is not None:
    out["mask_ratios"] = _pairs(out["mask_ratios"])
  if "mid_mask_ratio" in out:
    out["mid_mask_ratio"] = tuple(float(v) for v in out["mid_mask_ratio"])
  if "amm_layers" in out:
    spec = amm_lib.parse_layers(out["amm_layers"])
    out["amm_layers"] = spec
  if isinstance(out.get("dtype"), str):
    out["dtype"] = jnp.dtype(out["dtype"])
  return out


def build_model(name: Optional[str] = "EDT-S/2", **overrides) -> EDT:
  """An EDT by name ('EDT-S/2', 'EDT-B/2', 'EDT-XL/2'), with any field overridden.

  Example: build_model("EDT-S/2", input_size=32, amm_layers="none").
  """
  kwargs = parse_model_name(name) if name else {}
  kwargs.update(overrides)
  kwargs.pop("arch", None)
  fields = {f.name for f in dataclasses.fields(EDT)} - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f"unknown EDT options {sorted(unknown)}; valid: {sorted(fields)}")
  model = EDT(**_normalise(kwargs))
  model.validate()
  return model


def model_config(model: EDT) -> dict:
  """JSON-serialisable constructor arguments (with "arch": "edt"); inverse: `model_from_config`."""
  out = {"arch": "edt"}
  for f in dataclasses.fields(EDT):
    if f.name in ("parent", "name"):
      continue
    v = getattr(model, f.name)
    if f.name == "dtype":
      v = jnp.dtype(v).name
    elif f.name == "mask_ratios" and v is not None:
      v = [list(p) for p in v]
    elif isinstance(v, tuple):
      v = list(v)
    out[f.name] = v
  return out


def model_from_config(cfg: dict) -> EDT:
  cfg = dict(cfg)
  cfg.pop("arch", None)
  return build_model(None, **cfg)
