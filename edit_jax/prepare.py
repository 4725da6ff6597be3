"""Prepare ImageNet (or any ``root/<class>/*.JPEG`` folder) as sharded SD-VAE latents for training.

    python -m edit_jax.prepare --src=/data/imagenet/train --dst=/data/in256_latents \
        --image_size=256 --vae=/weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors

Each image gets the ADM center crop (``edit_jax.data.center_crop_arr``), is encoded twice (as is and
horizontally flipped) by the SD-VAE encoder (``edit_jax.eval.vae``), and the posterior is stored:
``--store=moments`` (default) keeps mean and std, so training draws a fresh posterior sample every
time as the official code does (``vae.encode(x).latent_dist.sample() * 0.18215``); ``--store=mean``
halves the disk use and trains on the posterior mean.

Output (``dst``):
  latents-00000.npy  float16 (n, 2, h, w, 2C | C)  [flip 0 = original, 1 = flipped; mean | std]
  labels-00000.npy   int32 (n,)
  ...
  meta.json          {"shards": [{"latents", "labels", "count"}], "num_classes", "classes" (wnids),
                      "store", "scale" (0.18215, applied at training time), "image_size",
                      "latent_shape", "num_examples"}
Shards are written atomically (temp file + rename) and skipped when already present, so an
interrupted run resumes; ``--part=i --num_parts=k`` splits the shards over k machines (run once per
machine; the run that completes the set writes meta.json, or rerun any part to write it).
ImageNet 256 train: 1,281,167 images -> ~43 GB with moments (22 GB with the mean) at float16.

Train on it with ``--config.data.name=latents --config.data.path=DST`` (configs/sit.py presets).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import os
import time
from typing import Callable

import numpy as np

from edit_jax import data as data_lib

EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# encode_fn(images float32 (B, H, W, 3) in [-1, 1]) -> (mean, logvar), each (B, h, w, C), unscaled.


def list_images(src: str) -> tuple[list[str], np.ndarray, list[str]]:
  """(files, labels, class names) of ``src/<class>/*``, classes sorted (ImageFolder order)."""
  source = data_lib.ImageFolderSource(src)
  return source.files, source.labels, source.classes


def load_image(path: str, image_size: int) -> np.ndarray:
  """ADM center-cropped RGB uint8 (image_size, image_size, 3)."""
  from PIL import Image  # noqa: PLC0415
  with Image.open(path) as img:
    return data_lib.center_crop_arr(img.convert("RGB"), image_size)


def vae_encode_fn(vae_path: str | None, model=None, params=None) -> EncodeFn:
  """encode_fn from ``edit_jax.eval.vae`` (SD-VAE by default), jitted, batch split over devices."""
  import jax  # noqa: PLC0415
  from edit_jax.eval import vae  # noqa: PLC0415
  model = vae.SD_VAE if model is None else model
  params = vae.load_vae_params(vae_path, model) if params is None else params
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode))
  n_dev = jax.local_device_count()
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("b",)) if n_dev > 1 else None

  def encode(x):
    if mesh is not None and x.shape[0] % n_dev == 0:
      x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b")))
    mean, logvar = fn(params, x)
    return np.asarray(mean), np.asarray(logvar)

  return encode


def _atomic_save(path: str, arr: np.ndarray):
  tmp = path + ".tmp.npy"
  np.save(tmp, arr)
  os.replace(tmp, path)


def _shard_names(k: int) -> tuple[str, str]:
  return f"latents-{k:05d}.npy", f"labels-{k:05d}.npy"


def write_meta(dst: str, num_shards: int, counts: dict[int, int] | None, *, classes, store: str,
               image_size: int) -> bool:
  """Writes meta.json if every shard is present; returns whether it did."""
  shards = []
  for k in range(num_shards):
    lat, lab = _shard_names(k)
    if not (os.path.exists(os.path.join(dst, lat)) and os.path.exists(os.path.join(dst, lab))):
      return False
    n = counts[k] if counts and k in counts else len(np.load(os.path.join(dst, lab)))
    shards.append({"latents": lat, "labels": lab, "count": int(n)})
  first = np.load(os.path.join(dst, shards[0]["latents"]), mmap_mode="r")
  c = first.shape[-1] // (2 if store == "moments" else 1)
  meta = {"shards": shards, "num_classes": len(classes), "classes": list(classes), "store": store,
          "scale": data_lib.VAE_SCALE, "image_size": image_size,
          "latent_shape": [int(first.shape[2]), int(first.shape[3]), int(c)], "flips": 2,
          "num_examples": int(sum(s["count"] for s in shards)), "created": time.time()}
  tmp = os.path.join(dst, "meta.json.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(dst, "meta.json"))
  return True


def prepare(src: str, dst: str, *, image_size: int = 256, encode_fn: EncodeFn | None = None,
            vae_path: str | None = None, store: str = "moments", shard_size: int = 10_000,
            batch_size: int = 64, num_workers: int = 16, part: int = 0, num_parts: int = 1,
            limit: int = 0) -> dict:
  """Encodes ``src`` into ``dst`` (see module docstring). Returns {"written", "skipped", "meta"}.

  ``encode_fn``: injected encoder (tests, other VAEs); default: the SD-VAE from ``vae_path``
  (or $EDIT_JAX_VAE). ``limit``: only the first N images (smoke tests).
  """
  if store not in ("moments", "mean"):
    raise ValueError(f"store={store!r}: expected 'moments' or 'mean'")
  if image_size % 8:
    raise ValueError(f"image_size={image_size} must be a multiple of 8 (the VAE downsamples by 8)")
  if not 0 <= part < num_parts:
    raise ValueError(f"part={part} must be in [0, num_parts={num_parts})")
  files, labels, classes = list_images(src)
  if limit:
    files, labels = files[:limit], labels[:limit]
  if encode_fn is None:
    encode_fn = vae_encode_fn(vae_path)
  os.makedirs(dst, exist_ok=True)
  num_shards = math.ceil(len(files) / shard_size)
  written, skipped, counts = [], [], {}
  pool = cf.ThreadPoolExecutor(max(num_workers, 1))
  try:
    for k in range(part, num_shards, num_parts):
      lat_name, lab_name = _shard_names(k)
      lo, hi = k * shard_size, min((k + 1) * shard_size, len(files))
      if os.path.exists(os.path.join(dst, lat_name)) and os.path.exists(os.path.join(dst, lab_name)):
        skipped.append(k)
        continue
      t0 = time.time()
      out = None
      for b0 in range(lo, hi, batch_size):
        b1 = min(b0 + batch_size, hi)
        imgs = np.stack(list(pool.map(lambda f: load_image(f, image_size), files[b0:b1])))
        x = data_lib.to_unit_range(imgs)
        x = np.concatenate([x, x[:, :, ::-1]], axis=0)            # (2B, H, W, 3): both flips
        mean, logvar = encode_fn(x)
        mean, logvar = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
        if store == "moments":
          z = np.concatenate([mean, np.exp(0.5 * logvar)], axis=-1)
        else:
          z = mean
        n = b1 - b0
        z = np.stack([z[:n], z[n:]], axis=1).astype(np.float16)  # (B, 2, h, w, C')
        if out is None:
          out = np.empty((hi - lo,) + z.shape[1:], np.float16)
        out[b0 - lo:b1 - lo] = z
      _atomic_save(os.path.join(dst, lab_name), np.asarray(labels[lo:hi], np.int32))
      _atomic_save(os.path.join(dst, lat_name), out)
      counts[k] = hi - lo
      written.append(k)
      logging.info("shard %d/%d: %d images in %.1fs", k + 1, num_shards, hi - lo, time.time() - t0)
  finally:
    pool.shutdown()
  done = write_meta(dst, num_shards, counts, classes=classes, store=store, image_size=image_size)
  if not done:
    logging.info("meta.json not written yet: other parts still have shards to write")
  return {"written": written, "skipped": skipped, "meta": done, "num_shards": num_shards}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m edit_jax.prepare",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--src", required=True, help="folder with one sub-folder of images per class "
                  "(ImageNet: train/<wnid>/*.JPEG)")
  ap.add_argument("--dst", required=True, help="output folder for the latent shards")
  ap.add_argument("--image_size", type=int, default=256)
  ap.add_argument("--vae", default=None, help="SD-VAE diffusion_pytorch_model.safetensors (file or "
                  "folder); default $EDIT_JAX_VAE")
  ap.add_argument("--store", choices=("moments", "mean"), default="moments")
  ap.add_argument("--shard_size", type=int, default=10_000)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--num_workers", type=int, default=16, help="image decoding threads")
  ap.add_argument("--part", type=int, default=0)
  ap.add_argument("--num_parts", type=int, default=1)
  ap.add_argument("--limit", type=int, default=0, help="only the first N images (smoke test)")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    r = prepare(args.src, args.dst, image_size=args.image_size, vae_path=args.vae,
                store=args.store, shard_size=args.shard_size, batch_size=args.batch_size,
                num_workers=args.num_workers, part=args.part, num_parts=args.num_parts,
                limit=args.limit)
  except (data_lib.DataError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"prepare: {e}") from None
  print(json.dumps(r))


if __name__ == "__main__":
  main()
