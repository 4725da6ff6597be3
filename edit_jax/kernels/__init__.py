"""Attention kernels, each beside its jnp reference.

  reference           the mediator-attention core in jnp/lax (ground truth for every kernel)
  mediator_pallas     the fused Pallas kernel (GPU Triton / TPU Mosaic, interpret mode on CPU),
                      `custom_vjp` backward, block sizes in `BlockSizes`; imports `reference` only
  mediator_attention  the dispatcher `mediator_attention(..., impl="xla" | "pallas")` used by the
                      model layers; imports both
"""
