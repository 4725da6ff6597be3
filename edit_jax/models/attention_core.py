"""The full-attention core softmax(q k^T / sqrt(hd) + bias) v, and how it is computed.

q, k, v: (B, N, h, hd) token-major (the layout `jax.nn.dot_product_attention` takes and the qkv
projection produces); bias: None or broadcastable to (B, h, Nq, Nk); returns (B, Nq, h, hd).

`implementation` (the models' ``full_attention_impl``):
  None          automatic: "head_major" when the default backend is the CPU, otherwise
                `jax.nn.dot_product_attention`'s own default (XLA; cuDNN only when asked).
  "xla"         `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"       `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPUs).
  "head_major"  `head_major_attention`: the same operations in the same order as the XLA path of
                `jax.nn.dot_product_attention` (logits in float32 for float32/bfloat16 inputs,
                scaled after the product, softmax in float32, probabilities cast to the value
                dtype), with q, k, v transposed once to (B, h, N, hd) so both products are plain
                batched matmuls with batch dims leading.

Why a second path: XLA:CPU runs the products of the token-major einsums ('BTNH,BSNH->BNTS' and
'BNTS,BSNH->BTNH', batch dims not leading) through slow strided batched-matmul kernels; the
head-major form runs SiT-S/2's attention 1.66x faster forward and 1.30x forward+backward, and
the whole S/2 training step 15 % faster, on a 2-core CPU (docs/benchmarks.md "Third pass",
`benchmarks/attention_core.py`, `benchmarks/torch_reference.py`).
Values agree with `jax.nn.dot_product_attention` to float32 rounding (tests/test_attention_core.py).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "xla", "cudnn", "head_major")


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"full_attention_impl={implementation!r}: expected one of None (automatic), "
                     f"'xla', 'cudnn' (jax.nn.dot_product_attention) or 'head_major'")


def resolve(implementation: Optional[str]) -> Optional[str]:
  """The implementation actually used at trace time (None -> per backend, see module doc)."""
  check_implementation(implementation)
  if implementation is None and jax.default_backend() == "cpu":
    return "head_major"
  return implementation


def head_major_attention(q, k, v, bias=None):
  """softmax(q k^T / sqrt(hd) + bias) v with head-major products. Shapes as the module doc."""
  hd = q.shape[-1]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, h, N, hd)
  precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
  try:  # as jax.nn.dot_product_attention: the explicit preset where the platform supports it
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, precision=precision,
                        preferred_element_type=logits_dtype)
  except Exception:  # noqa: BLE001
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(1.0 / np.sqrt(hd), logits.dtype)
  if bias is not None:
    logits = (logits + bias).astype(logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, vh).transpose(0, 2, 1, 3)


def dot_product_attention(q, k, v, bias=None, implementation: Optional[str] = None):
  """The full-attention core by `implementation` (module doc). (B, N, h, hd) in and out."""
  impl = resolve(implementation)
  if impl == "head_major":
    return head_major_attention(q, k, v, bias)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl)
