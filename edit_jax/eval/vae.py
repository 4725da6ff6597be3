"""SD-VAE (diffusers `AutoencoderKL`, stabilityai/sd-vae-ft-ema and -mse) in Flax linen, NHWC.

Architecture (diffusers defaults used by the SD VAEs): block_out_channels (128, 256, 512, 512),
layers_per_block 2, latent_channels 4, GroupNorm(32, eps=1e-6), SiLU, a mid block
resnet -> single-head self-attention -> resnet, 1x1 `quant_conv` / `post_quant_conv`.
Downsampling pads (right, bottom) by 1 then convolves 3x3 with stride 2; upsampling is nearest x2
then a 3x3 conv.

Layouts: images (B, H, W, 3) in [-1, 1]; latents (B, H/8, W/8, 4) (for the default 4 blocks).
Flax module names mirror the diffusers PyTorch names (`encoder.down_blocks_0.resnets_1.conv2`
<-> `encoder.down_blocks.0.resnets.1.conv2`), so `convert_vae_state_dict` is a renaming plus
layout transposes. The attention sub-modules use the newer names (`to_q`, `to_k`, `to_v`,
`to_out_0`); the legacy names (`query`, `key`, `value`, `proj_attn`) are accepted when converting.

Latent scaling (as SiT/DiT train.py and sample.py): `latents = posterior_sample * 0.18215` and
images = `clip(127.5 * decode(latents / 0.18215) + 128, 0, 255)` truncated to uint8.

Weights are read from a local `diffusion_pytorch_model.safetensors` (or `.bin`), from
https://huggingface.co/stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse); nothing is downloaded.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.eval import weights as weights_lib

SCALING_FACTOR = 0.18215
WEIGHTS_FILENAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_SOURCE = ("https://huggingface.co/stabilityai/sd-vae-ft-ema (or stabilityai/sd-vae-ft-mse; "
                  "the encoders are identical)")
WEIGHTS_ENV = "EDIT_JAX_VAE"


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv2(silu(gn2(conv1(silu(gn1(x))))))."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                             dtype=self.dtype, precision=self.precision)
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=self.eps,
                             use_fast_variance=False, dtype=self.dtype)
    h = conv(self.out_channels, name="conv1")(nn.silu(norm(name="norm1")(x)))
    h = conv(self.out_channels, name="conv2")(nn.silu(norm(name="norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, precision=self.precision,
                  name="conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention with a residual (diffusers mid-block `Attention`)."""
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    t = nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, use_fast_variance=False,
                     dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype, precision=self.precision)
    q, k, v = dense(name="to_q")(t), dense(name="to_k")(t), dense(name="to_v")(t)
    o = jax.nn.dot_product_attention(q, k, v)  # (b, hw, 1, c), scale c**-0.5
    o = dense(name="to_out_0")(o.reshape(b, h * w, c))
    return x + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    x = ResnetBlock(self.channels, name="resnets_0", **kw)(x)
    x = AttentionBlock(name="attentions_0", **kw)(x)
    return ResnetBlock(self.channels, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
  channels: int
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                   precision=self.precision, name="conv")(x)


class Upsample(nn.Module):
  channels: int
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   precision=self.precision, name="conv")(x)


class _Block(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: `num_resnets` resnets then an optional resampler."""
  channels: int
  num_resnets: int
  resample: str | None  # "down", "up" or None
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_resnets):
      x = ResnetBlock(self.channels, self.groups, self.eps, self.dtype, self.precision,
                      name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.channels, self.dtype, self.precision, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.channels, self.dtype, self.precision, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """(B, H, W, in_channels) -> (B, H/2^(n-1), W/2^(n-1), 2*latent_channels) moments."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    chans = tuple(self.block_out_channels)
    kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                precision=self.precision, name="conv_in")(x)
    for i, ch in enumerate(chans):
      last = i == len(chans) - 1
      x = _Block(ch, self.layers_per_block, None if last else "down", name=f"down_blocks_{i}",
                 **kw)(x)
    x = MidBlock(chans[-1], name="mid_block", **kw)(x)
    x = nn.silu(nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, use_fast_variance=False,
                             dtype=self.dtype, name="conv_norm_out")(x))
    return nn.Conv(2 * self.latent_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   precision=self.precision, name="conv_out")(x)


