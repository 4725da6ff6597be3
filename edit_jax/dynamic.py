"""Deprecated import path, kept for one release: use `edit_jax.diffusion.dynamic`.

`import edit_jax.dynamic` returns the module `edit_jax.diffusion.dynamic` itself (same object), so
existing code keeps working unchanged.
"""
import importlib
import sys
import warnings

warnings.warn("edit_jax.dynamic moved to edit_jax.diffusion.dynamic; the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("edit_jax.diffusion.dynamic")
