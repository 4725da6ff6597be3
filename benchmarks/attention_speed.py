"""Wall-clock time of full-attention vs mediator SiT forward passes on the local device.

    python benchmarks/attention_speed.py [--cases s2_256,b2_512,b2_1024] [--repeats 5]
        [--out benchmarks/results/attention_speed.json]

Cases (latent inputs, random weights, jitted forward, float32; the mediator model's position
biases are computed inside each forward, as in training):
  s2_256   SiT-S/2 @ 256 px (32x32 latent), batch 8, n = 64
  b2_512   SiT-B/2 @ 512 px (64x64 latent), batch 1, n = 64
  b2_1024  SiT-B/2 @ 1024 px (128x128 latent), batch 1, n = 64
Reports median seconds per forward, the mediator/full time ratio and the FLOPs ratio.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import print_table, time_fn, write_json  # noqa: E402
from edit_jax import flops, models  # noqa: E402

CASES = {
    "s2_256": ("SiT-S/2", 256, 8, 64),
    "b2_512": ("SiT-B/2", 512, 1, 64),
    "b2_1024": ("SiT-B/2", 1024, 1, 64),
}


def random_params(model, seed: int = 0, std: float = 0.02):
  """Random N(0, std^2) parameters of `model` (a plain pytree, the model's param dtypes).

  For timing only: no model init is compiled, and no layer is zero (so XLA simplifies nothing).
  """
  leaves, treedef = jax.tree.flatten(models.abstract_params(model))
  sizes = [math.prod(a.shape) for a in leaves]

  @jax.jit   # one normal draw sliced into the leaves: a small program that compiles quickly
  def make(key):
    flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, i = [], 0
    for a, n in zip(leaves, sizes):
      out.append(flat[i:i + n].reshape(a.shape).astype(a.dtype))
      i += n
    return treedef.unflatten(out)

  return make(jax.random.key(seed))


def forward_time(model, batch, repeats, full_impl=None, *, inner: int = 1,
                 max_time: float = float("inf")):
  """`time_fn` of the jitted forward of `model` on a random (batch, H, W, C) latent batch."""
  params = random_params(model)
  x = jax.random.normal(jax.random.key(1), (batch, model.input_size, model.input_size, model.in_channels))
  t = jnp.linspace(0.1, 0.9, batch)
  y = jnp.arange(batch) % model.num_classes
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  return time_fn(fwd, params, x, t, y, warmup=1, repeats=repeats, inner=inner, max_time=max_time)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--full_impl", default=None, help="jax.nn.dot_product_attention implementation")
  ap.add_argument("--out", default="benchmarks/results/attention_speed.json")
  args = ap.parse_args(argv)
  rows = []
  for case in args.cases.split(","):
    name, res, batch, n = CASES[case]
    full = flops.model_at(name, res, 0, full_attention_impl=args.full_impl)
    med = flops.model_at(name, res, n)
    tf = forward_time(full, batch, args.repeats)
    tm = forward_time(med, batch, args.repeats)
    gf, gm = flops.gflops(full), flops.gflops(med)
    rows.append({
        "case": case, "model": name, "res": res, "batch": batch, "mediators": n,
        "full s": f"{tf['median_s']:.4f}", "mediator s": f"{tm['median_s']:.4f}",
        "time ratio": f"{tm['median_s'] / tf['median_s']:.3f}",
        "FLOPs ratio": f"{gm / gf:.3f}",
        "full GFLOP/s": f"{gf * batch / tf['median_s']:.1f}",
        "mediator GFLOP/s": f"{gm * batch / tm['median_s']:.1f}",
        "raw": {"full": tf, "mediator": tm, "gflops_full": gf, "gflops_mediator": gm},
    })
    print(f"{case}: full {tf['median_s']:.4f}s  mediator {tm['median_s']:.4f}s", flush=True)
  cols = ["case", "model", "res", "batch", "mediators", "full s", "mediator s", "time ratio",
          "FLOPs ratio", "full GFLOP/s", "mediator GFLOP/s"]
  print_table(rows, cols)
  write_json(args.out, {"command": "python benchmarks/attention_speed.py " + " ".join(argv or sys.argv[1:]),
                        "rows": rows})


if __name__ == "__main__":
  main()
