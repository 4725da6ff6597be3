"""Dispatcher for the mediator-attention core: `mediator_attention(..., impl=...)`.

impl "xla" runs the jnp reference (`edit_jax.kernels.reference`, the ground truth), "pallas" the
fused kernel (`edit_jax.kernels.mediator_pallas`). Layouts: see `edit_jax.kernels.reference`.
This module imports the kernels; the kernel modules never import it back.
"""
from __future__ import annotations

from edit_jax.kernels.reference import mediator_attention_reference

__all__ = ["mediator_attention", "mediator_attention_reference"]


def mediator_attention(q, k, v, m, bias1, bias2, *, scale: float | None = None,
                       impl: str = "xla", **kernel_kwargs):
  """Dispatch the mediator-attention core to an implementation.

  impl: "xla" (the jnp reference above) or "pallas" (the fused kernel, when available).
  """
  if impl == "xla":
    return mediator_attention_reference(q, k, v, m, bias1, bias2, scale=scale)
  if impl == "pallas":
    # Imported on first use: pallas lowering machinery is not needed by the reference path.
    from edit_jax.kernels import mediator_pallas  # noqa: PLC0415
    return mediator_pallas.mediator_attention_pallas(q, k, v, m, bias1, bias2, scale=scale,
                                                     **kernel_kwargs)
  raise ValueError(f"unknown attention_impl {impl!r}: expected 'xla' or 'pallas'")
