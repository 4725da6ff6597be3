"""Loading local PyTorch weight files and converting PyTorch-named state dicts to Flax params.

Used by `edit_jax.eval.vae` (diffusers AutoencoderKL) and `edit_jax.eval.inception` (pytorch-fid
InceptionV3). Nothing is downloaded: a missing file raises `MissingWeightsError` naming the file
and where to get it.

File formats read by `load_state_dict`:
  - `.safetensors` (safetensors.numpy, no torch needed),
  - `.npz` (one array per PyTorch parameter name),
  - `.bin` / `.pth` / `.pt` (a torch.save state dict), read without torch by `edit_jax.pt_reader`
    (allow-listed unpickling, nothing is executed); only torch's pre-1.6 format needs torch (or a
    one-off `python -m edit_jax.eval.weights SRC.pth DST.safetensors` where torch is installed).

Conversion (`convert_state_dict`): the Flax module tree mirrors the PyTorch module names, so each
Flax leaf maps to one PyTorch name. Layout changes:
  conv kernel  (O, I, kh, kw) -> (kh, kw, I, O)      (NCHW conv -> NHWC conv)
  dense kernel (O, I)         -> (I, O)   ((O, I, 1, 1) is accepted too: 1x1-conv-stored linears)
  norm weight -> `scale`; vectors unchanged.
All problems (missing, unexpected, mis-shaped tensors) are collected and raised together.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util

PathLike = str | os.PathLike


class MissingWeightsError(FileNotFoundError):
  """A required local weight file is absent (nothing is ever downloaded)."""


class StateDictMismatchError(ValueError):
  """A state dict does not match the model: lists every missing/unexpected/mis-shaped tensor."""

  def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str],
               misshaped: Sequence[str], hint: str = ""):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f"{what}: the state dict does not match the model "
             f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
             f"{len(self.misshaped)} mis-shaped tensors)."]
    if self.missing:
      lines.append("missing:\n  " + "\n  ".join(self.missing))
    if self.unexpected:
      lines.append("unexpected:\n  " + "\n  ".join(self.unexpected))
    if self.misshaped:
      lines.append("mis-shaped (name: got -> expected, PyTorch layout):\n  " + "\n  ".join(self.misshaped))
    if hint:
      lines.append(hint)
    super().__init__("\n".join(lines))


def require_file(path: PathLike | None, *, what: str, filename: str, source: str,
                 env_var: str | None = None) -> pathlib.Path:
  """Returns `path` as a Path, or raises MissingWeightsError saying which file to provide and where.

  Args:
    path: user-given path (None: use `$env_var` if set).
    what: human name of the weights ("SD-VAE", "FID InceptionV3").
    filename: the file the user must provide (e.g. "diffusion_pytorch_model.safetensors").
    source: where to get it (a URL or a hub repo name).
    env_var: optional environment variable naming the default path.
  """
  if path is None and env_var:
    path = os.environ.get(env_var)
  how = (f"Download `{filename}` from {source} (this code never downloads), then pass its path"
         + (f" or set ${env_var}" if env_var else "") + ".")
  if path is None:
    raise MissingWeightsError(f"{what} weights: no file given. {how}")
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    p = p / filename
  if not p.is_file():
    raise MissingWeightsError(f"{what} weights not found at {str(p)!r}. {how}")
  return p


def _load_torch_pickle(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A torch.save state dict, read without torch (edit_jax.pt_reader: allow-listed unpickling);
  files in torch's pre-1.6 format need torch (used when installed) or a one-off conversion."""
  from edit_jax import pt_reader  # pylint: disable=import-outside-toplevel
  try:
    obj = pt_reader.load(path)
  except pt_reader.LegacyFormatError as e:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(
          f"{path.name!r} is a pickled PyTorch file in torch's old (pre-1.6) format, which needs "
          f"torch to read ({e}). Either install torch, or convert it once on a machine that has "
          f"torch:\n  python -m edit_jax.eval.weights {path} {path.with_suffix('.safetensors')}\n"
          f"and pass the .safetensors file instead.") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):  # torch tensor
      out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    elif isinstance(v, (pt_reader.LazyTensor, np.ndarray)):
      a = np.asarray(v)
      out[k] = a.astype(np.float32) if a.dtype.name == "bfloat16" else a
  return out


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict {PyTorch name: array} from .safetensors, .npz or a torch.save .bin/.pth/.pt.

  Floating arrays are returned as float32 (fp16/bf16 checkpoints are upcast).
  """
  p = pathlib.Path(path)
  suffix = p.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      sd = load_file(str(p))
    except TypeError as e:  # bf16 is not a numpy dtype
      raise ValueError(f"{p}: could not read with safetensors.numpy ({e}); bf16 files need "
                       "converting to float32/float16 first") from e
  elif suffix == ".npz":
    with np.load(p, allow_pickle=False) as z:
      sd = {k: z[k] for k in z.files}
  elif suffix in (".bin", ".pth", ".pt", ".ckpt"):
    sd = _load_torch_pickle(p)
  else:
    raise ValueError(f"{p}: unknown weight file type {suffix!r}; use .safetensors, .npz, "
                     ".bin/.pth/.pt")
  return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in sd.items()}


def _to_flax(kind: str, arr: np.ndarray) -> np.ndarray:
  if kind == "conv":  # (O, I, kh, kw) -> (kh, kw, I, O)
    return np.transpose(arr, (2, 3, 1, 0)) if arr.ndim == 4 else arr
  if kind == "linear":  # (O, I) -> (I, O); (O, I, 1, 1) accepted
    if arr.ndim == 4 and arr.shape[2:] == (1, 1):
      arr = arr[:, :, 0, 0]
    return arr.T if arr.ndim == 2 else arr
  return arr


def _torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "conv" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if kind == "linear" and len(flax_shape) == 2:
    return flax_shape[::-1]
  return tuple(flax_shape)


# A rule maps a Flax param path (tuple of names) to (candidate PyTorch names, kind). The first
# candidate is the canonical name; later ones are accepted aliases (e.g. legacy diffusers names).
Rule = Callable[[tuple[str, ...], tuple[int, ...]], tuple[Sequence[str], str]]


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected_params, rule: Rule, *,
                       what: str, ignore: Callable[[str], bool] = lambda name: False,
                       hint: Callable[[Iterable[str]], str] = lambda names: ""):
  """Converts a PyTorch-named state dict into a Flax params tree shaped like `expected_params`.

  Args:
    state_dict: {PyTorch name: array} in PyTorch layouts.
    expected_params: a params pytree (arrays or jax.ShapeDtypeStruct, e.g. from jax.eval_shape)
      giving the Flax paths and shapes.
    rule: Flax path, Flax shape -> (candidate PyTorch names, kind in {"conv","linear","vector"}).
    what: model name used in error messages.
    ignore: PyTorch names that may be present but are not used (e.g. BN `num_batches_tracked`).
    hint: extra text for the error, given the unexpected names.

  Returns:
    Nested dict of float32 numpy arrays with the structure of `expected_params`.

  Raises:
    StateDictMismatchError listing every missing, unexpected and mis-shaped tensor.
  """
  flat = traverse_util.flatten_dict(expected_params)
  out, used = {}, set()
  missing, misshaped = [], []
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    names, kind = rule(path, shape)
    found = next((n for n in names if n in state_dict), None)
    if found is None:
      alias = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
      missing.append(f"{names[0]}{alias} {_torch_shape(kind, shape)}")
      continue
    used.add(found)
    arr = _to_flax(kind, np.asarray(state_dict[found]))
    if tuple(arr.shape) != shape:
      misshaped.append(f"{found}: {tuple(np.shape(state_dict[found]))} -> {_torch_shape(kind, shape)}")
      continue
    out[path] = np.asarray(arr, dtype=np.float32)
  unexpected = sorted(n for n in state_dict if n not in used and not ignore(n))
  if missing or unexpected or misshaped:
    raise StateDictMismatchError(what, missing, unexpected, misshaped, hint(unexpected))
  return traverse_util.unflatten_dict(out)


def default_leaf_rule(path: tuple[str, ...], shape: tuple[int, ...],
                      module_name: Callable[[str], str] = lambda s: s) -> tuple[list[str], str]:
  """Flax leaf naming -> PyTorch naming shared by the eval models.

  `kernel` -> `weight` (conv if 4-D, linear if 2-D), `scale` -> `weight`, `mean` ->
  `running_mean`, `var` -> `running_var`, anything else unchanged. `module_name` maps each module
  path component (e.g. "down_blocks_0" -> "down_blocks.0").
  """
  leaf = path[-1]
  prefix = ".".join(module_name(p) for p in path[:-1])
  if leaf == "kernel":
    kind, tname = ("conv" if len(shape) == 4 else "linear"), "weight"
  else:
    kind = "vector"
    tname = {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
  return [f"{prefix}.{tname}" if prefix else tname], kind


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: convert a pickled PyTorch state dict to .safetensors or .npz."""
  import argparse  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(
      prog="python -m edit_jax.eval.weights",
      description="Convert a PyTorch state dict (.pth/.bin) to .safetensors or .npz (zip-format "
                  "files are read without torch; torch's pre-1.6 format needs torch).")
  ap.add_argument("src")
  ap.add_argument("dst", help="output path ending in .safetensors or .npz")
  args = ap.parse_args(argv)
  sd = load_state_dict(args.src)
  dst = pathlib.Path(args.dst)
  if dst.suffix == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(dst))
  elif dst.suffix == ".npz":
    np.savez(dst, **sd)
  else:
    raise SystemExit(f"dst must end in .safetensors or .npz, got {dst}")
  print(f"wrote {len(sd)} tensors to {dst}")


if __name__ == "__main__":
  main()
