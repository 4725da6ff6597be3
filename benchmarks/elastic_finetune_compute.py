"""Compute needed to fine-tune SiT into an elastic-mediator model (configs/elastic_finetune.py).

    python benchmarks/elastic_finetune_compute.py            # table + benchmarks/results/elastic_finetune_compute.json

From the FLOPs model only (edit_jax.flops: 1 multiply-add = 1 FLOP per forward; here converted to
hardware FLOPs, 2 per multiply-add, and 3 x forward per training image): per preset, the forward
GFLOPs at each n, the expected training FLOPs per image / step / run for uniform and sandwich n
sampling, parameter + optimizer memory, and ESTIMATED wall-clock on TPU slices = FLOPs / (chips x
dense bf16 peak (edit_jax.metrics.PEAK_TFLOPS) x assumed MFU). No accelerator measurement is
involved: the MFU values are assumptions, stated in the output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("XL2", "XL2-first4", "S2-med64")
# (name, chips, PEAK_TFLOPS key)
SLICES = (("v4-32", 16, "tpu v4"), ("v5p-32", 16, "tpu v5p"), ("v5e-32", 32, "tpu v5e"),
          ("v6e-16", 16, "tpu v6e"))
MFUS = (0.3, 0.4, 0.5)


def load_config(preset: str):
  spec = importlib.util.spec_from_file_location("elastic_finetune",
                                                ROOT / "configs" / "elastic_finetune.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(preset)


def preset_rows(preset: str) -> dict:
  from edit_jax import elastic, flops, metrics, models, train  # noqa: PLC0415
  c = load_config(preset)
  model = train.get_model(c)
  ms = elastic.parse_mediators(c.elastic.mediators, model.num_tokens)
  fwd = {n: flops.gflops(elastic.at(model, n)) for n in ms}
  vanilla = flops.gflops(model.clone(mediator_num=0, elastic_grid=0))
  params = models.count_params(models.abstract_params(model))
  out = {"preset": preset, "model": c.model.name, "mediator_layers": c.model.mediator_layers,
         "mediators": list(ms), "forward_gmacs": {str(n): g for n, g in fwd.items()},
         "forward_gmacs_vanilla": vanilla, "params": params,
         # fp32 params + EMA + 2 AdamW moments, before FSDP sharding
         "state_gib": params * 4 * 4 / 2 ** 30,
         "global_batch": c.global_batch_size, "steps": c.num_train_steps}
  for mode in ("uniform", "sandwich"):
    sel = elastic.StepSelector(model, None, lambda f: f, mediators=ms, mode=mode)
    per_image = 2 * 3 * sel.forward_gflops() * 1e9            # hardware FLOPs per train image
    total = per_image * c.global_batch_size * c.num_train_steps
    est = []
    for name, chips, key in SLICES:
      peak = metrics.PEAK_TFLOPS[key] * 1e12
      for mfu in MFUS:
        est.append({"slice": name, "chips": chips, "peak_tflops_per_chip": peak / 1e12,
                    "assumed_mfu": mfu, "hours": total / (chips * peak * mfu) / 3600,
                    "chip_hours": total / (peak * mfu) / 3600})
    out[mode] = {"train_gflop_per_image": per_image / 1e9,
                 "train_flop_per_step": per_image * c.global_batch_size, "train_flop_total": total,
                 "estimates": est}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" /
                                        "elastic_finetune_compute.json"))
  args = ap.parse_args(argv)
  rows = [preset_rows(p) for p in PRESETS]
  for r in rows:
    print(f"{r['preset']}: {r['model']} mediators in {r['mediator_layers']} blocks, n "
          f"{r['mediators']}, {r['params']:,} params, state {r['state_gib']:.1f} GiB (fp32 params"
          f" + EMA + AdamW), {r['steps']:,} steps x batch {r['global_batch']}")
    print("  forward GMACs: " + ", ".join(f"n={n} {g:.3f}" for n, g in r["forward_gmacs"].items())
          + f" (vanilla {r['forward_gmacs_vanilla']:.3f})")
    for mode in ("uniform", "sandwich"):
      m = r[mode]
      print(f"  {mode}: {m['train_gflop_per_image']:.1f} GFLOP/image, "
            f"{m['train_flop_per_step']:.3g} FLOP/step, {m['train_flop_total']:.3g} FLOP total")
      for e in m["estimates"]:
        if e["assumed_mfu"] == 0.4:
          print(f"    ESTIMATE {e['slice']} ({e['chips']} chips, {e['peak_tflops_per_chip']:.0f}"
                f" TFLOP/s peak, assumed MFU 40%): {e['hours']:.1f} h, {e['chip_hours']:.0f} "
                f"chip-hours")
  payload = {"command": "python benchmarks/elastic_finetune_compute.py",
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "note": "analytic FLOPs (edit_jax.flops, x2 per multiply-add, x3 for training); "
                     "hours are estimates at ASSUMED MFU, no accelerator was measured",
             "presets": rows}
  pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.json).write_text(json.dumps(payload, indent=2))
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
