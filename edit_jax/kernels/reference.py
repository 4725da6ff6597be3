"""Mediator-attention core: the jnp reference (ground truth for every kernel).

Imported by the kernels (`mediator_pallas`) and by the dispatcher (`mediator_attention`); it imports
neither.

Layouts (all "BTNH", the layout of `jax.nn.dot_product_attention`):
  q, k, v : (B, N, h, hd)   queries, keys, values; N tokens, h heads, head dim hd.
  m       : (B, n, h, hd)   mediators (average-pooled queries), n mediators.
  bias1   : (h, n, N)       mediator -> key position bias (stage 1).
  bias2   : (h, N, n)       query -> mediator position bias (stage 2).
  returns : (B, N, h, hd)

  stage 1: A1 = softmax_N(scale * m k^T + bias1),  V_M = A1 v        (B, h, n, hd)
  stage 2: A2 = softmax_n(scale * q m^T + bias2),  O   = A2 V_M      (B, N, h, hd)

This matches LeapLabTHU/Attention-Mediators `AttentionWithMediators.forward` steps 6-8
(see spec/sit_mediators.md section 3). The depthwise-conv term and the output projection
are not part of the core.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mediator_attention_reference(q, k, v, m, bias1, bias2, *, scale: float | None = None):
  """Two-stage mediator attention in plain jnp. See module docstring for shapes."""
  hd = q.shape[-1]
  if scale is None:
    scale = hd ** -0.5
  out_dtype = q.dtype
  # Head-major inside ((B, h, tokens, hd): one transpose per operand, then plain batched
  # matmuls): the same contractions as the BTNH einsums, bit-identical results; on XLA:CPU the
  # forward is 1.3-1.4x and forward+backward 1.05-1.2x faster than letting every einsum transpose
  # its operands (benchmarks/mediator_layout.py, issue 15).
  qh, kh, vh, mh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v, m))
  # Logits and softmax in float32 whatever the input dtype.
  logits1 = jnp.einsum("bhmd,bhkd->bhmk", mh * scale, kh, preferred_element_type=jnp.float32)
  a1 = jax.nn.softmax(logits1 + bias1.astype(jnp.float32), axis=-1)
  vm = jnp.einsum("bhmk,bhkd->bhmd", a1.astype(v.dtype), vh, preferred_element_type=jnp.float32)
  logits2 = jnp.einsum("bhqd,bhmd->bhqm", qh * scale, mh, preferred_element_type=jnp.float32)
  a2 = jax.nn.softmax(logits2 + bias2.astype(jnp.float32), axis=-1)
  out = jnp.einsum("bhqm,bhmd->bhqd", a2.astype(out_dtype), vm.astype(out_dtype),
                   preferred_element_type=jnp.float32)
  out = jnp.swapaxes(out, 1, 2)
  return out.astype(out_dtype)