class Decoder(nn.Module):
  """(B, h, w, latent_channels) -> (B, h*2^(n-1), w*2^(n-1), out_channels)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(tuple(self.block_out_channels)))
    kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                precision=self.precision, name="conv_in")(z)
    x = MidBlock(chans[0], name="mid_block", **kw)(x)
    for i, ch in enumerate(chans):
      last = i == len(chans) - 1
      x = _Block(ch, self.layers_per_block + 1, None if last else "up", name=f"up_blocks_{i}",
                 **kw)(x)
    x = nn.silu(nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, use_fast_variance=False,
                             dtype=self.dtype, name="conv_norm_out")(x))
    return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   precision=self.precision, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL in NHWC. Defaults are the SD VAE (sd-vae-ft-ema / -mse).

  Methods (use `model.apply({"params": p}, x, method=AutoencoderKL.encode)` etc.):
    encode(x): x (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_c)
      with f = 2**(len(block_out_channels) - 1); logvar is clipped to [-30, 20] as diffusers.
    decode(z): z (B, h, w, latent_c) unscaled latents -> (B, h*f, w*f, out_channels), ~[-1, 1].
    __call__(x): decode(mean) (used for init).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  eps: float = 1e-6
  dtype: Any = None
  precision: Any = None

  def setup(self):
    kw = dict(groups=self.norm_num_groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.latent_channels, **kw)
    self.decoder = Decoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.out_channels, **kw)
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype,
                              precision=self.precision)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype,
                                   precision=self.precision)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(tuple(self.block_out_channels)) - 1)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


SD_VAE = AutoencoderKL()


def posterior_sample(mean, logvar, rng):
  """Draws z = mean + exp(logvar / 2) * N(0, 1) (diffusers DiagonalGaussianDistribution.sample)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def vae_encode(params, images, rng, model: AutoencoderKL = SD_VAE, sample: bool = True):
  """Pure, jit-friendly: images (B, H, W, 3) float in [-1, 1] -> scaled latents (B, H/8, W/8, 4).

  `sample=False` returns the posterior mean (scaled) and ignores `rng`.
  Usable inside a jitted training step (SiT train.py encodes online with a posterior sample).
  """
  mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
  z = posterior_sample(mean, logvar, rng) if sample else mean
  return z * SCALING_FACTOR


def vae_decode(params, latents, model: AutoencoderKL = SD_VAE):
  """Pure, jit-friendly: scaled latents (B, h, w, 4) -> uint8 images (B, 8h, 8w, 3).

  As the official sample scripts: x = decode(latents / 0.18215); clip(127.5 x + 128, 0, 255) and
  truncation to uint8.
  """
  x = model.apply({"params": params}, latents / SCALING_FACTOR, method=AutoencoderKL.decode)
  return to_uint8(x)


