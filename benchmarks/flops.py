"""GFLOPs per forward (1 multiply-add = 1 FLOP, batch 1) of SiT with and without mediators.

    python benchmarks/flops.py                 # prints the table, writes nothing
    python benchmarks/flops.py --xla           # adds XLA's cost analysis / 2 (slow for big models)
    python benchmarks/flops.py --write         # regenerates the tracked benchmarks/results/flops.json
    python benchmarks/flops.py --json out.json # writes the table to another file

Prints ours (analytic), the published/fvcore figure and, with --xla, XLA's cost analysis / 2.
`--write` implies --xla, so the tracked file always has every column.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json  # noqa: E402
from edit_jax import flops  # noqa: E402

TRACKED = "benchmarks/results/flops.json"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--xla", action="store_true", help="also run XLA cost analysis (slow for big models)")
  ap.add_argument("--write", action="store_true",
                  help=f"write the tracked {TRACKED} (implies --xla)")
  ap.add_argument("--json", default="", help="write the table to this file")
  args = ap.parse_args(argv)
  args.xla = args.xla or args.write
  rows = []
  base = {}
  for name, res, n, ref in flops.PUBLISHED:
    m = flops.model_at(name, res, n)
    g = flops.gflops(m)
    if n == 0:
      base[(name, res)] = g
    row = {"model": name, "res": res, "mediators": n or "full", "GFLOPs": f"{g:.3f}",
           "published": f"{ref:.3f}", "diff %": f"{(g / ref - 1) * 100:+.3f}"}
    if (name, res) in base and n:
      row["vs full"] = f"{(g / base[(name, res)] - 1) * 100:+.1f}%"
    if args.xla:
      row["XLA/2"] = f"{flops.xla_gflops(m):.3f}"
    rows.append(row)
  cols = ["model", "res", "mediators", "GFLOPs", "published", "diff %", "vs full"] + (["XLA/2"] if args.xla else [])
  print_table(rows, cols)
  record = {"command": " ".join(["python benchmarks/flops.py"] + list(argv or sys.argv[1:])),
            "rows": rows}
  for out in [TRACKED] * args.write + [args.json] * bool(args.json):
    write_json(out, record)
  return rows


if __name__ == "__main__":
  main()
