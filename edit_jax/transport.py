"""Deprecated import path, kept for one release: use `edit_jax.diffusion.transport`.

`import edit_jax.transport` returns the module `edit_jax.diffusion.transport` itself (same object), so
existing code keeps working unchanged.
"""
import importlib
import sys
import warnings

warnings.warn("edit_jax.transport moved to edit_jax.diffusion.transport; the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("edit_jax.diffusion.transport")
