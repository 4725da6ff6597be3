"""Deprecated import path, kept for one release: use `edit_jax.diffusion.samplers`.

`import edit_jax.samplers` returns the module `edit_jax.diffusion.samplers` itself (same object), so
existing code keeps working unchanged.
"""
import importlib
import sys
import warnings

warnings.warn("edit_jax.samplers moved to edit_jax.diffusion.samplers; the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("edit_jax.diffusion.samplers")
