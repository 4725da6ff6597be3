"""Same network, two objectives: DiT's Gaussian diffusion vs SiT's transport on the digits.

    nice -n 10 python benchmarks/gaussian_vs_transport.py --steps 1500 --num_samples 300

Trains the quickstart model (configs/quickstart.py: SiT D=128, depth 4, patch 4, 16 mediators on the
embedded 32x32 digits, its recipe: AdamW 3e-3, cosine, batch 32, EMA 0.999) twice with
`python -m edit_jax.main`, identical except the objective:
  transport  configs/quickstart.py           (Linear path, velocity; learn_sigma=False)
  gaussian   configs/dit.py:digits           (1000-step linear DDPM, eps + learned-range
                                              variance, loss = mse + vb; learn_sigma=True)
same seed, data order and number of steps (`--steps`; max_train_seconds is disabled so both stop
at the same step). Then each EMA model samples `--num_samples` digits (labels 0..9 cycled, fixed
noise, classifier-free guidance `--cfg_scale` on all channels as the quickstart) with samplers of
equal network evaluations `--nfe`: transport Euler ODE / Euler-Maruyama SDE (Mean last step),
gaussian DDIM (eta 0) / DDPM on the `str(nfe)` respacing (x0 clipped to [-1, 1], pixel data).
Scores: Frechet digit distance against the 4,500 training digits and the share of samples the
offline classifier assigns to their label (`edit_jax.eval.digits`).

Writes benchmarks/results/gaussian_vs_transport.json (rerun with --skip_train to re-score, runs
are cached in --runs and resume) and regenerates docs/results.md through benchmarks/report.py
(section "Gaussian diffusion vs transport").
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "gaussian_vs_transport.json"
CONFIGS = {"transport": "configs/quickstart.py", "gaussian": "configs/dit.py:digits"}
SAMPLERS = {"transport": (("Euler ODE", "ode"), ("Euler SDE", "sde")),
            "gaussian": (("DDIM", "ddim"), ("DDPM", "ddpm"))}


def train_command(objective: str, workdir: pathlib.Path, steps: int) -> list[str]:
  return [sys.executable, "-m", "edit_jax.main", f"--config={CONFIGS[objective]}",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}",
          "--config.max_train_seconds=0", "--config.sample.every=0",
          f"--config.checkpoint_every={steps}", "--config.log_every=100"]


def ensure_trained(objective: str, runs: pathlib.Path, steps: int, skip: bool) -> dict | None:
  """Trains (or resumes) one run; returns {"workdir", "seconds", "final_loss"} or None."""
  wd = runs / f"{objective}_{steps}"
  info_path = wd / "study_train.json"
  if info_path.exists():
    return json.loads(info_path.read_text())
  if skip:
    print(f"{objective}: no finished run in {wd}; skipped (drop --skip_train to train it)")
    return None
  cmd = train_command(objective, wd, steps)
  print("+", " ".join(cmd), flush=True)
  t0, c0 = time.time(), os.times()
  log = wd.parent / f"{wd.name}.log"
  wd.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "a") as f:
    p = subprocess.run(cmd, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT)
  if p.returncode:
    raise SystemExit(f"training {objective} failed (exit {p.returncode}); see {log}")
  c1 = os.times()
  lines = [ln for ln in log.read_text().splitlines() if f"step {steps}/{steps}" in ln]
  loss = float(lines[-1].split("loss ")[1].split()[0]) if lines else float("nan")
  info = {"workdir": str(wd), "seconds": time.time() - t0,
          "cpu_seconds": (c1.children_user + c1.children_system)
          - (c0.children_user + c0.children_system), "final_loss": loss}
  info_path.write_text(json.dumps(info, indent=2))
  return info


def sample_fn(objective: str, mode: str, model, nfe: int, cfg_scale: float):
  """A jitted (params, x0, y, keys) -> x for one sampler with `nfe` network evaluations."""
  import jax  # noqa: PLC0415
  from edit_jax.diffusion import gaussian, samplers, transport  # noqa: PLC0415
  if objective == "gaussian":
    d = gaussian.create_diffusion("", learn_sigma=model.learn_sigma)
    cfg = gaussian.GaussianSamplerConfig(mode, num_steps=nfe, clip_denoised=True)
    fn = gaussian.make_sample_fn(model, d, cfg, cfg_scale=cfg_scale, guide_channels=None)
  else:
    tr = transport.create_transport()
    cfg = (samplers.ODEConfig("euler", num_steps=nfe + 1) if mode == "ode"
           else samplers.SDEConfig("Euler", num_steps=nfe))
    assert samplers.program(tr, cfg).nfe == nfe
    fn = samplers.make_sample_fn(model, tr, cfg, cfg_scale=cfg_scale, guide_channels=None)
  return jax.jit(lambda p, x0, y, k: fn(p, x0, y, k).x)


def evaluate(args, trained: dict) -> list[dict]:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from edit_jax import checkpoint  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  rng = np.random.default_rng(args.eval_seed)
  x0 = rng.standard_normal((args.num_samples, 32, 32, 1)).astype(np.float32)
  y = (np.arange(args.num_samples) % 10).astype(np.int32)
  keys = jax.random.split(jax.random.key(args.eval_seed), args.num_samples)
  real, _, _, _ = digits.digits_split()
  clf, _ = digits.load_or_train_classifier()
  rows = []
  for objective, info in trained.items():
    model, params = checkpoint.load_params_for_sampling(info["workdir"], ema=True)
    for name, mode in SAMPLERS[objective]:
      fn = sample_fn(objective, mode, model, args.nfe, args.cfg_scale)
      t0 = time.time()
      out = [np.asarray(fn(params, x0[s:s + 100], y[s:s + 100], keys[s:s + 100]))
             for s in range(0, args.num_samples, 100)]
      x = np.clip(np.concatenate(out), -1.0, 1.0)
      row = {"objective": objective, "sampler": f"{name}-{args.nfe}", "nfe": args.nfe,
             "cfg_scale": args.cfg_scale, "final_loss": info["final_loss"],
             "fdd": float(digits.frechet_digit_distance(x, real, params=clf)),
             "accuracy": float(digits.conditional_accuracy(x, y, params=clf)),
             "sample_seconds": time.time() - t0}
      print(row, flush=True)
      rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=1500, help="training steps of each objective")
  ap.add_argument("--num_samples", type=int, default=300)
  ap.add_argument("--nfe", type=int, default=50, help="network evaluations per sample")
  ap.add_argument("--cfg_scale", type=float, default=3.0)
  ap.add_argument("--eval_seed", type=int, default=0)
  ap.add_argument("--runs", default=str(ROOT / "runs" / "objectives"))
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--out", default=str(RESULT))
  ap.add_argument("--no_docs", action="store_true", help="do not regenerate docs/results.md")
  args = ap.parse_args(argv)
  if args.num_samples % 100:
    ap.error("--num_samples must be a multiple of 100 (sampling batch)")
  def git(*a):
    return subprocess.run(["git", *a], cwd=str(ROOT), capture_output=True, text=True).stdout.strip()
  head_rev = git("rev-parse", "--short", "HEAD")
  recipe_rev = git("log", "-1", "--format=%h", "HEAD", "--", "configs/quickstart.py")
  t0 = time.time()
  trained = {}
  for objective in ("transport", "gaussian"):
    info = ensure_trained(objective, pathlib.Path(args.runs), args.steps, args.skip_train)
    if info is not None:
      trained[objective] = info
  if not trained:
    return None
  rows = evaluate(args, trained)
  from benchmarks import common, report  # noqa: PLC0415
  held = report.score_digits(*_held_out(args.num_samples), *_real_and_clf())
  payload = {
      "command": "python benchmarks/gaussian_vs_transport.py " + " ".join(argv or sys.argv[1:]),
      "machine": report.machine_description(), "git_revision": head_rev,
      "recipe_revision": recipe_rev,
      "steps": args.steps, "num_samples": args.num_samples, "nfe": args.nfe,
      "cfg_scale": args.cfg_scale, "eval_seed": args.eval_seed,
      "configs": CONFIGS, "train": trained, "rows": rows, "real_reference": held,
      "total_seconds": time.time() - t0,
  }
  common.write_json(args.out, payload)
  if not args.no_docs:
    report.render(ROOT / "docs" / "results.md")
  return payload


def _held_out(n):
  from edit_jax.eval import digits  # noqa: PLC0415
  _, _, hx, hy = digits.digits_split()
  return hx[:n], hy[:n]


def _real_and_clf():
  from edit_jax.eval import digits  # noqa: PLC0415
  real, _, _, _ = digits.digits_split()
  return real, digits.load_or_train_classifier()[0]


if __name__ == "__main__":
  main()
