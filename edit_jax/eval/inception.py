"""The FID InceptionV3 network (TF `inception-2015-12-05`, as ported by pytorch-fid) in Flax, NHWC.

This is the graph that the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`,
`classify_image_graph_def.pb`) and pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`) use.
`InceptionV3.__call__(images)` takes images (B, H, W, 3), float or uint8 values in [0, 255], and
mirrors the TF graph:
  1. resize to 299x299 with TF1's legacy bilinear resize (align_corners=False,
     half_pixel_centers=False: source coordinate = dst * in/out), as the graph's `ResizeBilinear`;
  2. normalise (x - 128) / 128 (the graph's `Sub`/`Mul`; pytorch-fid uses 2*x/255 - 1 instead);
  3. torchvision's Inception3 layout with pytorch-fid's FID patches: the branch average pools of
     Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude padding (count_include_pad=False) and Mixed_7c's
     branch pool is a 3x3 max pool; BatchNorm eps 1e-3; no aux classifier.
Outputs (dict):
  "pool":    (B, 2048) `pool_3` features (global average pool of Mixed_7c) -> FID, precision/recall.
  "spatial": (B, 2023) sFID features: the ADM evaluator's `mixed_6/conv:0[..., :7]`, i.e. the
             post-ReLU output of the 1x1 branch of the third 17x17 block (TF `mixed_6` = torchvision
             `Mixed_6d.branch1x1`), (B, 17, 17, 192), first 7 channels, flattened in (h, w, c)
             order (TF's NHWC reshape) -> 17*17*7 = 2023.
  "logits":  (B, 1008) `pool @ W` with W the softmax layer's weight and *no bias*, as the ADM
             evaluator (which takes `softmax/logits/MatMul`'s weight only) -> Inception Score.

Weights: a local pytorch-fid state dict (`pt_inception-2015-12-05-6726825d.pth`, torchvision
Inception3 names: `Conv2d_1a_3x3.conv.weight`, `Mixed_6d.branch7x7_2.bn.running_var`, `fc.weight`
...). `.pth` files in torch's zip format are read without torch (`edit_jax.pt_reader`); the
pre-1.6 format needs torch or a one-off `python -m edit_jax.eval.weights` conversion. Nothing is
downloaded.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.eval import weights as weights_lib

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SOURCE = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth (convert it to .safetensors on a machine with "
                  "torch: python -m edit_jax.eval.weights SRC.pth DST.safetensors)")
WEIGHTS_ENV = "EDIT_JAX_INCEPTION"
RESIZE_TO = 299
SPATIAL_CHANNELS = 7
NUM_CLASSES = 1008
_HIGHEST = jax.lax.Precision.HIGHEST


def tf_legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of TF1 `ResizeBilinear` (align_corners=False, no half-pixel).

  Output pixel i samples the input at s = i * in_size / out_size, interpolating linearly between
  floor(s) and min(floor(s) + 1, in_size - 1).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def tf_legacy_resize(images, size: int):
  """(B, H, W, C) -> (B, size, size, C) with TF1 legacy bilinear resize (exact copy if same size)."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if h != size:
    x = jnp.einsum("oh,bhwc->bowc", tf_legacy_bilinear_matrix(h, size), x, precision=_HIGHEST)
  if w != size:
    x = jnp.einsum("pw,bowc->bopc", tf_legacy_bilinear_matrix(w, size), x, precision=_HIGHEST)
  return x


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm with PyTorch-named statistics kept as params (scale, bias, mean, var)."""
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
  """torchvision BasicConv2d: conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""
  features: int
  kernel: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block. Returns (output, branch1x1 output) so sFID can read `Mixed_6d.branch1x1`."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block; `max_pool=True` is pytorch-fid's FIDInceptionE_2 (Mixed_7c)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3. images (B, H, W, 3) in [0, 255] -> {"pool", "spatial", "logits"} (see top).

  resize_to: 299 as the TF graph; None skips resizing (tests use small inputs; the network needs
    H, W >= 75). With other input sizes "spatial" has (H'*W'*7) features.
  """
  resize_to: int | None = RESIZE_TO
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    if self.resize_to is not None:
      x = tf_legacy_resize(x, self.resize_to)
    x = (x - 128.0) * (1.0 / 128.0)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    kernel = self.param("fc_kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes))
    self.param("fc_bias", nn.initializers.zeros, (self.num_classes,))  # loaded, unused (as ADM)
    logits = jnp.dot(pool, kernel, precision=_HIGHEST)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
    return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1), "logits": logits}


# ----------------------------------------------------------------------------- weights
def _inception_rule(path, shape):
  if path == ("fc_kernel",):
    return ["fc.weight"], "linear"
  if path == ("fc_bias",):
    return ["fc.bias"], "vector"
  return weights_lib.default_leaf_rule(path, shape)


def inception_param_shapes(model: InceptionV3 | None = None):
  """Abstract params tree (jax.ShapeDtypeStruct leaves), computed without allocating weights."""
  model = model or InceptionV3(resize_to=None)
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def convert_inception_state_dict(state_dict, model: InceptionV3 | None = None):
  """pytorch-fid FID Inception state dict (torchvision names, NCHW) -> Flax params.

  `*.num_batches_tracked` entries are ignored. Raises weights.StateDictMismatchError listing every
  missing/unexpected/mis-shaped tensor.
  """
  def hint(unexpected):
    if any(n.startswith("AuxLogits.") for n in unexpected):
      return ("AuxLogits.* tensors: this is torchvision's ImageNet Inception, not the FID Inception "
              f"network; use `{WEIGHTS_FILENAME}`.")
    return ""
  return weights_lib.convert_state_dict(
      state_dict, inception_param_shapes(model), _inception_rule, what="FID InceptionV3",
      ignore=lambda n: n.endswith("num_batches_tracked"), hint=hint)


def load_inception_params(path=None):
  """Loads and converts a local FID Inception state dict (.pth, .safetensors, .npz).

  Path defaults to $EDIT_JAX_INCEPTION. Missing -> weights.MissingWeightsError naming the file.
  """
  p = weights_lib.require_file(path, what="FID InceptionV3", filename=WEIGHTS_FILENAME,
                               source=WEIGHTS_SOURCE, env_var=WEIGHTS_ENV)
  return jax.tree.map(jnp.asarray, convert_inception_state_dict(weights_lib.load_state_dict(p)))


@functools.partial(jax.jit, static_argnames=("model",))
def inception_features(params, images, model: InceptionV3 = InceptionV3()):
  """Jitted forward: images (B, H, W, 3) uint8/float in [0, 255] -> {"pool","spatial","logits"}."""
  return model.apply({"params": params}, images)
