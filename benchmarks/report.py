"""Results report: FLOPs, CPU forward time, digit quality vs steps, dynamic schedule -> Markdown.

    python benchmarks/report.py --out docs/results.md                  # everything
    python benchmarks/report.py --parts flops,speed --out docs/results.md
    python benchmarks/report.py --parts quality,dynamic --skip_train   # reuse trained runs only

Parts (each writes benchmarks/results/report_<part>.json; the Markdown is rebuilt from every JSON
present, so parts can be rerun separately):
  flops    analytic GFLOPs per forward (edit_jax.flops, batch 1) vs resolution, full attention vs
           mediators n = 4 / 16 / 64, for SiT-S/2 and SiT-B/2 at 256 / 512 / 1024 px.
  speed    measured median forward time on the local device (SiT-S/2 at 128 / 256 / 512 px,
           batch 1, full vs n = 64, random weights, jitted, float32).
  quality  quickstart-sized models (configs/quickstart.py: 4 blocks, width 128, patch 4 on 32x32
           digits) trained with full attention and n = 4 / 16 / 64 mediators, identical otherwise
           (seed, data order, schedule); each checkpoint's EMA weights sample `--num_samples`
           digits (Euler ODE, `--sample_steps` grid points, no guidance, fixed noise and labels),
           scored by the Frechet digit distance and conditional accuracy (edit_jax.eval.digits).
  dynamic_sde  the same with the Euler SDE (the paper's sampler) instead of the ODE.
  dynamic  the step-wise dynamic schedule (edit_jax.diffusion.dynamic, n = 4 -> 16 -> 64, L1, F = 3) over
           the final checkpoints of the three mediator models, sweeping (rho_1, rho_2), against
           the static models, same sampler and noise: quality vs GFLOPs per image.
  elastic  the elastic-mediator study (benchmarks/elastic_study.py, settings in
           configs/elastic_study.py or --elastic_config): full vs static n vs one elastic model
           over several seeds, and the dynamic schedule over one elastic vs three static
           checkpoints; ignores the quality-part flags above.

Defaults are the budget settings of docs/results.md (600 training steps per model, 300 samples,
30-point Euler ODE, checkpoints 150/300/600 scored, full attention also trained with seed 1;
about 50 minutes on the shared 2-core CPU).
A fuller run: --train_steps 3000 --num_checkpoints 4 --eval_steps "" --num_samples 500
--sample_steps 50 (add --second_seed 0,4,16,64 for seed 1 of every variant).

Training runs are cached in --runs (default runs/report/, gitignored) and resume; a rerun skips
finished ones. `--skip_train` never trains (parts needing a missing run are skipped with a note).
Plots go to docs/results/*.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"
PLOTS_DIR = ROOT / "docs" / "results"
PARTS = ("flops", "speed", "quality", "dynamic", "dynamic_sde", "elastic")
MEDIATORS = (4, 16, 64)
RHO_PAIRS = ((0.9, 0.8), (0.8, 0.6), (0.6, 0.4), (0.4, 0.2))


# ----------------------------------------------------------------------------- pure helpers
def parse_parts(text: str) -> tuple[str, ...]:
  """'flops,speed' -> ('flops', 'speed'); 'all' -> every part. Raises on unknown names."""
  names = [p.strip() for p in text.split(",") if p.strip()]
  if names == ["all"]:
    return PARTS
  bad = [p for p in names if p not in PARTS]
  if bad or not names:
    raise ValueError(f"unknown report part(s) {bad or text!r}: choose from {', '.join(PARTS)} "
                     f"(comma-separated) or 'all'")
  return tuple(names)


def parse_rho_pairs(text: str) -> tuple[tuple[float, float], ...]:
  """'0.9:0.8,0.8:0.6' -> ((0.9, 0.8), (0.8, 0.6)); each rho in (0, 1)."""
  pairs = []
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    parts = item.split(":")
    try:
      a, b = (float(v) for v in parts)
    except ValueError as e:
      raise ValueError(f"bad rho pair {item!r}: write pairs as rho1:rho2, comma-separated, "
                       f"e.g. 0.9:0.8,0.6:0.4") from e
    if not (0 < a < 1 and 0 < b < 1):
      raise ValueError(f"rho pair {item!r}: both ratios must lie in (0, 1)")
    pairs.append((a, b))
  if not pairs:
    raise ValueError("no rho pairs given: e.g. --rho 0.9:0.8,0.6:0.4")
  return tuple(pairs)


def checkpoint_steps(total: int, count: int) -> list[int]:
  """`count` evenly spaced steps ending at `total`: (4000, 4) -> [1000, 2000, 3000, 4000]."""
  if total < 1 or count < 1 or count > total:
    raise ValueError(f"need 1 <= count ({count}) <= total steps ({total})")
  return [round(total * (i + 1) / count) for i in range(count)]


def run_name(mediator_num: int, steps: int, seed: int) -> str:
  return f"{'full' if mediator_num == 0 else f'med{mediator_num}'}_steps{steps}_seed{seed}"


def attn_label(mediator_num: int) -> str:
  return "full" if mediator_num == 0 else f"n={mediator_num}"


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
  """A GitHub Markdown table of `rows` (dicts) restricted to `cols`; fmt: col -> format spec."""
  fmt = fmt or {}

  def cell(r, c):
    v = r.get(c, "")
    if v is None:
      return "-"
    if c in fmt and isinstance(v, (int, float)):
      return format(v, fmt[c])
    return str(v)

  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def mean_std(values) -> tuple[float, float]:
  import numpy as np  # noqa: PLC0415
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of points (cost, loss) not dominated by another (lower cost and lower loss)."""
  idx = []
  for i, (c, q) in enumerate(points):
    dominated = any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for j, (c2, q2) in
                    enumerate(points) if j != i)
    if not dominated:
      idx.append(i)
  return idx


def machine_description() -> str:
  import jax  # noqa: PLC0415
  cpu = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  d = jax.devices()[0]
  return (f"{d.platform} ({cpu or platform.machine()}, {os.cpu_count()} cores, shared with other "
          f"jobs), Python {platform.python_version()}, jax {jax.__version__}")


def write_part(part: str, payload: dict, results_dir=RESULTS_DIR) -> pathlib.Path:
  path = pathlib.Path(results_dir) / f"report_{part}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"part": part, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": machine_description(), **payload}
  path.write_text(json.dumps(payload, indent=2))
  print(f"wrote {path}", flush=True)
  return path


def read_part(part: str, results_dir=RESULTS_DIR) -> dict | None:
  path = pathlib.Path(results_dir) / f"report_{part}.json"
  return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- training
def train_config(mediator_num: int, steps: int, seed: int, num_checkpoints: int):
  """configs/quickstart.py with the mediator count, step budget and seed overridden."""
  sys.path.insert(0, str(ROOT / "configs"))
  import quickstart  # noqa: PLC0415
  c = quickstart.get_config()
  c.seed = seed
  c.model.mediator_num = int(mediator_num)
  c.num_train_steps = int(steps)
  c.checkpoint_every = checkpoint_steps(steps, num_checkpoints)[0]
  c.keep_checkpoints = num_checkpoints + 1
  c.log_every = min(c.log_every, c.checkpoint_every)
  c.sample.every = 0  # no sample grids during training: the report samples itself
  return c


def ensure_trained(runs_dir: pathlib.Path, mediator_num: int, steps: int, seed: int,
                   num_checkpoints: int, skip_train: bool) -> pathlib.Path | None:
  """Trains (or resumes) one run; returns its workdir, or None when skipped/missing."""
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  wd = runs_dir / run_name(mediator_num, steps, seed)
  ck = ckpt_lib.checkpoint_dir(str(wd))
  done = ck.exists() and ckpt_lib.Checkpointer(ck, read_only=True).latest_step() == steps
  if done:
    return wd
  if skip_train:
    print(f"--skip_train: {wd} is not finished; skipping it", flush=True)
    return None
  from edit_jax import train  # noqa: PLC0415
  cfg = train_config(mediator_num, steps, seed, num_checkpoints)
  t0 = time.perf_counter()
  train.train_and_evaluate(cfg, str(wd))
  dt = time.perf_counter() - t0
  (wd / "report_train_time.json").write_text(json.dumps({"seconds": dt, "steps": steps}))
  print(f"trained {wd.name} in {dt:.0f} s", flush=True)
  return wd