def to_uint8(x):
  """Decoder output ~[-1, 1] -> uint8 as the official scripts: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


_encode_jit = jax.jit(vae_encode, static_argnames=("model", "sample"))
_decode_jit = jax.jit(vae_decode, static_argnames=("model",))


def _images_to_model_range(images, in_channels: int) -> jnp.ndarray:
  a = images if isinstance(images, jax.Array) else np.asarray(images)
  if a.ndim != 4 or a.shape[-1] != in_channels:
    raise ValueError(f"images must be NHWC (B, H, W, {in_channels}), got shape {a.shape}; "
                     "transpose NCHW arrays with x.transpose(0, 2, 3, 1)")
  if a.dtype == np.uint8:
    return jnp.asarray(a, jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {a.dtype}")
  lo, hi = float(jnp.min(a)), float(jnp.max(a))
  if lo < -1.5 or hi > 1.5:
    raise ValueError(f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; pass "
                     "uint8 images in [0, 255] or rescale with x / 127.5 - 1")
  return jnp.asarray(a, jnp.float32)


def _check_spatial(shape, factor: int, what: str):
  if shape[1] % factor or shape[2] % factor:
    raise ValueError(f"{what} height and width must be divisible by {factor}, got {shape[1:3]}")


def _batched(fn, x, batch_size: int | None):
  """Applies fn to x in chunks of batch_size (last chunk padded: one compilation)."""
  n = x.shape[0]
  if batch_size is None or n <= batch_size:
    return fn(x)
  outs = []
  for s in range(0, n, batch_size):
    chunk = x[s:s + batch_size]
    m = chunk.shape[0]
    if m < batch_size:
      chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
    outs.append(fn(chunk)[:m])
  return jnp.concatenate(outs)


def encode_to_latents(params, images, rng, *, model: AutoencoderKL = SD_VAE, sample: bool = True,
                      batch_size: int | None = None) -> jax.Array:
  """Host-level helper: images -> scaled latents (B, H/8, W/8, 4) float32.

  Args:
    params: VAE params (e.g. from `load_vae_params`).
    images: (B, H, W, 3) NHWC, uint8 in [0, 255] or float in [-1, 1]; H, W divisible by 8.
    rng: PRNG key for the posterior sample (one key per call; chunks use folded keys).
    sample: False -> posterior mean.
    batch_size: optional chunk size (bounds memory; the last chunk is padded).
  """
  x = _images_to_model_range(images, model.in_channels)
  _check_spatial(x.shape, model.downsample_factor, "images")
  if batch_size is None or x.shape[0] <= batch_size:
    return _encode_jit(params, x, rng, model=model, sample=sample)
  counter = iter(range(1 << 30))
  return _batched(lambda c: _encode_jit(params, c, jax.random.fold_in(rng, next(counter)),
                                        model=model, sample=sample), x, batch_size)


def decode_latents(params, latents, *, model: AutoencoderKL = SD_VAE,
                   batch_size: int | None = None) -> np.ndarray:
  """Host-level helper: scaled latents (B, h, w, 4) -> uint8 images (B, 8h, 8w, 3) as numpy."""
  z = jnp.asarray(latents, jnp.float32)
  if z.ndim != 4 or z.shape[-1] != model.latent_channels:
    raise ValueError(f"latents must be NHWC (B, h, w, {model.latent_channels}), got shape "
                     f"{z.shape}; transpose NCHW latents with z.transpose(0, 2, 3, 1)")
  return np.asarray(_batched(lambda c: _decode_jit(params, c, model=model), z, batch_size))


# ----------------------------------------------------------------------------- weights
_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)"
                      r"_(\d+)$")
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_module_name(name: str) -> str:
  m = _INDEXED.match(name)
  return f"{m.group(1)}.{m.group(2)}" if m else name


def _vae_rule(path, shape):
  names, kind = weights_lib.default_leaf_rule(path, shape, _torch_module_name)
  name = names[0]
  for new, old in _LEGACY_ATTN.items():
    if f".{new}." in name:  # accept the legacy (pre-0.14 diffusers) attention names too
      names = [name, name.replace(f".{new}.", f".{old}.")]
  return names, kind


def _vae_hint(unexpected) -> str:
  if any(n.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for n in unexpected):
    return ("These look like original CompVis/LDM names (encoder.down.0.block...). Use the diffusers "
            f"checkpoint `{WEIGHTS_FILENAME}` from {WEIGHTS_SOURCE}.")
  return ""


def vae_param_shapes(model: AutoencoderKL = SD_VAE, image_size: int = 64):
  """Abstract params tree (jax.ShapeDtypeStruct leaves) of `model`, without allocating it."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def convert_vae_state_dict(state_dict, model: AutoencoderKL = SD_VAE):
  """diffusers AutoencoderKL state dict (PyTorch names/layouts) -> Flax params for `model`.

  Accepts the newer (`to_q/to_k/to_v/to_out.0`) and legacy (`query/key/value/proj_attn`)
  attention names, with linear weights stored as (O, I) or (O, I, 1, 1).
  Raises weights.StateDictMismatchError listing every missing/unexpected/mis-shaped tensor.
  """
  return weights_lib.convert_state_dict(state_dict, vae_param_shapes(model), _vae_rule,
                                        what="AutoencoderKL", hint=_vae_hint)


def load_vae_params(path=None, model: AutoencoderKL = SD_VAE):
  """Loads and converts a local diffusers VAE checkpoint (file, or a folder holding it).

  Path defaults to $EDIT_JAX_VAE. Missing file -> weights.MissingWeightsError naming
  `diffusion_pytorch_model.safetensors` and where to download it.
  """
  p = weights_lib.require_file(path, what="SD-VAE (AutoencoderKL)", filename=WEIGHTS_FILENAME,
                               source=WEIGHTS_SOURCE, env_var=WEIGHTS_ENV)
  return jax.tree.map(jnp.asarray, convert_vae_state_dict(weights_lib.load_state_dict(p), model))
