"""EDT's token relation-enhanced masked training loss, for any objective.

    L = L_full + L_masked

Two forwards per step on the same x1 and the same t (spec/edt_dydit.md 1.4): the full pass, and a
masked pass of the same network (`model.apply(..., masked=True)`, masks drawn inside the model
from the "mask" rng stream) with fresh noise and its own label dropout, as the official
`train_mask_adan.py` (which calls `diffusion.training_losses` twice; the second draws new noise).
Each term is the objective's usual per-batch loss over ALL output tokens.

The objective's loss factory must have the signature of
`edit_jax.diffusion.transport.make_loss_fn`: `make_loss(apply_fn) -> loss_fn(params, x1, y, rng,
t=None) -> (loss, aux)` with `aux["t"]` the times it used and `apply_fn(params, x, t, y, train,
rngs)`. Shapes never depend on the masks, so the train step compiles once; under a sharded step the
masks follow the batch sharding of the activations.
"""
from __future__ import annotations

from typing import Callable

import jax


def default_apply(model, **model_kwargs) -> Callable:
  def apply_fn(params, x, t, y, train, rngs):
    return model.apply({"params": params}, x, t, y, train=train, rngs=rngs, **model_kwargs)
  return apply_fn


def make_masked_loss_fn(model, make_loss: Callable, **model_kwargs) -> Callable:
  """`loss_fn(params, x1, y, rng) -> (L_full + L_masked, aux)` for an EDT `model`.

  aux: the full pass's aux plus "loss_full", "loss_masked" (scalars). rng is split into the full
  pass's key, the masked pass's key (new noise, new label dropout) and the mask key.
  model_kwargs go to every model call (the Gaussian objective needs `full_output=True`).
  """
  if not hasattr(model, "uses_mid_mask"):
    raise ValueError(f"masked training needs a model with a masked forward (EDT, "
                     f"model.arch='edt'); got {type(model).__name__}")
  full = make_loss(default_apply(model, **model_kwargs))

  def loss_fn(params, x1, y, rng):
    r_full, r_masked, k_mask = jax.random.split(rng, 3)
    l_full, aux = full(params, x1, y, r_full)

    def apply_masked(p, x, t, yy, train, rngs):
      return model.apply({"params": p}, x, t, yy, train=train, masked=True,
                         rngs={**rngs, "mask": k_mask}, **model_kwargs)

    l_masked, _ = make_loss(apply_masked)(params, x1, y, r_masked, t=aux["t"])
    return l_full + l_masked, {**aux, "loss_full": l_full, "loss_masked": l_masked}

  return loss_fn
