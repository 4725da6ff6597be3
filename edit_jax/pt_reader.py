"""Reads PyTorch `.pt` / `.pth` files (``torch.save``'s zip format) without torch, safely.

    obj = pt_reader.load("SiT-XL-2-256x256.pt")     # dicts / lists with LazyTensor leaves
    arr = np.asarray(obj["ema"]["pos_embed"])       # reads that tensor's bytes now

``torch.save`` (torch >= 1.6) writes a zip archive: ``<name>/data.pkl`` is a pickle whose tensors
refer to raw little-endian storages ``<name>/data/<key>`` by a persistent id
``("storage", <dtype>Storage, key, location, numel)`` and are rebuilt by
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

This reader unpickles with an allow-list only: containers (dict, OrderedDict, list, tuple),
numbers/strings, ``argparse.Namespace`` (the ``args`` of official training checkpoints) and the
tensor/storage/parameter rebuild functions. Any other global (arbitrary classes or callables, the
way pickles run code) raises ``UnsafePickleError`` naming it; nothing is imported or executed.
Tensors come back as ``LazyTensor`` (shape, dtype; ``np.asarray(t)`` reads the bytes), so picking
the ``ema`` weights of a training checkpoint never reads the optimizer state.

Dtypes: float16/32/64, bfloat16 (via ml_dtypes), int8/16/32/64, uint8, bool. The pre-1.6 legacy
(tar/raw pickle) format is not supported: ``LegacyFormatError`` says how to convert the file.
"""
from __future__ import annotations

import argparse
import collections
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the allow-list (it could run code when loaded)."""


class LegacyFormatError(ValueError):
  """The file is not a zip-format torch.save archive."""


def _dtype(spec) -> np.dtype:
  if spec == "bfloat16":
    import ml_dtypes  # noqa: PLC0415 - a jax dependency
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(spec)


class _StorageType:
  """Stands for `torch.<X>Storage` inside the pickle (only its dtype is used)."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One storage record of the archive; bytes are read on first use and shared."""

  def __init__(self, archive: "_Archive", key: str, dtype: np.dtype, numel: int):
    self.archive, self.key, self.dtype, self.numel = archive, key, dtype, int(numel)
    self._array = None

  def array(self) -> np.ndarray:
    if self._array is None:
      raw = self.archive.read(f"data/{self.key}")
      a = np.frombuffer(raw, self.dtype)
      if self.archive.byteorder == ">" and self.dtype.itemsize > 1:
        a = a.byteswap()
      if a.size < self.numel:
        raise ValueError(f"{self.archive.path}: storage {self.key} holds {a.size} elements, the "
                         f"pickle expects {self.numel}: the file is truncated or corrupt")
      self._array = a
    return self._array


class LazyTensor:
  """A tensor of the archive: `shape`, `dtype`; `np.asarray(t)` reads and returns a copy (C order)."""

  def __init__(self, storage: _Storage, offset: int, shape, stride):
    self._storage, self._offset = storage, int(offset)
    self.shape, self.stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
    self.dtype = storage.dtype

  def numpy(self) -> np.ndarray:
    flat = self._storage.array()
    n = 1
    for s in self.shape:
      n *= s
    if n == 0:
      return np.zeros(self.shape, self.dtype)
    last = self._offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
    if self._offset < 0 or last >= flat.size:
      raise ValueError(f"tensor of shape {self.shape} at offset {self._offset} runs past the end "
                       f"of storage {self._storage.key} ({flat.size} elements): corrupt file")
    view = np.lib.stride_tricks.as_strided(
        flat[self._offset:], shape=self.shape,
        strides=tuple(st * flat.itemsize for st in self.stride), writeable=False)
    return np.array(view, copy=True, order="C")

  def __array__(self, dtype=None, copy=None):  # noqa: ARG002
    a = self.numpy()
    return a if dtype is None else a.astype(dtype)

  def __repr__(self):
    return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):  # noqa: ARG001
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):  # noqa: ARG001
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):  # noqa: ARG001
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("argparse", "Namespace"): argparse.Namespace,
}


class _Archive:
  def __init__(self, path: str):
    self.path = path
    self.zf = zipfile.ZipFile(path)
    names = self.zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkl:
      raise LegacyFormatError(f"{path}: zip archive without <name>/data.pkl: not a torch.save file")
    self.prefix = pkl[0][:-len("data.pkl")]
    order = f"{self.prefix}byteorder"
    self.byteorder = "<"
    if order in names and self.zf.read(order).strip() == b"big":
      self.byteorder = ">"
    self.storages: dict[str, _Storage] = {}

  def read(self, name: str) -> bytes:
    return self.zf.read(self.prefix + name)


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: _Archive):
    super().__init__(file)
    self.archive = archive

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"{self.archive.path}: the pickle refers to {module}.{name}, which this torch-free reader "
        f"does not load (only tensors, dicts/lists, numbers, strings and argparse.Namespace are "
        f"allowed, so that loading cannot run code). If you trust the file, load it with torch "
        f"and save only the state_dict (torch.save(ckpt['ema'], 'ema.pt')), or convert it to "
        f".safetensors/.npz.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.archive.path}: unexpected persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    if not isinstance(stype, _StorageType):
      raise pickle.UnpicklingError(f"{self.archive.path}: storage {key!r} has an unknown type "
                                   f"{stype!r}")
    st = self.archive.storages.get(key)
    if st is None:
      st = self.archive.storages[key] = _Storage(self.archive, key, stype.dtype, numel)
    return st


def is_zip_checkpoint(path) -> bool:
  return zipfile.is_zipfile(path)


def load(path) -> Any:
  """Unpickles a torch.save zip archive; tensors become LazyTensor (see the module docstring).

  Raises FileNotFoundError, LegacyFormatError (not a zip archive), UnsafePickleError (a global
  outside the allow-list).
  """
  path = str(path)
  if not zipfile.is_zipfile(path):
    raise LegacyFormatError(
        f"{path}: not a zip-format torch.save file (written by torch < 1.6, with "
        f"_use_new_zipfile_serialization=False, or not a PyTorch file at all). Re-save it with "
        f"a current torch (torch.save(torch.load(f), f2)) or convert it to .safetensors/.npz.")
  archive = _Archive(path)
  with archive.zf.open(archive.prefix + "data.pkl") as f:
    return _Unpickler(f, archive).load()


def to_numpy_tree(obj):
  """Materializes every LazyTensor in nested dicts/lists/tuples as np.ndarray."""
  if isinstance(obj, LazyTensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, to_numpy_tree(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_numpy_tree(v) for v in obj)
  return obj
