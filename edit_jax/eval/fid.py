"""ADM-compatible evaluation suite in JAX: FID, sFID, Inception Score, precision and recall.

Inputs are `.npz` files as written by the sample scripts and the ADM reference batches:
  - `arr_0`: (N, H, W, 3) uint8 images (read in batches straight from the zip: the images never
    sit in memory all at once);
  - optional precomputed statistics `mu`, `sigma` (pool_3, 2048-d) and `mu_s`, `sigma_s`
    (mixed_6/conv, 2023-d), as in `VIRTUAL_imagenet256_labeled.npz`. When present they are used
    for FID/sFID (as the ADM evaluator does) and `arr_0` is only used for precision/recall.

What is computed is what openai/guided-diffusion `evaluations/evaluator.py` computes (see
`inception.py` for the features and `metrics.py` for the formulas): IS over the sample set
(splits of 5000), FID and sFID between streamed sample statistics and the reference statistics,
precision/recall (k=3) between all reference and all sample pool features.

CLI:
  python -m edit_jax.eval.fid --ref VIRTUAL_imagenet256_labeled.npz --sample samples.npz \\
      [--inception pt_inception-2015-12-05-6726825d.pth] [--batch-size 64] [--out metrics.json]
prints the metrics and writes them as JSON (default: `<sample>.metrics.json`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys
import zipfile
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from edit_jax.eval import inception as inception_lib
from edit_jax.eval import metrics


# ----------------------------------------------------------------------------- npz streaming
class NpzArrayStream:
  """One array of an .npz file, read in batches along axis 0 without loading it whole."""

  def __init__(self, fileobj, shape, dtype):
    self._f, self.shape, self.dtype = fileobj, tuple(shape), np.dtype(dtype)
    self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    self._next = 0

  def __len__(self):
    return self.shape[0]

  def read(self, n: int) -> np.ndarray:
    n = min(n, self.shape[0] - self._next)
    buf = self._f.read(n * self._row_bytes)
    if len(buf) != n * self._row_bytes:
      raise ValueError(f"truncated .npz member: expected {n * self._row_bytes} bytes, got {len(buf)}")
    self._next += n
    return np.frombuffer(buf, self.dtype).reshape((n,) + self.shape[1:])

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    while self._next < self.shape[0]:
      yield self.read(batch_size)


def npz_keys(path) -> list[str]:
  """Array names stored in an .npz file (without reading them)."""
  with zipfile.ZipFile(path) as z:
    return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


@contextlib.contextmanager
def open_npz_array(path, key: str = "arr_0"):
  """Context manager yielding an NpzArrayStream (or an in-memory stand-in for odd layouts)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such .npz file: {str(path)!r}")
  with zipfile.ZipFile(path) as z:
    if f"{key}.npy" not in z.namelist():
      raise KeyError(f"{path} has no array {key!r}; it holds {npz_keys(path)}. Sample files need "
                     "`arr_0` with (N, H, W, 3) uint8 images (np.savez(path, arr_0=images))")
    with z.open(f"{key}.npy") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        shape, fortran, dtype = None, True, None
      if fortran or dtype is None or dtype.hasobject:
        yield _InMemoryStream(np.load(path)[key])
      else:
        yield NpzArrayStream(f, shape, dtype)


class _InMemoryStream(NpzArrayStream):
  """Fallback for layouts that cannot be streamed (Fortran order, unknown npy versions)."""

  def __init__(self, arr: np.ndarray):
    super().__init__(None, arr.shape, arr.dtype)
    self._arr = np.ascontiguousarray(arr)

  def read(self, n: int) -> np.ndarray:
    out = self._arr[self._next:self._next + n]
    self._next += len(out)
    return out


def _check_images(batch: np.ndarray, path) -> np.ndarray:
  if batch.ndim != 4 or batch.shape[-1] != 3:
    hint = " (NCHW? transpose to NHWC)" if batch.ndim == 4 and batch.shape[1] == 3 else ""
    raise ValueError(f"{path}: arr_0 must be (N, H, W, 3) NHWC images, got per-batch shape "
                     f"{batch.shape}{hint}")
  if batch.dtype != np.uint8:
    if not np.issubdtype(batch.dtype, np.floating) or batch.min() < 0 or batch.max() <= 1.5:
      raise ValueError(f"{path}: arr_0 must be uint8 images in [0, 255] (got dtype {batch.dtype}, "
                       f"range [{batch.min()}, {batch.max()}]); convert with "
                       "np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8) for [-1, 1] data")
  return batch


# ----------------------------------------------------------------------------- activations
@dataclasses.dataclass
class Activations:
  """What one pass of the Inception network over a file yields.

  pool: (N, 2048) float32 pool_3 features (kept for precision/recall) or None.
  logits: (N, 1008) float32 IS logits or None.
  pool_stats / spatial_stats: streamed FeatureStats (FID, sFID) or None.
  """
  n: int
  pool: np.ndarray | None
  logits: np.ndarray | None
  pool_stats: metrics.FeatureStats | None
  spatial_stats: metrics.FeatureStats | None


