"""Same network, two objectives: DiT's Gaussian diffusion vs SiT's transport on the digits.

    nice -n 10 python benchmarks/gaussian_vs_transport.py --steps 1500 --num_samples 500 --seeds 0,1

Trains the quickstart model (configs/quickstart.py: SiT D=128, depth 4, patch 4, 16 mediators on the
embedded 32x32 digits, its recipe: AdamW 3e-3, cosine, batch 32, EMA 0.999) with
`python -m edit_jax.main`, identical except the objective:
  transport  configs/quickstart.py           (Linear path, velocity; learn_sigma=False)
  gaussian   configs/dit.py:digits           (1000-step linear DDPM, eps + learned-range
                                              variance, loss = mse + vb; learn_sigma=True)
once per training seed in `--seeds` (`--config.seed`: same initialization noise and data order
for both objectives of a seed), same number of steps (`--steps`; max_train_seconds is disabled so
both stop at the same step). Then each EMA model samples `--num_samples` digits (labels 0..9
cycled, fixed noise, classifier-free guidance `--cfg_scale` on all channels as the quickstart):
  natural samplers   transport: the quickstart's own sampler (Heun ODE, 30 grid points = 58
                     network evaluations); gaussian: configs/dit.py:digits' DDIM-50 (eta 0)
  matched NFE        `--nfe` evaluations each: transport Euler ODE / Euler-Maruyama SDE (Mean last
                     step), gaussian DDIM (eta 0) / DDPM on the `str(nfe)` respacing
DDIM/DDPM clip x0 to [-1, 1] (pixel data). Scores: Frechet digit distance against the 4,500
training digits and the share of samples the offline classifier assigns to their label
(`edit_jax.eval.digits`); the real-data floor is the same number of stratified held-out digits.

Writes benchmarks/results/gaussian_vs_transport.json and regenerates docs/results.md through
benchmarks/report.py (section "Gaussian diffusion vs transport"). Runs are cached in --runs and
resume; each (run, sampler) score is cached next to its run, so adding a seed re-scores nothing
(--skip_train: score and render only what is trained).
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
# (name, mode, method, num_steps or None = --nfe, natural): natural = the sampler this
# objective's digits config samples with; the others have exactly --nfe network evaluations.
SAMPLERS = {"transport": (("Heun ODE-30", "ode", "heun2", 30, True),
                          ("Euler ODE", "ode", "euler", None, False),
                          ("Euler SDE", "sde", "Euler", None, False)),
            "gaussian": (("DDIM", "ddim", "ddim", None, True),
                         ("DDPM", "ddpm", "ddpm", None, False))}


def train_command(objective: str, workdir: pathlib.Path, steps: int, seed: int = 0) -> list[str]:
  return [sys.executable, "-m", "edit_jax.main", f"--config={CONFIGS[objective]}",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}", f"--config.seed={seed}",
          "--config.max_train_seconds=0", "--config.sample.every=0",
          f"--config.checkpoint_every={steps}", "--config.log_every=100"]


def run_dir(runs: pathlib.Path, objective: str, steps: int, seed: int) -> pathlib.Path:
  return runs / f"{objective}_{steps}_seed{seed}"


def ensure_trained(objective: str, runs: pathlib.Path, steps: int, skip: bool,
                   seed: int = 0) -> dict | None:
  """Trains (or resumes) one run; returns {"workdir", "seed", "seconds", "cpu_seconds",
  "final_loss"} or None."""
  wd = run_dir(runs, objective, steps, seed)
  info_path = wd / "study_train.json"
  if info_path.exists():
    return json.loads(info_path.read_text())
  if skip:
    print(f"{objective}: no finished run in {wd}; skipped (drop --skip_train to train it)")
    return None
  cmd = train_command(objective, wd, steps, seed)
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
  info = {"workdir": str(wd), "seed": seed, "seconds": time.time() - t0,
          "cpu_seconds": (c1.children_user + c1.children_system)
          - (c0.children_user + c0.children_system), "final_loss": loss}
  info["load_average_1min_after"] = os.getloadavg()[0]
  info_path.write_text(json.dumps(info, indent=2))
  return info


def sampler_spec(objective: str, name: str, mode: str, method: str, num_steps, nfe: int):
  """(sampler config, objective object) for one row of SAMPLERS; num_steps None = `nfe` evals."""
  from edit_jax.diffusion import gaussian, samplers, transport  # noqa: PLC0415
  if objective == "gaussian":
    cfg = gaussian.GaussianSamplerConfig(method, num_steps=num_steps or nfe,
                                         clip_denoised=True).validate()
    return cfg, None
  tr = transport.create_transport()
  if mode == "ode":
    cfg = samplers.ODEConfig(method, num_steps=num_steps or nfe + 1)
  else:
    cfg = samplers.SDEConfig(method, num_steps=num_steps or nfe)
  cfg = cfg.validate()
  if num_steps is None:
    assert samplers.program(tr, cfg).nfe == nfe, (name, samplers.program(tr, cfg).nfe, nfe)
  return cfg, tr


def sampler_nfe(objective: str, cfg, tr) -> int:
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  if objective == "gaussian":
    from edit_jax.diffusion import gaussian  # noqa: PLC0415
    return len(gaussian.space_timesteps(1000, cfg.chain))
  return int(samplers.program(tr, cfg).nfe)


def sample_fn(objective: str, model, cfg, tr, cfg_scale: float):
  """A jitted (params, x0, y, keys) -> x for one sampler."""
  import jax  # noqa: PLC0415
  from edit_jax.diffusion import gaussian, samplers  # noqa: PLC0415
  if objective == "gaussian":
    d = gaussian.create_diffusion("", learn_sigma=model.learn_sigma)
    fn = gaussian.make_sample_fn(model, d, cfg, cfg_scale=cfg_scale, guide_channels=None)
  else:
    fn = samplers.make_sample_fn(model, tr, cfg, cfg_scale=cfg_scale, guide_channels=None)
  return jax.jit(lambda p, x0, y, k: fn(p, x0, y, k).x)


def evaluate(args, trained: list[dict]) -> list[dict]:
  """Scores every (run, sampler); each score is cached as study_eval_<key>.json in the run."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from edit_jax import checkpoint  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  rng = np.random.default_rng(args.eval_seed)
  x0 = rng.standard_normal((args.num_samples, 32, 32, 1)).astype(np.float32)
  y = (np.arange(args.num_samples) % 10).astype(np.int32)
  keys = jax.random.split(jax.random.key(args.eval_seed), args.num_samples)
  real = clf = None
  rows = []
  for info in trained:
    objective = info["objective"]
    model = params = None
    for name, mode, method, num_steps, natural in SAMPLERS[objective]:
      cfg, tr = sampler_spec(objective, name, mode, method, num_steps, args.nfe)
      nfe = sampler_nfe(objective, cfg, tr)
      label = f"{name}-{nfe}" if num_steps is None else name
      key = (f"{label}_n{args.num_samples}_cfg{args.cfg_scale:g}_e{args.eval_seed}"
             .replace(" ", "_"))
      cache = pathlib.Path(info["workdir"]) / f"study_eval_{key}.json"
      if cache.exists():
        row = json.loads(cache.read_text())
        print("cached", row, flush=True)
        rows.append(row)
        continue
      if model is None:
        model, params = checkpoint.load_params_for_sampling(info["workdir"], ema=True)
      if real is None:
        real, _, _, _ = digits.digits_split()
        clf, _ = digits.load_or_train_classifier()
      fn = sample_fn(objective, model, cfg, tr, args.cfg_scale)
      t0, c0 = time.time(), time.process_time()
      out = [np.asarray(fn(params, x0[s:s + 100], y[s:s + 100], keys[s:s + 100]))
             for s in range(0, args.num_samples, 100)]
      x = np.clip(np.concatenate(out), -1.0, 1.0)
      row = {"objective": objective, "seed": info["seed"], "sampler": label,
             "natural": natural, "nfe": nfe, "cfg_scale": args.cfg_scale,
             "final_loss": info["final_loss"],
             "fdd": float(digits.frechet_digit_distance(x, real, params=clf)),
             "accuracy": float(digits.conditional_accuracy(x, y, params=clf)),
             "sample_seconds": time.time() - t0, "sample_cpu_seconds": time.process_time() - c0}
      cache.write_text(json.dumps(row, indent=2))
      print(row, flush=True)
      rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=1500, help="training steps of each objective")
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--seeds", default="0", help="comma-separated training seeds (config.seed)")
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
  try:
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
  except ValueError:
    ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
  if not seeds:
    ap.error("--seeds is empty: give at least one training seed")
  t0 = time.time()
  trained = []
  for seed in seeds:  # both objectives of a seed before the next seed
    for objective in ("transport", "gaussian"):
      info = ensure_trained(objective, pathlib.Path(args.runs), args.steps, args.skip_train, seed)
      if info is not None:
        trained.append({"objective": objective, "seed": seed, **info})
  if not trained:
    return None
  rows = evaluate(args, trained)
  from benchmarks import common, report  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  real, _, hx, hy = digits.digits_split()
  held = report.real_reference(args.num_samples, real, (hx, hy),
                               digits.load_or_train_classifier()[0])
  payload = {
      "command": "python benchmarks/gaussian_vs_transport.py " + " ".join(argv or sys.argv[1:]),
      "machine": report.machine_description(), "git_revision": head_rev,
      "recipe_revision": recipe_rev,
      "steps": args.steps, "seeds": seeds, "num_samples": args.num_samples, "nfe": args.nfe,
      "cfg_scale": args.cfg_scale, "eval_seed": args.eval_seed,
      "configs": CONFIGS, "train": trained, "rows": rows, "real_reference": held,
      "total_seconds": time.time() - t0,
  }
  common.write_json(args.out, payload)
  if not args.no_docs:
    report.render(ROOT / "docs" / "results.md")
  return payload


if __name__ == "__main__":
  main()
