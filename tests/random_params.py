"""Random model parameters for tests, drawn on the host from the abstract shapes.

At init the adaLN-Zero gates and the final layer are zero, so a model's output (and most
gradients) would not depend on its other weights and comparisons would pass trivially: tests use
parameters with every leaf random instead. They are drawn with numpy from
`models.abstract_params` (no compiled init, no per-shape jax.random programs, which dominated
several test files' time on the CPU).
"""
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax import models


def random_params(model, seed=0, scale=0.1, *, as_jax=False, abstract=None):
  """Every leaf N(0, scale^2) from `np.random.default_rng(seed)`, in tree order, in the leaf's
  dtype. as_jax: jax arrays instead of numpy arrays. abstract: the shapes to use (default
  `models.abstract_params(model)`)."""
  rng = np.random.default_rng(seed)
  to = jnp.asarray if as_jax else np.asarray
  shapes = models.abstract_params(model) if abstract is None else abstract
  return jax.tree.map(lambda s: to(rng.normal(0, scale, s.shape).astype(s.dtype)), shapes)