def compute_activations(path, params, *, batch_size: int = 64, keep_pool: bool = True,
                        keep_logits: bool = True, stats: bool = True,
                        model: inception_lib.InceptionV3 = inception_lib.InceptionV3(),
                        max_images: int | None = None, progress: bool = True) -> Activations:
  """Runs the FID Inception over `arr_0` of an .npz in batches (last batch padded: one compile)."""
  pool_rs, spatial_rs = metrics.RunningStats(), metrics.RunningStats()
  pools, logits = [], []
  n = 0
  with open_npz_array(path, "arr_0") as stream:
    total = len(stream) if max_images is None else min(len(stream), max_images)
    bar = tqdm(total=total, desc=f"inception {pathlib.Path(path).name}", disable=not progress,
               file=sys.stderr)
    with bar:
      while n < total:
        batch = _check_images(stream.read(min(batch_size, total - n)), path)
        m = len(batch)
        if m < batch_size:
          batch = np.concatenate([batch, np.zeros((batch_size - m,) + batch.shape[1:], batch.dtype)])
        out = jax.device_get(inception_lib.inception_features(params, jnp.asarray(batch), model=model))
        pool = np.asarray(out["pool"][:m], np.float32)
        if stats:
          pool_rs.update(pool)
          spatial_rs.update(out["spatial"][:m])
        if keep_pool:
          pools.append(pool)
        if keep_logits:
          logits.append(np.asarray(out["logits"][:m], np.float32))
        n += m
        bar.update(m)
  if n == 0:
    raise ValueError(f"{path}: arr_0 holds no images")
  return Activations(
      n=n,
      pool=np.concatenate(pools) if keep_pool else None,
      logits=np.concatenate(logits) if keep_logits else None,
      pool_stats=pool_rs.stats() if stats else None,
      spatial_stats=spatial_rs.stats() if stats else None)


def read_reference_stats(path):
  """(pool FeatureStats, spatial FeatureStats) precomputed in an ADM reference batch, or None."""
  keys = npz_keys(path)
  if "mu" not in keys:
    return None
  missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in keys]
  if missing:
    raise KeyError(f"{path}: has `mu` but lacks {missing}; an ADM reference batch holds "
                   "mu, sigma (pool_3) and mu_s, sigma_s (mixed_6/conv)")
  with np.load(path) as z:
    return (metrics.FeatureStats(z["mu"], z["sigma"]), metrics.FeatureStats(z["mu_s"], z["sigma_s"]))


# ----------------------------------------------------------------------------- suite
def evaluate(ref_path, sample_path, *, params=None, inception_path=None, batch_size: int = 64,
             distance_dtype: str = "float16", row_batch_size: int = 4096,
             model: inception_lib.InceptionV3 = inception_lib.InceptionV3(),
             progress: bool = True) -> dict:
  """The ADM evaluator's numbers for a sample .npz against a reference .npz.

  Args:
    ref_path: reference batch (.npz with `arr_0` and/or precomputed mu/sigma/mu_s/sigma_s).
    sample_path: samples (.npz with `arr_0` (N, H, W, 3) uint8).
    params: FID Inception params; None -> loaded from `inception_path` / $EDIT_JAX_INCEPTION.
    distance_dtype: precision/recall distance precision ("float16" as ADM, or "float32").
  Returns:
    {"inception_score", "fid", "sfid", "precision", "recall", "num_samples", "num_reference"};
    precision/recall are None when the reference holds no `arr_0` images.
  """
  if params is None:
    params = inception_lib.load_inception_params(inception_path)
  ref_stats = read_reference_stats(ref_path)
  ref_has_images = "arr_0" in npz_keys(ref_path)
  if ref_stats is None and not ref_has_images:
    raise KeyError(f"{ref_path}: a reference needs `arr_0` images or precomputed mu/sigma/mu_s/sigma_s")
  ref_acts = None
  if ref_has_images:
    ref_acts = compute_activations(ref_path, params, batch_size=batch_size, keep_logits=False,
                                   stats=ref_stats is None, model=model, progress=progress)
    if ref_stats is None:
      ref_stats = (ref_acts.pool_stats, ref_acts.spatial_stats)
  sample = compute_activations(sample_path, params, batch_size=batch_size, model=model,
                               progress=progress)
  result = {
      "inception_score": metrics.inception_score(sample.logits),
      "fid": metrics.frechet_distance_stats(sample.pool_stats, ref_stats[0]),
      "sfid": metrics.frechet_distance_stats(sample.spatial_stats, ref_stats[1]),
      "precision": None,
      "recall": None,
      "num_samples": sample.n,
      "num_reference": ref_acts.n if ref_acts is not None else None,
  }
  if ref_acts is not None:
    result["precision"], result["recall"] = metrics.precision_recall(
        ref_acts.pool, sample.pool, row_batch_size=row_batch_size, distance_dtype=distance_dtype)
  return result


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m edit_jax.eval.fid", description=__doc__.split("\n")[0])
  ap.add_argument("--ref", required=True, help="reference batch .npz (arr_0 and/or mu/sigma/mu_s/sigma_s)")
  ap.add_argument("--sample", required=True, help="sample .npz with arr_0 (N, H, W, 3) uint8")
  ap.add_argument("--inception", default=None,
                  help=f"FID Inception weights ({inception_lib.WEIGHTS_FILENAME} or a converted "
                       f".safetensors/.npz); default ${inception_lib.WEIGHTS_ENV}")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--distance-dtype", choices=("float16", "float32"), default="float16",
                  help="precision/recall distances (ADM: float16 with float32 fallback)")
  ap.add_argument("--row-batch-size", type=int, default=4096)
  ap.add_argument("--out", default=None, help="JSON output (default: <sample>.metrics.json)")
  ap.add_argument("--quiet", action="store_true", help="no progress bars")
  args = ap.parse_args(argv)
  result = evaluate(args.ref, args.sample, inception_path=args.inception, batch_size=args.batch_size,
                    distance_dtype=args.distance_dtype, row_batch_size=args.row_batch_size,
                    progress=not args.quiet)
  names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
           "precision": "Precision", "recall": "Recall"}
  for k, label in names.items():
    print(f"{label}: {result[k]}")
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.sample).with_suffix(".metrics.json")
  record = dict(result, ref=str(args.ref), sample=str(args.sample))
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
