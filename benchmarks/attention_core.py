"""Full-attention core on XLA:CPU: jax.nn.dot_product_attention vs the head-major form (issue 15).

    python benchmarks/attention_core.py --json benchmarks/results/attention_core.json

``dot_product_attention``: ``jax.nn.dot_product_attention(implementation="xla")`` (token-major
einsums 'BTNH,BSNH->BNTS' / 'BNTS,BSNH->BTNH'; the CPU default before issue 15's third pass).
``head-major``: ``edit_jax.models.attention_core.head_major_attention`` (the same operations with
q, k, v transposed once to (B, h, N, hd); the CPU default now). For each shape: forward and
forward+backward (``jax.vjp`` with a fixed cotangent) wall time, min over ``--repeats`` after a
warm-up, the two interleaved; and the largest output difference.
"""
from __future__ import annotations

import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import edit_jax  # noqa: E402,F401  (allocator settings before the backend starts)
import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from edit_jax.models import attention_core  # noqa: E402

# name -> (B, N, h, hd): SiT-S/2, B/2 and XL/2 blocks at 256 px (256 tokens), batch 8; the
# quickstart's size (D 128, 4 heads, 64 tokens, batch 32) with full attention
SHAPES = {"quickstart-full": (32, 64, 4, 32), "S2": (8, 256, 6, 64), "B2": (8, 256, 12, 64),
          "XL2": (8, 256, 16, 72)}


def run(repeats: int) -> list[dict]:
  rows = []
  for name, (b, n_tok, h, hd) in SHAPES.items():
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, n_tok, h, hd)) for kk in ks)
    args = (q, k, v)
    dpa = functools.partial(jax.nn.dot_product_attention, implementation="xla")
    fns = {"dot_product_attention": dpa,
           "head-major": attention_core.head_major_attention}
    dims = ("B,N,h,hd", f"{b},{n_tok},{h},{hd}")
    rows += common.layout_rows(name, dims, fns, args, ct, repeats)
  return rows


def main(argv=None):
  return common.layout_main(argv, __doc__, "benchmarks/attention_core.py",
                           "benchmarks/results/attention_core.json", run)


if __name__ == "__main__":
  main()
