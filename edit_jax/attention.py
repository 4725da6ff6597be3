"""Deprecated import path, kept for one release: use `edit_jax.models.attention`.

`import edit_jax.attention` returns the module `edit_jax.models.attention` itself (same object), so
existing code keeps working unchanged.
"""
import importlib
import sys
import warnings

warnings.warn("edit_jax.attention moved to edit_jax.models.attention; the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("edit_jax.models.attention")