# ----------------------------------------------------------------------------- part 1: FLOPs
FLOPS_MODELS = ("SiT-S/2", "SiT-B/2")
FLOPS_RES = (256, 512, 1024)


def flops_rows(names=FLOPS_MODELS, resolutions=FLOPS_RES, mediators=MEDIATORS) -> list[dict]:
  """Analytic GFLOPs (batch-1 forward, 1 multiply-add = 1 FLOP) for each model/resolution/n."""
  from edit_jax import flops  # noqa: PLC0415
  rows = []
  for name in names:
    for res in resolutions:
      full = flops.gflops(flops.model_at(name, res, 0))
      row = {"model": name, "resolution": res, "tokens": (res // 8 // int(name[-1])) ** 2,
             "full": full}
      for n in mediators:
        g = flops.gflops(flops.model_at(name, res, n))
        row[f"n={n}"] = g
        row[f"n={n} / full"] = g / full
      rows.append(row)
  return rows


def run_flops(args) -> dict:
  from edit_jax import flops  # noqa: PLC0415
  rows = flops_rows()
  return write_part("flops", {"command": "python benchmarks/report.py --parts flops",
                              "rows": rows, "mediators": list(MEDIATORS),
                              "published_check": published_check(rows, flops.PUBLISHED)})


def published_check(rows: list[dict], published) -> list[dict]:
  """Our GFLOPs next to the published fvcore values for every (model, res, n) both list."""
  ours = {(r["model"], r["resolution"], 0): r["full"] for r in rows}
  for r in rows:
    ours.update({(r["model"], r["resolution"], int(k[2:])): v for k, v in r.items()
                 if k.startswith("n=") and "/" not in k})
  return [{"model": m, "resolution": res, "mediators": n, "ours": ours[(m, res, n)],
           "published": g} for m, res, n, g in published if (m, res, n) in ours]


# ----------------------------------------------------------------------------- part 2: speed
SPEED_MODEL = "SiT-S/2"
SPEED_RES = (128, 256, 512)


def run_speed(args) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from benchmarks.common import time_fn  # noqa: PLC0415
  from edit_jax import flops, models  # noqa: PLC0415
  rows = []
  for res in SPEED_RES:
    row = {"model": SPEED_MODEL, "resolution": res, "batch": 1,
           "tokens": (res // 8 // 2) ** 2}
    for n in (0, 64):
      model = flops.model_at(SPEED_MODEL, res, n)
      params = jax.tree_util.tree_map(lambda a: a + 0.01,
                                      models.init_params(model, jax.random.key(0)))
      x = jax.random.normal(jax.random.key(1), (1, model.input_size, model.input_size,
                                                model.in_channels))
      t, y = jnp.full((1,), 0.5), jnp.zeros((1,), jnp.int32)
      fwd = jax.jit(lambda p, x, t, y, m=model: m.apply({"params": p}, x, t, y))
      r = time_fn(fwd, params, x, t, y, warmup=1, repeats=args.speed_repeats)
      key = attn_label(n)
      row[f"{key} s"] = r["median_s"]
      row[f"{key} min s"] = r["min_s"]
      row[f"{key} GFLOPs"] = flops.gflops(model)
      print(f"speed {SPEED_MODEL} {res}px {key}: median {r['median_s']:.4f} s", flush=True)
    row["time ratio"] = row["n=64 s"] / row["full s"]
    row["FLOPs ratio"] = row["n=64 GFLOPs"] / row["full GFLOPs"]
    rows.append(row)
  return write_part("speed", {
      "command": f"python benchmarks/report.py --parts speed --speed_repeats {args.speed_repeats}",
      "rows": rows, "repeats": args.speed_repeats,
      "load_average": list(os.getloadavg())})


# ----------------------------------------------------------------------------- part 3: quality
def eval_inputs(num_samples: int, seed: int):
  """Fixed noise (N, 32, 32, 1) float32 and labels (N,) = 0..9 repeated (same for every model)."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((num_samples, 32, 32, 1)).astype(np.float32)
  y = (np.arange(num_samples) % 10).astype(np.int32)
  return x0, y


def stratified_subset(labels, n: int):
  """Indices of n examples with every class equally represented: the first n // K of each of the
  K classes (in index order), plus one more from the first n % K classes. All when n >= len."""
  import numpy as np  # noqa: PLC0415
  labels = np.asarray(labels)
  if n >= len(labels):
    return np.arange(len(labels))
  classes = np.unique(labels)
  per, extra = divmod(n, len(classes))
  idx = []
  for i, c in enumerate(classes):
    members = np.flatnonzero(labels == c)
    take = per + (1 if i < extra else 0)
    if take > len(members):
      raise ValueError(f"class {c} has {len(members)} examples, fewer than the {take} a "
                       f"stratified subset of {n} needs")
    idx.append(members[:take])
  return np.sort(np.concatenate(idx))


def real_reference(num: int, real, held, classifier) -> dict:
  """The metric's floor at this N: `num` held-out real digits (stratified over the classes)
  scored exactly like the samples (FDD against `real`, conditional accuracy with their labels)."""
  import numpy as np  # noqa: PLC0415
  hx, hy = held
  idx = stratified_subset(hy, min(num, len(hy)))
  per_class = np.bincount(np.asarray(hy)[idx], minlength=10).tolist()
  return {"num": int(len(idx)), **score_digits(hx[idx], hy[idx], real, classifier),
          "selection": "stratified: the first N/10 held-out digits of each class",
          "per_class": per_class}


def experiment_description(steps: int, num_checkpoints: int, real_count: int) -> dict:
  """What the quality runs trained, read from the config they ran (train_config) so that the
  report's text cannot drift from it."""
  sys.path.insert(0, str(ROOT / "configs"))
  import quickstart  # noqa: PLC0415
  from edit_jax import models, train  # noqa: PLC0415
  c = train_config(0, steps, 0, num_checkpoints)
  m = train.get_model(c)
  return {"global_batch_size": int(c.global_batch_size), "depth": int(m.depth),
          "hidden_size": int(m.hidden_size), "num_heads": int(m.num_heads),
          "patch_size": int(m.patch_size), "image_size": int(m.input_size),
          "channels": int(m.in_channels), "tokens": int(m.num_tokens),
          "params": models.count_params(models.abstract_params(m)),
          "schedule": str(c.optim.schedule), "learning_rate": float(c.optim.learning_rate),
          "warmup_steps": int(c.optim.warmup_steps),
          "quickstart_steps": int(quickstart.get_config().num_train_steps),
          "fdd_reference_digits": int(real_count)}


def sampler_config(sample_steps: int, sde: bool = False):
  """Euler ODE (default) or Euler SDE (official defaults: sigma diffusion, Mean last step)."""
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  if sde:
    return samplers.SDEConfig(method="Euler", num_steps=sample_steps)
  return samplers.ODEConfig(method="euler", num_steps=sample_steps)


def score_digits(images, labels, real, classifier) -> dict:
  """Frechet digit distance (vs `real`) and conditional accuracy of samples in [-1, 1]."""
  import numpy as np  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
  return {"fdd": float(digits.frechet_digit_distance(x, real, params=classifier)),
          "accuracy": float(digits.conditional_accuracy(x, labels, params=classifier))}


class StaticSampler:
  """Jitted Euler-ODE sampling (no guidance) for one architecture; params are an argument."""

  def __init__(self, model, transport, sample_steps: int, sde: bool = False):
    import jax  # noqa: PLC0415
    from edit_jax.diffusion import samplers  # noqa: PLC0415
    fn = samplers.make_sample_fn(model, transport, sampler_config(sample_steps, sde), cfg_scale=1.0)
    self._fn = jax.jit(lambda p, x0, y, keys: fn(p, x0, y, keys).x)

  def __call__(self, params, x0, y, keys=None, chunk: int = 250):
    """keys: (N,) per-sample PRNG keys (SDE only; the same streams as edit_jax.diffusion.dynamic)."""
    import numpy as np  # noqa: PLC0415
    out = [np.asarray(self._fn(params, x0[s:s + chunk], y[s:s + chunk],
                               None if keys is None else keys[s:s + chunk]))
           for s in range(0, len(x0), chunk)]
    return np.concatenate(out)


def eval_context(args):
  """(transport, x0, y, real train digits, held-out digits, classifier params)."""
  from edit_jax import train  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  cfg = train_config(0, args.train_steps, 0, args.num_checkpoints)
  transport = train.get_transport(cfg)
  x0, y = eval_inputs(args.num_samples, args.eval_seed)
  tx, _, hx, hy = digits.digits_split()
  classifier, info = digits.load_or_train_classifier()
  return transport, x0, y, tx, (hx, hy), classifier, info


def run_quality(args) -> dict | None:
  import numpy as np  # noqa: PLC0415
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  runs_dir = pathlib.Path(args.runs)
  runs = [(n, s) for n in (0,) + MEDIATORS for s in seeds_for(args, n)]
  workdirs = {}
  for n, seed in runs:
    wd = ensure_trained(runs_dir, n, args.train_steps, seed, args.num_checkpoints, args.skip_train)
    if wd is not None:
      workdirs[(n, seed)] = wd
  if not workdirs:
    print("quality: no finished training runs; skipped", flush=True)
    return None
  transport, x0, y, real, (hx, hy), classifier, cinfo = eval_context(args)
  # Reference: N held-out real digits (every class equally) scored the same way: the floor.
  ref = real_reference(args.num_samples, real, (hx, hy), classifier)
  rows, samplers_by_n = [], {}
  for (n, seed), wd in sorted(workdirs.items()):
    train_time = None
    tt = wd / "report_train_time.json"
    if tt.is_file():
      train_time = json.loads(tt.read_text())["seconds"]
    for step in eval_steps(args):
      cache = wd / (f"report_eval_step{step}_n{args.num_samples}_s{args.sample_steps}"
                    f"_e{args.eval_seed}.json")
      if cache.is_file():
        rows.append(json.loads(cache.read_text()))
        continue
      t0 = time.perf_counter()
      model, params = ckpt_lib.load_params_for_sampling(str(wd), ema=True, step=step)
      if n not in samplers_by_n:
        samplers_by_n[n] = StaticSampler(model, transport, args.sample_steps)
      x = samplers_by_n[n](params, x0, y)
      sc = score_digits(x, y, real, classifier)
      row = {"attention": attn_label(n), "mediators": n, "seed": seed, "step": step,
             **sc, "gflops_forward": flops.gflops(model),
             "train_seconds": train_time, "eval_seconds": time.perf_counter() - t0}
      cache.write_text(json.dumps(row))
      rows.append(row)
      print(f"quality {attn_label(n)} seed {seed} step {step}: FDD {sc['fdd']:.2f} "
            f"acc {sc['accuracy']:.3f} ({row['eval_seconds']:.0f} s)", flush=True)
  noise_check = None
  if (0, 0) in workdirs and args.noise_check:
    # Sampling noise: the final full-attention weights on a second noise/label draw.
    model, params = ckpt_lib.load_params_for_sampling(str(workdirs[(0, 0)]), ema=True,
                                                      step=args.train_steps)
    x0b, yb = eval_inputs(args.num_samples, args.eval_seed + 1)
    if 0 not in samplers_by_n:
      samplers_by_n[0] = StaticSampler(model, transport, args.sample_steps)
    sc = score_digits(samplers_by_n[0](params, x0b, yb), yb, real, classifier)
    first = [r for r in rows if r["mediators"] == 0 and r["seed"] == 0 and
             r["step"] == args.train_steps][0]
    noise_check = {"attention": "full", "step": args.train_steps,
                   "seeds": [args.eval_seed, args.eval_seed + 1],
                   "fdd": [first["fdd"], sc["fdd"]],
                   "accuracy": [first["accuracy"], sc["accuracy"]]}
    print(f"quality noise check: {noise_check}", flush=True)
  return write_part("quality", {
      "eval_noise_check": noise_check,
      "command": " ".join(["python benchmarks/report.py --parts quality"] + common_flags(args)),
      "train_steps": args.train_steps, "checkpoints": eval_steps(args),
      "num_samples": args.num_samples, "sample_steps": args.sample_steps,
      "sampler": f"Euler ODE, {args.sample_steps} grid points ({args.sample_steps - 1} steps), "
                 f"no guidance, EMA weights",
      "eval_seed": args.eval_seed, "classifier": cinfo,
      "real_reference": ref, "rows": rows,
      "train_config": experiment_description(args.train_steps, args.num_checkpoints, len(real)),
      "load_average": list(os.getloadavg())})


def refresh_floor(args) -> dict:
  """Recomputes only the real-data floor (and the recorded training config) of the existing
  report_quality.json: no training, no sampling. For results made before the floor was
  stratified."""
  q = read_part("quality", args.results_dir)
  if q is None:
    raise SystemExit(f"--refresh_floor: no report_quality.json in {args.results_dir}; run "
                     f"--parts quality first")
  _, _, _, real, held, classifier, _ = eval_context(args)
  q["real_reference"] = real_reference(q["num_samples"], real, held, classifier)
  q["train_config"] = experiment_description(q["train_steps"], args.num_checkpoints, len(real))
  q["floor_command"] = "python benchmarks/report.py --refresh_floor --render_only"
  q["floor_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  q["floor_machine"] = machine_description()
  path = pathlib.Path(args.results_dir) / "report_quality.json"
  path.write_text(json.dumps(q, indent=2))
  print(f"wrote {path}: real-data floor {q['real_reference']}", flush=True)
  return q


# ----------------------------------------------------------------------------- part 4: dynamic
def run_dynamic_sde(args) -> dict | None:
  return run_dynamic(args, sde=True)


def run_dynamic(args, sde: bool = False) -> dict | None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  from edit_jax.diffusion import dynamic, samplers  # noqa: PLC0415
  from edit_jax import flops  # noqa: PLC0415
  runs_dir = pathlib.Path(args.runs)
  wds = [ensure_trained(runs_dir, n, args.train_steps, 0, args.num_checkpoints, args.skip_train)
         for n in MEDIATORS]
  if any(w is None for w in wds):
    print("dynamic: a mediator run is missing; skipped", flush=True)
    return None
  transport, x0, y, real, _, classifier, _ = eval_context(args)
  loaded = [ckpt_lib.load_params_for_sampling(str(w), ema=True, step=args.train_steps) for w in wds]
  models_ = [m for m, _ in loaded]
  params = [p for _, p in loaded]
  cfg = sampler_config(args.sample_steps, sde)
  nfe = samplers.program(transport, cfg).nfe
  keys = samplers.per_sample_keys(jax.random.key(args.eval_seed), args.num_samples) if sde else None
  rows = []
  # Static points: the same sampler/noise through each model alone (from part 3 when present).
  quality = read_part("quality", args.results_dir) or {}
  same = not sde and (quality.get("num_samples") == args.num_samples and
                      quality.get("sample_steps") == args.sample_steps and
                      quality.get("eval_seed") == args.eval_seed)
  for n in (0,) + MEDIATORS:
    prev = [r for r in quality.get("rows", []) if same and r["mediators"] == n and
            r["seed"] == 0 and r["step"] == args.train_steps]
    if prev:
      sc, g = {"fdd": prev[0]["fdd"], "accuracy": prev[0]["accuracy"]}, prev[0]["gflops_forward"]
    else:
      wd = ensure_trained(runs_dir, n, args.train_steps, 0, args.num_checkpoints, True)
      if wd is None:
        continue
      model, p = ckpt_lib.load_params_for_sampling(str(wd), ema=True, step=args.train_steps)
      sc = score_digits(StaticSampler(model, transport, args.sample_steps, sde)(p, x0, y, keys),
                        y, real, classifier)
      g = flops.gflops(model)
    rows.append({"schedule": f"static {attn_label(n)}", "rho": None, **sc,
                 "gflops_per_image": g * nfe, "steps_per_stage": None})
  t0 = time.perf_counter()
  ds = dynamic.DynamicSampler(models_, params, transport, cfg,
                              dynamic.SwitchRule(args.rho[0], 3, "l1"), batch_size=args.num_samples)
  compile_s = time.perf_counter() - t0
  for pair in args.rho:
    res = ds.sample(x0, y, rng=keys, rule=dynamic.SwitchRule(pair, 3, "l1"))
    sc = score_digits(np.asarray(res.x), y, real, classifier)
    s = res.summary()
    rows.append({"schedule": f"dynamic rho=({pair[0]}, {pair[1]})", "rho": list(pair), **sc,
                 "gflops_per_image": s["gflops_per_sample_mean"],
                 "steps_per_stage": [round(v, 1) for v in s["steps_per_stage_mean"]],
                 "seconds": s["seconds"]})
    print(f"dynamic rho={pair}: FDD {sc['fdd']:.2f} acc {sc['accuracy']:.3f} GFLOPs/img "
          f"{s['gflops_per_sample_mean']:.3f} stages {s['steps_per_stage_mean']}", flush=True)
  rho_flag = ",".join(f"{a}:{b}" for a, b in args.rho)
  part = "dynamic_sde" if sde else "dynamic"
  return write_part(part, {
      "command": " ".join([f"python benchmarks/report.py --parts {part}", f"--rho {rho_flag}"]
                          + common_flags(args)),
      "sampler": (f"Euler SDE ({args.sample_steps} grid points, sigma diffusion, Mean last step;"
                  f" per-sample noise keys from eval seed {args.eval_seed})" if sde else
                  f"Euler ODE ({args.sample_steps} grid points)"),
      "num_samples": args.num_samples, "sample_steps": args.sample_steps, "nfe": nfe,
      "train_steps": args.train_steps, "first_several": 3, "distance": "l1",
      "compile_seconds": compile_s, "rows": rows, "load_average": list(os.getloadavg())})


def run_elastic(args) -> dict | None:
  from benchmarks import elastic_study  # noqa: PLC0415
  payload = elastic_study.run(args.elastic_config, skip_train=args.skip_train,
                              cached_only=args.elastic_cached_only)
  if payload is None:
    print("elastic: no finished training runs; skipped", flush=True)
    return None
  return write_part("elastic", payload)


# ----------------------------------------------------------------------------- plots
def _plot_elastic(payload: dict, path) -> pathlib.Path:
  from benchmarks import elastic_study  # noqa: PLC0415
  return elastic_study.plot(payload, path)


def _plt():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  _plt().close(fig)
  return path


def plot_flops(payload: dict, path) -> pathlib.Path:
  plt = _plt()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
  keys = ["full"] + [f"n={n}" for n in payload["mediators"]]
  styles = {"SiT-S/2": "--", "SiT-B/2": "-"}
  for name in sorted({r["model"] for r in payload["rows"]}):
    rows = [r for r in payload["rows"] if r["model"] == name]
    res = [r["resolution"] for r in rows]
    for i, k in enumerate(keys):
      a1.plot(res, [r[k] for r in rows], styles.get(name, "-"), marker="o", color=f"C{i}",
              label=f"{name} {k}")
      if k != "full":
        a2.plot(res, [r[f"{k} / full"] for r in rows], styles.get(name, "-"), marker="o",
                color=f"C{i}", label=f"{name} {k}")
  for a in (a1, a2):
    a.set_xscale("log", base=2)
    a.set_xticks([256, 512, 1024], ["256", "512", "1024"])
    a.set_xlabel("image resolution (px)")
    a.grid(alpha=0.3)
  a1.set_yscale("log")
  a1.set_ylabel("GFLOPs / forward (batch 1)")
  a2.set_ylabel("mediator / full FLOPs")
  a1.legend(fontsize=6, ncol=2)
  a2.legend(fontsize=6)
  return _save(fig, path)


def plot_speed(payload: dict, path) -> pathlib.Path:
  plt = _plt()
  fig, a = plt.subplots(figsize=(4.5, 3.4))
  rows = payload["rows"]
  res = [r["resolution"] for r in rows]
  a.plot(res, [r["full s"] * 1e3 for r in rows], marker="o", label="full attention")
  a.plot(res, [r["n=64 s"] * 1e3 for r in rows], marker="s", label="mediators n=64")
  a.set_xscale("log", base=2)
  a.set_yscale("log")
  a.set_xticks(res, [str(r) for r in res])
  a.set_xlabel("image resolution (px)")
  a.set_ylabel("median forward time (ms)")
  a.set_title(f"{rows[0]['model']}, batch 1, CPU", fontsize=9)
  a.grid(alpha=0.3)
  a.legend(fontsize=8)
  return _save(fig, path)


def plot_quality(payload: dict, path) -> pathlib.Path:
  plt = _plt()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  labels = sorted({(r["mediators"], r["seed"]) for r in payload["rows"]})
  for n, seed in labels:
    rows = sorted((r for r in payload["rows"] if r["mediators"] == n and r["seed"] == seed),
                  key=lambda r: r["step"])
    i = ((0,) + MEDIATORS).index(n) if n in (0,) + MEDIATORS else 5
    style = "-" if seed == 0 else ":"
    lab = attn_label(n) + ("" if seed == 0 else f" (seed {seed})")
    a1.plot([r["step"] for r in rows], [r["fdd"] for r in rows], style, marker="o",
            color=f"C{i}", label=lab)
    a2.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], style, marker="o",
            color=f"C{i}", label=lab)
  ref = payload.get("real_reference")
  if ref:
    a1.axhline(ref["fdd"], color="gray", lw=0.8, ls="--", label=f"real digits (N={ref['num']})")
    a2.axhline(ref["accuracy"], color="gray", lw=0.8, ls="--", label="real digits")
  a1.set_yscale("log")
  a1.set_ylabel("Frechet digit distance (lower = better)")
  a2.set_ylabel("conditional accuracy")
  for a in (a1, a2):
    a.set_xlabel("training step")
    a.grid(alpha=0.3)
  a1.legend(fontsize=7)
  return _save(fig, path)


def plot_dynamic(payload: dict, path) -> pathlib.Path:
  plt = _plt()
  fig, a = plt.subplots(figsize=(5.5, 3.8))
  stat = [r for r in payload["rows"] if r["rho"] is None]
  dyn = [r for r in payload["rows"] if r["rho"] is not None]
  for i, r in enumerate(stat):
    a.scatter(r["gflops_per_image"], r["fdd"], marker="s", color=f"C{i}", label=r["schedule"])
  if dyn:
    dyn = sorted(dyn, key=lambda r: r["gflops_per_image"])
    a.plot([r["gflops_per_image"] for r in dyn], [r["fdd"] for r in dyn], "k-o", ms=4,
           label="dynamic 4 -> 16 -> 64")
    for r in dyn:
      a.annotate(f"({r['rho'][0]}, {r['rho'][1]})", (r["gflops_per_image"], r["fdd"]),
                 fontsize=7, xytext=(3, 3), textcoords="offset points")
  a.set_xlabel(f"GFLOPs per image ({payload['nfe']} network evaluations)")
  a.set_ylabel("Frechet digit distance (lower = better)")
  a.grid(alpha=0.3)
  a.legend(fontsize=7)
  return _save(fig, path)


# ----------------------------------------------------------------------------- Markdown
def quality_observations(payload: dict) -> list[str]:
  """Plain statements computed from the quality rows (final step, seed spread, ranking)."""
  rows = payload["rows"]
  final = max(r["step"] for r in rows)
  last = [r for r in rows if r["step"] == final]
  out = []
  by_n = {}
  for r in last:
    by_n.setdefault(r["mediators"], []).append(r)
  ranked = sorted(by_n.items(), key=lambda kv: mean_std([r["fdd"] for r in kv[1]])[0])
  out.append("At step {}: ranking by Frechet digit distance (best first): {}.".format(
      final, ", ".join(f"{attn_label(n)} {mean_std([r['fdd'] for r in rs])[0]:.1f}"
                       for n, rs in ranked)))
  out.append("Conditional accuracy at step {}: {}.".format(final, ", ".join(
      f"{attn_label(n)} {mean_std([r['accuracy'] for r in rs])[0]:.3f}" for n, rs in
      sorted(by_n.items()))))
  for n, rs in sorted(by_n.items()):
    if len(rs) > 1:
      vals = sorted(r["fdd"] for r in rs)
      out.append(f"Training-seed spread ({attn_label(n)}, seeds "
                 f"{sorted(r['seed'] for r in rs)}): FDD {', '.join(f'{v:.1f}' for v in vals)}"
                 f" (range {vals[-1] - vals[0]:.1f}).")
  noise = payload.get("eval_noise_check")
  spreads = [max(r["fdd"] for r in rs) - min(r["fdd"] for r in rs) for rs in by_n.values()
             if len(rs) > 1]
  if noise:
    spreads.append(max(noise["fdd"]) - min(noise["fdd"]))
  if 0 in by_n:
    full = mean_std([r["fdd"] for r in by_n[0]])[0]
    tol = max(spreads) if spreads else None
    verdicts = []
    for n, rs in sorted(by_n.items()):
      if n == 0:
        continue
      diff = mean_std([r["fdd"] for r in rs])[0] - full
      if tol is not None and abs(diff) <= tol:
        word = "within the measured noise"
      else:
        word = "better" if diff < 0 else "worse"
      verdicts.append(f"{attn_label(n)} {diff:+.1f} ({word})")
    out.append("Mediators vs full attention at step {} (FDD difference, negative = better than "
               "full; noise = largest seed/sampling spread measured{}): {}.".format(
                   final, f", {tol:.1f}" if tol is not None else ": none measured",
                   ", ".join(verdicts)))
  accs = [r["accuracy"] for r in last]
  if accs and max(accs) < 0.3:
    out.append(f"Conditional accuracy is near chance (0.1) for every model at step {final} "
               f"(max {max(accs):.3f}): at this training budget the models have not yet learned "
               f"the class conditioning, and the samples are not yet readable digits. The FDD "
               f"differences therefore measure early convergence speed, not final quality.")
  if noise:
    out.append(f"Sampling-noise spread ({noise['attention']}, step {noise['step']}, same weights, "
               f"eval seeds {noise['seeds']}): FDD {', '.join(f'{v:.1f}' for v in noise['fdd'])}"
               f", accuracy {', '.join(f'{v:.3f}' for v in noise['accuracy'])}.")
  return out


def dynamic_observations(payload: dict) -> list[str]:
  rows = payload["rows"]
  pts = [(r["gflops_per_image"], r["fdd"]) for r in rows]
  front = pareto_front(pts)
  out = ["Pareto-optimal (GFLOPs, FDD) points: " + ", ".join(
      f"{rows[i]['schedule']} ({rows[i]['gflops_per_image']:.2f}, {rows[i]['fdd']:.1f})"
      for i in sorted(front, key=lambda i: pts[i][0])) + "."]
  big = [r for r in rows if r["schedule"] == f"static n={MEDIATORS[-1]}"]
  if big:
    b = big[0]
    for r in rows:
      if r["rho"] is not None:
        out.append(f"{r['schedule']}: {r['gflops_per_image'] / b['gflops_per_image']:.1%} of "
                   f"{b['schedule']}'s GFLOPs, FDD {r['fdd']:.1f} vs {b['fdd']:.1f}, accuracy "
                   f"{r['accuracy']:.3f} vs {b['accuracy']:.3f}.")
  return out


def _setup_text(q: dict) -> str:
  """The experiment as trained, from the config recorded with the results."""
  tc = q.get("train_config")
  if not tc:
    return (f"`configs/quickstart.py` model trained for {q['train_steps']} steps (training config "
            f"not recorded with these results)")
  return (f"`configs/quickstart.py` model ({tc['depth']} blocks, width {tc['hidden_size']}, "
          f"{tc['num_heads']} heads, patch {tc['patch_size']} on {tc['image_size']}x"
          f"{tc['image_size']}x{tc['channels']} digits, {tc['tokens']} tokens, "
          f"{tc['params']:,} parameters) trained for {q['train_steps']} steps (batch "
          f"{tc['global_batch_size']}, lr {tc['learning_rate']:g} with {tc['warmup_steps']} "
          f"warm-up steps and the {tc['schedule']} schedule over {q['train_steps']} steps; the "
          f"quickstart itself trains {tc['quickstart_steps']:,})")


def _floor_text(q: dict) -> str:
  ref = q["real_reference"]
  tc = q.get("train_config") or {}
  against = (f"FDD against the {tc['fdd_reference_digits']:,} training digits"
             if "fdd_reference_digits" in tc else "FDD against the training digits")
  sel = ""
  if ref.get("per_class"):
    sel = f" ({ref['per_class'][0]} of each class{'' if len(set(ref['per_class'])) == 1 else ' or so'})"
  when = (f" (recomputed with `{q['floor_command']}` on {q['floor_date']})"
          if q.get("floor_command") else "")
  return (f"{against}. Real-data floor at the same N: {ref['num']} held-out real digits{sel} "
          f"score FDD {ref['fdd']:.1f}, accuracy {ref['accuracy']:.3f}{when}.")


def _fmt_cmd(payload: dict) -> str:
  return f"`{payload['command']}` on {payload['machine']}, {payload['date']}"


def build_markdown(parts: dict, plots: dict) -> str:
  """The report text from part payloads {name: dict} and plot paths {name: relative path}."""
  L = ["# Results", "",
       "Generated by `python benchmarks/report.py --out docs/results.md` (raw numbers: "
       "`benchmarks/results/report_<part>.json`). Each section names the command and machine "
       "that produced it. FLOPs follow the papers' convention (1 multiply-add = 1 FLOP, batch-1 "
       "forward, `edit_jax.flops`).", ""]
  f = parts.get("flops")
  if f:
    cols = ["model", "resolution", "tokens", "full"] + [f"n={n}" for n in f["mediators"]] + \
        [f"n={n} / full" for n in f["mediators"]]
    L += ["## 1. GFLOPs vs resolution (analytic)", "", _fmt_cmd(f) + ".", "",
          md_table(f["rows"], cols, {c: ".3f" for c in cols[3:]}), ""]
    if "flops" in plots:
      L += [f"![GFLOPs vs resolution]({plots['flops']})", ""]
    chk = f.get("published_check") or []
    if chk:
      worst = max(abs(c["ours"] - c["published"]) for c in chk)
      L += [f"These agree with the {len(chk)} published fvcore values (official PyTorch code) "
            f"that overlap this grid to within {worst:.3f} GFLOPs "
            "(`edit_jax.flops.PUBLISHED`).", ""]
    L += ["Mediator attention replaces the O(N^2 d) attention core by O(n N d); the saving grows "
          "with the token count N (4x per resolution doubling) and is small at 256 px, where the "
          "linear layers dominate.", ""]
  s = parts.get("speed")
  if s:
    cols = ["model", "resolution", "tokens", "batch", "full s", "n=64 s", "time ratio",
            "FLOPs ratio", "full min s", "n=64 min s"]
    L += ["## 2. Measured forward time vs resolution (CPU)", "", _fmt_cmd(s) +
          f"; load average at the end {', '.join(f'{v:.1f}' for v in s['load_average'])}.", "",
          md_table(s["rows"], cols, {c: ".4f" for c in cols[4:]} | {"time ratio": ".3f",
                                                                      "FLOPs ratio": ".3f"}), "",
          f"Median (and min) of {s['repeats']} jitted float32 forwards after one warm-up, random "
          "weights. The CPU is shared with other jobs, so single numbers can move by tens of "
          "percent; compare ratios measured in the same run.", ""]
    if "speed" in plots:
      L += [f"![forward time vs resolution]({plots['speed']})", ""]
  q = parts.get("quality")
  if q:
    cols = ["attention", "seed", "step", "fdd", "accuracy"]
    ref = q["real_reference"]
    L += ["## 3. Quality vs training steps (embedded digits)", "", _fmt_cmd(q) + ".", "",
          f"Setup: {_setup_text(q)}, full attention vs n = 4 / 16 / 64 mediators; same seed, "
          f"initialisation seed and data order. Each checkpoint "
          f"({', '.join(map(str, q['checkpoints']))}) is scored on "
          f"{q['num_samples']} digits (labels 0..9 cycled, fixed noise, eval seed "
          f"{q['eval_seed']}) from {q['sampler']}. Metric: `edit_jax.eval.digits` (classifier "
          f"held-out accuracy {q['classifier'].get('held_out_accuracy', float('nan')):.3f}); "
          f"{_floor_text(q)}", "",
          md_table(sorted(q["rows"], key=lambda r: (r["mediators"], r["seed"], r["step"])),
                   cols, {"fdd": ".1f", "accuracy": ".3f"}), ""]
    if "quality" in plots:
      L += [f"![quality vs training steps]({plots['quality']})", ""]
    L += ["Observations (computed from the table):", ""]
    L += [f"- {o}" for o in quality_observations(q)] + [""]
  for key, title in (("dynamic", "4a. Dynamic mediator schedule (Euler ODE)"),
                     ("dynamic_sde", "4b. Dynamic mediator schedule (Euler SDE)")):
    d = parts.get(key)
    if not d:
      continue
    cols = ["schedule", "gflops_per_image", "fdd", "accuracy", "steps_per_stage"]
    L += [f"## {title}: quality vs GFLOPs", "", _fmt_cmd(d) + ".", "",
          f"The three mediator models of section 3 at step {d['train_steps']} (they differ only "
          f"in n) form the schedule n = 4 -> 16 -> 64 (`edit_jax.diffusion.dynamic`, per-sample switching, "
          f"L1 distance, F = {d['first_several']}); same {d['num_samples']} noises and labels and "
          f"the same {d.get('sampler', 'Euler ODE')} ({d['nfe']} evaluations) as the static "
          f"rows. GFLOPs per image = "
          f"sum over steps of the forward GFLOPs of the model each sample used. "
          f"`steps_per_stage` = mean steps spent at n = 4, 16, 64.", "",
          md_table(d["rows"], cols, {"gflops_per_image": ".3f", "fdd": ".1f",
                                     "accuracy": ".3f"}), ""]
    if key in plots:
      L += [f"![quality vs GFLOPs]({plots[key]})", ""]
    L += ["Observations (computed from the table):", ""]
    L += [f"- {o}" for o in dynamic_observations(d)] + [""]
    n_rho = sum(r["rho"] is not None for r in d["rows"])
    switched = [r for r in d["rows"] if r["rho"] is not None and r["steps_per_stage"] and
                r["steps_per_stage"][0] >= 0.95 * sum(r["steps_per_stage"])]
    if switched:
      L = L[:-1] + [f"- For {len(switched)} of the {n_rho} rho "
            f"pairs the samples spend >= 95% of the steps at n = {MEDIATORS[0]}: the L1 step "
            f"distance d_k rarely falls below rho_1 times its mean over the first "
            f"{d['first_several']} steps, so the rule seldom switches.", ""]
  o = parts.get("objectives")
  if o:
    L += objectives_section(o)
  e = parts.get("elastic")
  if e:
    from benchmarks import elastic_study  # noqa: PLC0415
    L += elastic_study.markdown(e, plots.get("elastic"), _fmt_cmd(e) + ".")
  L += discussion(parts)
  return "\n".join(L)


def objectives_rows(o: dict) -> list[dict]:
  """One row per (objective, sampler) of gaussian_vs_transport.json: FDD / accuracy per training
  seed (``fdd_s<seed>``) and their mean; natural samplers first."""
  rows = o["rows"]
  seeds = sorted({r.get("seed", 0) for r in rows})
  out = []
  for obj in ("transport", "gaussian"):
    names = list(dict.fromkeys(r["sampler"] for r in rows if r["objective"] == obj))
    for name in names:
      rs = {r.get("seed", 0): r for r in rows if r["objective"] == obj and r["sampler"] == name}
      row = {"objective": obj, "sampler": name, "NFE": rs[min(rs)]["nfe"],
             "natural": "yes" if rs[min(rs)].get("natural") else "",
             "seeds": len(rs)}
      for sd in seeds:
        row[f"FDD s{sd}"] = rs[sd]["fdd"] if sd in rs else None
        row[f"acc s{sd}"] = rs[sd]["accuracy"] if sd in rs else None
      row["FDD mean"] = sum(r["fdd"] for r in rs.values()) / len(rs)
      row["acc mean"] = sum(r["accuracy"] for r in rs.values()) / len(rs)
      out.append(row)
  out.sort(key=lambda r: (r["objective"] != "transport", r["natural"] != "yes"))
  return out


def objectives_section(o: dict) -> list[str]:
  """Section from benchmarks/gaussian_vs_transport.py's JSON (same network, two objectives)."""
  ref = o["real_reference"]
  train = o["train"] if isinstance(o["train"], list) else [
      {"objective": k, "seed": 0, **v} for k, v in o["train"].items()]
  seeds = sorted({t.get("seed", 0) for t in train})
  rows = objectives_rows(o)

  def losses(obj):
    return ", ".join(f"{t['final_loss']:.4f}" for t in sorted(train, key=lambda t: t["seed"])
                     if t["objective"] == obj) or "-"

  def cpu(obj, key="cpu_seconds"):
    v = [t[key] for t in train if t["objective"] == obj and key in t]
    return f"{sum(v) / len(v):.0f}" if v else "not recorded"

  seed_txt = (f"training seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
              + ("" if len(seeds) > 1 else " only (one seed: differences of the size of "
                 "section 3's seed spread are not evidence either way)"))
  L = ["## 5. Gaussian diffusion vs transport (same network, embedded digits)", "",
       _fmt_cmd(o) + f"; code at {o['git_revision']}, whose quickstart recipe "
       f"(configs/quickstart.py) is "
       + (f"the one last changed in {o['recipe_revision']}" if o.get("recipe_revision")
          else "the one of that revision") + ".", "",
       f"The quickstart model (`{o['configs']['transport']}`: SiT D=128, depth 4, patch 4, 16 "
       f"mediators, its recipe with the cosine schedule over {o['steps']} steps, no time limit) "
       f"trained for {o['steps']} steps with SiT's transport (Linear, "
       f"velocity) and, identical otherwise (seed, data order, schedule), with DiT's Gaussian "
       f"diffusion (`{o['configs']['gaussian']}`: 1000 linear steps, epsilon + learned-range "
       f"variance, loss = mse + vb; its final layer has the extra variance channel); "
       f"{seed_txt}. EMA weights; {o['num_samples']} samples per model and sampler (labels 0..9 "
       f"cycled, the same noise for every model), CFG {o['cfg_scale']} on all channels; "
       f"DDIM/DDPM clip x0 to [-1, 1]. \"natural\" marks each objective's own sampler (the "
       f"quickstart's Heun ODE with 30 grid points; configs/dit.py:digits' DDIM-50); the other "
       f"rows have exactly {o['nfe']} network evaluations each. Metric: `edit_jax.eval.digits` "
       f"(FDD vs the 4,500 training digits, lower is better; conditional accuracy; real-data "
       f"floor at this N: FDD {ref['fdd']:.1f}, accuracy {ref['accuracy']:.3f}). Final training "
       f"loss per seed: transport {losses('transport')} (velocity MSE), gaussian "
       f"{losses('gaussian')} (eps MSE + vb; not comparable). Training process CPU seconds per run "
       f"(mean): transport {cpu('transport')}, gaussian {cpu('gaussian')}.", ""]
  cols = ["objective", "sampler", "natural", "NFE"]
  if len(seeds) > 1:
    cols += [f"FDD s{sd}" for sd in seeds] + ["FDD mean"] + [f"acc s{sd}" for sd in seeds] + \
        ["acc mean"]
    table_rows = rows
  else:
    cols += ["FDD", "accuracy"]
    table_rows = [{**r, "FDD": r["FDD mean"], "accuracy": r["acc mean"]} for r in rows]
  fmt = {c: (".1f" if c.startswith("FDD") else ".3f") for c in cols
         if c.startswith(("FDD", "acc"))}
  L += [md_table(table_rows, cols, fmt), ""]
  L += objectives_observations(rows, seeds, o["nfe"])
  return L


def objectives_observations(rows: list[dict], seeds: list[int], nfe: int) -> list[str]:
  """Bullets computed from the rows: natural vs natural, the best sampler of each objective with
  exactly `nfe` network evaluations, whether the ordering holds for every seed, conditioning."""
  def pick(obj, keep):
    c = [r for r in rows if r["objective"] == obj and keep(r)]
    return min(c, key=lambda r: r["FDD mean"]) if c else None

  def natural(r):
    return r["natural"] == "yes"

  def matched(r):
    return r["NFE"] == nfe

  out = []
  pairs = [("Natural samplers", pick("transport", natural), pick("gaussian", natural)),
           (f"Best at {nfe} NFE", pick("transport", matched), pick("gaussian", matched))]
  for title, t, g in pairs:
    if t is None or g is None:
      continue
    better = "transport" if t["FDD mean"] < g["FDD mean"] else "gaussian"
    per_seed = [sd for sd in seeds if t.get(f"FDD s{sd}") is not None and
                g.get(f"FDD s{sd}") is not None]
    agree = [sd for sd in per_seed if (t[f"FDD s{sd}"] < g[f"FDD s{sd}"]) ==
             (better == "transport")]
    txt = (f"- **{title}.** transport {t['sampler']} ({t['NFE']} NFE): FDD {t['FDD mean']:.1f}, "
           f"accuracy {t['acc mean']:.3f}; gaussian {g['sampler']} ({g['NFE']} NFE): FDD "
           f"{g['FDD mean']:.1f}, accuracy {g['acc mean']:.3f}"
           + (" (means over seeds)" if len(seeds) > 1 else "") + f". Lower FDD: {better}")
    if len(per_seed) > 1:
      txt += (f", in {len(agree)} of {len(per_seed)} seeds"
              + ("" if len(agree) == len(per_seed) else " (the seeds disagree: no verdict)"))
    out.append(txt + ".")
  acc = {obj: [r["acc mean"] for r in rows if r["objective"] == obj]
         for obj in ("transport", "gaussian")}
  if all(acc.values()):
    low = [obj for obj, v in acc.items() if max(v) < 0.3]
    out.append(f"- **Conditioning.** Conditional accuracy over the samplers: transport "
               f"{min(acc['transport']):.3f}-{max(acc['transport']):.3f}, gaussian "
               f"{min(acc['gaussian']):.3f}-{max(acc['gaussian']):.3f} (chance 0.1)"
               + (f"; {' and '.join(low)} has not yet learned the class conditioning at this "
                  f"budget, so its FDD compares mostly unconditional digit quality"
                  if len(low) == 1 else "") + ".")
  return out + [""] if out else []


def mediator_verdict(q: dict) -> list[str]:
  """One bullet: mediator models vs every full-attention training seed, per scored step."""
  rows = q["rows"]
  steps = sorted({r["step"] for r in rows})
  full = {st: [r["fdd"] for r in rows if r["mediators"] == 0 and r["step"] == st] for st in steps}
  med = {st: [r["fdd"] for r in rows if r["mediators"] != 0 and r["step"] == st] for st in steps}
  if not full[steps[-1]] or not med[steps[-1]]:
    return []
  below = [st for st in steps if full[st] and med[st] and max(med[st]) < min(full[st])]
  fin, mfin = full[steps[-1]], med[steps[-1]]
  noise = q.get("eval_noise_check")
  nspread = max(noise["fdd"]) - min(noise["fdd"]) if noise else None
  text = (f"- **Mediators vs full attention.** At step {steps[-1]} the mediator models (FDD "
          f"{min(mfin):.0f}-{max(mfin):.0f}) are "
          + ("below" if max(mfin) < min(fin) else "not all below")
          + f" full attention ({', '.join(f'{v:.0f}' for v in sorted(fin))} over "
          f"{len(fin)} training seed{'s' if len(fin) > 1 else ''}); all mediator models beat "
          f"every full-attention seed at step(s) {', '.join(map(str, below)) or 'none'} of "
          f"{', '.join(map(str, steps))}. The three n are within {max(mfin) - min(mfin):.1f} of "
          f"each other")
  if nspread is not None:
    text += f" (sampling-noise spread of one model: {nspread:.1f}): n does not matter here"
  text += ". "
  if len(fin) > 1:
    text += (f"Full attention's training-seed spread ({max(fin) - min(fin):.0f}) is of the order "
             f"of the mediators' margin over its better seed ({min(fin) - max(mfin):.0f}). ")
  else:
    text += "Training-seed noise was not measured. "
  text += ("The direction agrees with the paper (mediators help at S/2), but with one seed per "
           "mediator model and early-training models this is weak evidence, not a confirmation.")
  return [text]


def discussion(parts: dict) -> list[str]:
  """The closing section: what the numbers say and what was cut, from the payloads."""
  L = ["## Discussion and limits", ""]
  f = parts.get("flops")
  if f:
    r = {(x["model"], x["resolution"]): x for x in f["rows"]}
    ratios = [(x["resolution"], x[f"n={n} / full"]) for x in f["rows"] for n in f["mediators"]]
    lo = min(v for res, v in ratios if res == min(FLOPS_RES))
    hi = min(v for _, v in ratios)
    L.append(f"- **FLOPs.** At {min(FLOPS_RES)} px mediators save at most {1 - lo:.0%} of a "
             f"forward; the saving grows with resolution, down to {hi:.2f}x the full-attention "
             f"FLOPs at {max(FLOPS_RES)} px. n hardly matters: the attention core is linear in "
             f"n and small next to the linear layers.")
  s = parts.get("speed")
  if s:
    L.append("- **CPU time.** Measured n = 64 / full time ratios: " + ", ".join(
        f"{x['resolution']} px {x['time ratio']:.2f} (FLOPs {x['FLOPs ratio']:.2f})"
        for x in s["rows"]) + ". Where n equals the token count (128 px: 64 tokens) mediators "
        "only add work. With many tokens the measured saving can exceed the FLOPs saving: the "
        "full-attention forward then runs at a lower GFLOP/s than the mediator one (likely the "
        "N x N logits and softmax, which are memory-bound on a CPU; not profiled). One run on a "
        "shared CPU, full and mediator timed one after the other: treat single numbers as "
        "+-20%.")
  q = parts.get("quality")
  if q:
    L += mediator_verdict(q)
    tc = q.get("train_config") or {}
    model_txt = (f"a {tc['params'] / 1e6:.1f}M-parameter quickstart model, {q['train_steps']} "
                 f"steps at batch {tc['global_batch_size']} (the quickstart config trains "
                 f"{tc['quickstart_steps']:,})" if tc else
                 f"a quickstart-sized model, {q['train_steps']} steps (training config not "
                 f"recorded)")
    L.append(f"- **Quality vs steps.** The paper reports better FID with mediators at SiT-S/2 "
             f"(ImageNet 256, 400K steps). Here: {model_txt}, "
             f"{q['num_samples']} samples per point, {q['sample_steps']}-point Euler ODE. See "
             f"the observations of section 3 for what the numbers show; with models this "
             f"undertrained and few training seeds, they say which variant converges faster "
             f"early on, not whether the paper's claim holds at convergence.")
  d = parts.get("dynamic")
  if d:
    L.append(f"- **Dynamic schedule.** Models from step {d['train_steps']}, {d['num_samples']} "
             f"samples, {sum(r['rho'] is not None for r in d['rows'])} rho pairs. The GFLOPs "
             f"axis is exact accounting; "
             f"the quality axis inherits the noise of section 3. With a 64-token model the "
             f"FLOPs spread between n = 4 and n = 64 is small, so the schedule cannot save "
             f"much here; its real use is at high resolution.")
  if parts.get("dynamic") and parts.get("dynamic_sde"):
    L.append("- **ODE vs SDE for the schedule.** With the Euler ODE the rule hardly ever "
             "switches; with the Euler SDE (the paper's sampler) it does, and lower rho keeps "
             "samples longer at n = 4. A likely reason: on the linear path the ODE velocity "
             "changes little along a trajectory, so the L1 step d_k stays near its first-steps "
             "mean, while the SDE's diffusion term shrinks towards the data end. The rho values "
             "tuned on the official SDE sampler do not transfer to the ODE.")
  cut = []
  if q:
    saved = q.get("checkpoints", [])
    if q["train_steps"] < 3000:
      cut.append(f"training shortened to {q['train_steps']} steps per model (CPU budget: the "
                 f"2 shared cores made one run take 6-10 minutes)")
    if q["num_samples"] < 500:
      cut.append(f"{q['num_samples']} samples per evaluation instead of 500 (FDD is biased "
                 f"upwards at small N; compare only at equal N, the real-data floor is given)")
    if q["sample_steps"] < 50:
      cut.append(f"Euler ODE with {q['sample_steps']} grid points instead of ~50")
    if not any(r["seed"] != 0 for r in q["rows"]):
      cut.append("no second training seed (only a second sampling-noise draw for the full "
                 "model, when present)")
    if saved:
      cut.append(f"checkpoints scored: {', '.join(map(str, saved))}")
  if cut:
    L += ["", "What was cut to fit the budget:", ""] + [f"- {c}" for c in cut]
  L.append("")
  return L


# ----------------------------------------------------------------------------- CLI
def seeds_for(args, mediator_num: int) -> list[int]:
  """Training seeds for one attention variant: 0, plus seed 1 for --second_seed's variants."""
  extra = [int(v) for v in args.second_seed.split(",") if v.strip()] if args.second_seed else []
  return [0, 1] if mediator_num in extra else [0]


def eval_steps(args) -> list[int]:
  """Checkpoint steps to score: --eval_steps (a subset of the saved ones) or all saved."""
  saved = checkpoint_steps(args.train_steps, args.num_checkpoints)
  if not args.eval_steps:
    return saved
  want = [int(v) for v in args.eval_steps.split(",") if v.strip()]
  bad = [v for v in want if v not in saved]
  if bad:
    raise ValueError(f"--eval_steps {bad} are not saved checkpoints: with --train_steps "
                     f"{args.train_steps} --num_checkpoints {args.num_checkpoints} they are "
                     f"{saved}")
  return sorted(want)


def common_flags(args) -> list[str]:
  out = [f"--train_steps {args.train_steps}", f"--num_checkpoints {args.num_checkpoints}",
         f"--num_samples {args.num_samples}", f"--sample_steps {args.sample_steps}"]
  if args.eval_steps:
    out.append(f"--eval_steps {args.eval_steps}")
  if args.second_seed:
    out.append(f"--second_seed {args.second_seed}")
  return out


def read_parts(results_dir=RESULTS_DIR) -> tuple[dict, dict]:
  """({part: payload} for every report_<part>.json present, {"objectives": payload} when
  benchmarks/gaussian_vs_transport.py's JSON is present): everything build_markdown renders."""
  parts = {p: read_part(p, results_dir) for p in PARTS}
  parts = {k: v for k, v in parts.items() if v}
  objectives = pathlib.Path(results_dir) / "gaussian_vs_transport.json"
  extra = {"objectives": json.loads(objectives.read_text())} if objectives.exists() else {}
  return parts, extra


def render(out: pathlib.Path, results_dir=RESULTS_DIR, plots_dir=PLOTS_DIR) -> str:
  """Rebuilds the Markdown and the PNGs from every report_<part>.json present."""
  parts, extra = read_parts(results_dir)
  plotters = {"flops": plot_flops, "speed": plot_speed, "quality": plot_quality,
              "dynamic": plot_dynamic, "dynamic_sde": plot_dynamic,
              "elastic": _plot_elastic}
  plots = {}
  for name, payload in parts.items():
    png = plotters[name](payload, pathlib.Path(plots_dir) / f"{name}.png")
    plots[name] = os.path.relpath(png, out.parent)
  text = build_markdown(parts | extra, plots)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out} ({', '.join(parts) or 'no parts yet'})", flush=True)
  return text


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="docs/results.md", help="Markdown report to write")
  ap.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)}")
  ap.add_argument("--render_only", action="store_true",
                  help="only rebuild the Markdown/PNGs from the existing JSON results")
  ap.add_argument("--runs", default=str(ROOT / "runs" / "report"),
                  help="cache of training workdirs (resumed/skipped when finished)")
  ap.add_argument("--skip_train", action="store_true", help="never train; use finished runs only")
  ap.add_argument("--train_steps", type=int, default=600)
  ap.add_argument("--num_checkpoints", type=int, default=4)
  ap.add_argument("--second_seed", default="0",
                  help="mediator counts (0 = full) to also train with seed 1, e.g. '0'")
  ap.add_argument("--eval_steps", default="150,300,600",
                  help="comma-separated subset of the saved checkpoint steps to score; '' = all")
  ap.add_argument("--num_samples", type=int, default=300)
  ap.add_argument("--sample_steps", type=int, default=30, help="Euler ODE grid points")
  ap.add_argument("--eval_seed", type=int, default=0)
  ap.add_argument("--rho", type=parse_rho_pairs,
                  default=RHO_PAIRS, help="rho1:rho2 pairs, e.g. 0.9:0.8,0.6:0.4")
  ap.add_argument("--no_noise_check", dest="noise_check", action="store_false",
                  help="skip re-scoring the final full model on a second noise draw")
  ap.add_argument("--speed_repeats", type=int, default=5)
  ap.add_argument("--elastic_config", default="configs/elastic_study.py",
                  help="study settings of the elastic part: FILE[:preset]")
  ap.add_argument("--elastic_cached_only", action="store_true",
                  help="elastic part: render finished runs and cached evaluations only (no "
                       "training, no sampling)")
  ap.add_argument("--refresh_floor", action="store_true",
                  help="only recompute the real-data floor of the existing quality results "
                       "(stratified held-out digits), then render")
  args = ap.parse_args(argv)
  args.results_dir = RESULTS_DIR
  parts = parse_parts(args.parts)
  eval_steps(args)  # validates early
  logging.basicConfig(level=logging.WARNING)
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
  if args.refresh_floor:
    refresh_floor(args)
  if not args.render_only:
    runners = {"flops": run_flops, "speed": run_speed, "quality": run_quality,
               "dynamic": run_dynamic, "dynamic_sde": run_dynamic_sde,
               "elastic": run_elastic}
    for p in parts:
      print(f"== {p}", flush=True)
      runners[p](args)
  render(ROOT / args.out if not pathlib.Path(args.out).is_absolute() else pathlib.Path(args.out))


if __name__ == "__main__":
  main()
