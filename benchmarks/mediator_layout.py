"""Mediator-attention core on XLA:CPU: token-major einsums vs the head-major reference (issue 15).

    python benchmarks/mediator_layout.py --json benchmarks/results/mediator_layout.json

``btnh``: the five contractions written on the (B, N, h, hd) layout (the reference core before
issue 15's second pass; XLA transposes operands inside each einsum, forward and backward).
``head-major``: ``edit_jax.kernels.reference.mediator_attention_reference`` as it is (operands
transposed once to (B, h, tokens, hd), then plain batched matmuls). For each shape: forward and
forward+backward (``jax.vjp`` with a fixed cotangent) wall time, min over ``--repeats`` after a
warm-up, the two layouts interleaved; and the largest output difference (bit-identical expected).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import edit_jax  # noqa: E402,F401  (allocator settings before the backend starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from edit_jax.kernels.reference import mediator_attention_reference  # noqa: E402

# name -> (B, N, h, hd, n): the quickstart block, SiT-S/2 n=16 and SiT-B/2 n=64 at 256 px, batch 8
SHAPES = {"quickstart": (32, 64, 4, 32, 16), "S2-med16": (8, 256, 6, 64, 16),
          "B2-med64": (8, 256, 12, 64, 64)}


def btnh(q, k, v, m, bias1, bias2, *, scale):
  """The token-major form: same math, einsums on (B, N, h, hd) operands."""
  a1 = jax.nn.softmax(jnp.einsum("bmhd,bkhd->bhmk", m * scale, k) + bias1, axis=-1)
  vm = jnp.einsum("bhmk,bkhd->bmhd", a1, v)
  a2 = jax.nn.softmax(jnp.einsum("bqhd,bmhd->bhqm", q * scale, m) + bias2, axis=-1)
  return jnp.einsum("bhqm,bmhd->bqhd", a2, vm)


def run(repeats: int) -> list[dict]:
  rows = []
  for name, (b, n_tok, h, hd, n) in SHAPES.items():
    ks = jax.random.split(jax.random.key(0), 7)
    q, k, v, ct = (jax.random.normal(kk, (b, n_tok, h, hd)) for kk in ks[:4])
    m = jax.random.normal(ks[4], (b, n, h, hd))
    b1, b2 = jax.random.normal(ks[5], (h, n, n_tok)), jax.random.normal(ks[6], (h, n_tok, n))
    args = (q, k, v, m, b1, b2)
    fns = {"btnh": lambda *a: btnh(*a, scale=hd ** -0.5),
           "head-major": lambda *a: mediator_attention_reference(*a, scale=hd ** -0.5)}
    dims = ("B,N,h,hd,n", f"{b},{n_tok},{h},{hd},{n}")
    rows += common.layout_rows(name, dims, fns, args, ct, repeats)
  return rows


def main(argv=None):
  return common.layout_main(argv, __doc__, "benchmarks/mediator_layout.py",
                           "benchmarks/results/mediator_layout.json", run)


if __name__ == "__main__":
  main()
