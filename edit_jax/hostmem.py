"""Host-memory allocator settings for XLA:CPU (issue 15).

Why: every execution of a compiled XLA:CPU program allocates its temporary buffer (all the
intermediate activations of a training step: 169 MB for the quickstart model at batch 32) with
``posix_memalign`` from an XLA worker thread. glibc serves a worker thread from a per-thread arena
whose heaps are capped at 64 MB, so any larger request falls back to a fresh ``mmap`` and the
``free`` at the end of the step unmaps it again. Every step then page-faults the whole buffer in,
and the kernel zeroes each page: 42,000 minor faults per quickstart step, ~1/3 of its wall time,
spread over every op (a 1 MB copy took ~1 ms inside the step against 0.1 ms alone). GPU/TPU
allocators cache device memory, so this is a CPU-runtime effect, not a model one.

The fix: one malloc arena (``M_ARENA_MAX=1``, so the buffer comes from the main heap), no mmap for
large blocks (``M_MMAP_MAX=0``) and no trimming of the heap top (``M_TRIM_THRESHOLD=-1``): the buffer
freed by one step is reused by the next, with no system calls and no page faults. It is set with
``mallopt`` and must run **before the JAX backend starts** (the XLA threads take their arenas at
start-up), so ``import edit_jax`` calls ``configure()``; the environment variables
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=9223372036854775808`` have the same effect
for any process. Cost: the process keeps its peak heap (memory freed is reused, not returned to
the OS).

Control with ``EDIT_JAX_CPU_MALLOC``: ``auto`` (default: apply when the computation will run on
the CPU: ``JAX_PLATFORMS`` is ``cpu``, or no GPU/TPU plugin is installed), ``on``, ``off``.
Only glibc Linux is affected; elsewhere ``configure`` does nothing and says so in ``status()``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys

ENV = "EDIT_JAX_CPU_MALLOC"
MODES = ("auto", "on", "off")
# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# -1: never trim (man mallopt). A finite threshold is not enough: SiT-S/2's training step at
# batch 8 frees a ~3 GB buffer, which a 2 GB threshold hands back to the kernel every step.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
ENV_EQUIVALENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                  "MALLOC_TRIM_THRESHOLD_": str(2 ** 63)}
# Modules whose presence means JAX will pick an accelerator by default.
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_pjrt", "jax_cuda13_pjrt", "jax_rocm60_pjrt",
                       "jax_rocm7_pjrt", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")

_status: dict = {"applied": False, "reason": "configure() not called"}


def status() -> dict:
  """{"applied": bool, "reason": str, "mode": str}: what `configure` did in this process."""
  return dict(_status)


def _backend_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(xb, "_backends", None))


def _env_already_set() -> bool:
  return all(os.environ.get(k) == v for k, v in ENV_EQUIVALENT.items())


def _find_spec(name: str):
  try:
    return importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None


def cpu_backend_expected() -> bool:
  """True when JAX will compute on the CPU: JAX_PLATFORMS starts with "cpu", or it is unset and
  no GPU/TPU plugin is installed. Looks only at the environment and installed packages (does not
  start the backend)."""
  plats = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if plats:
    return plats.split(",")[0] == "cpu"
  return not any(_find_spec(m) for m in ACCELERATOR_PLUGINS)


def _libc():
  if platform.system() != "Linux":
    return None
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    lib = ctypes.CDLL(name)
    lib.gnu_get_libc_version.restype = ctypes.c_char_p
    lib.gnu_get_libc_version()  # glibc only (musl has no mallopt semantics to rely on)
    return lib
  except (OSError, AttributeError):
    return None


def configure(mode: str | None = None) -> dict:
  """Applies the allocator settings (module docstring) once; returns `status()`.

  mode: "auto" | "on" | "off"; default from $EDIT_JAX_CPU_MALLOC, else "auto". Raises ValueError
  for an unknown mode. Safe to call repeatedly; a no-op once applied.
  """
  global _status
  mode = (mode or os.environ.get(ENV, "") or "auto").strip().lower()
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)} (see "
                     "edit_jax/hostmem.py)")
  if _status["applied"]:
    return status()
  if _env_already_set():  # glibc read them at process start, whatever the mode
    _status = {"applied": True, "reason": "MALLOC_* environment variables", "mode": mode}
  elif mode == "off":
    _status = {"applied": False, "reason": f"{ENV}=off", "mode": mode}
  elif mode == "auto" and not cpu_backend_expected():
    _status = {"applied": False, "reason": "an accelerator backend is expected (auto mode)",
               "mode": mode}
  elif _backend_started():
    _status = {"applied": False, "mode": mode, "reason": (
        "the JAX backend had started before edit_jax was imported; import edit_jax first or set "
        + " ".join(f"{k}={v}" for k, v in ENV_EQUIVALENT.items()))}
  elif (libc := _libc()) is None:
    _status = {"applied": False, "reason": "not glibc Linux", "mode": mode}
  else:
    ok = all(libc.mallopt(p, v) == 1 for p, v in SETTINGS)
    _status = {"applied": ok, "mode": mode,
               "reason": "mallopt" if ok else "mallopt refused a setting"}
  return status()
