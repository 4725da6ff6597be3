"""Elastic-mediator quality study (report part "elastic"; settings: configs/elastic_study.py).

    python benchmarks/report.py --parts elastic --out docs/results.md      # train, score, render
    python benchmarks/elastic_study.py --config configs/elastic_study.py:quick   # smoke run only

Per seed: full attention, static n = 4 / 16 / 64 and one elastic model (edit_jax.elastic) trained
with the quickstart recipe for the same number of steps; every model (the elastic one at each n)
samples the same noise/labels with the same guided fixed-step sampler; the step-wise dynamic
schedule runs over the three static checkpoints and over the one elastic checkpoint for each rho
pair. All sampling goes through `edit_jax.diffusion.dynamic.DynamicSampler` (a one-model
"schedule" for the static points), so static and dynamic points share noise streams and FLOPs
accounting. Scores: edit_jax.eval.digits (Frechet digit distance, conditional accuracy).

`run(spec)` returns the JSON payload (benchmarks/results/report_elastic.json); `plot(payload, png)`
and `markdown(payload, png_rel)` render it. Training runs and evaluations are cached under the
config's `runs_dir`; reruns resume.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

DEFAULT_SPEC = "configs/elastic_study.py"


# ----------------------------------------------------------------------------- config
def load_study(spec: str = DEFAULT_SPEC):
  """'configs/elastic_study.py[:preset]' -> the study ConfigDict."""
  path, _, preset = spec.partition(":")
  p = pathlib.Path(path)
  if not p.is_absolute():
    p = ROOT / p
  if not p.is_file():
    raise ValueError(f"study config {path!r} not found (expected e.g. {DEFAULT_SPEC}[:quick])")
  mod_spec = importlib.util.spec_from_file_location("elastic_study_config", p)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(preset)


def variants(study) -> list[dict]:
  """The trained models of one seed: full, static n..., elastic."""
  out = [{"name": "full", "mediator_num": 0, "elastic": False}]
  out += [{"name": f"static n={n}", "mediator_num": int(n), "elastic": False}
          for n in study.mediators]
  out.append({"name": "elastic", "mediator_num": int(study.elastic_default_n), "elastic": True})
  return out


def train_order(study) -> list[dict]:
  """`variants` in the order a seed trains them: full, the smallest static n, the elastic model,
  then the other static n, each scored as soon as it is trained, so a seed cut short still holds
  the elastic-vs-static comparison at the smallest n."""
  vs = variants(study)
  return [vs[0], vs[1], vs[-1]] + vs[2:-1]


def run_name(v: dict, steps: int, seed: int) -> str:
  tag = "elastic" if v["elastic"] else ("full" if not v["mediator_num"] else
                                        f"med{v['mediator_num']}")
  return f"{tag}_steps{steps}_seed{seed}"


def train_config(study, v: dict, seed: int):
  """configs/quickstart.py with the seed, step budget and attention variant of the study."""
  sys.path.insert(0, str(ROOT / "configs"))
  import quickstart  # noqa: PLC0415
  c = quickstart.get_config()
  c.seed = int(seed)
  c.num_train_steps = int(study.train_steps)
  c.max_train_seconds = 0.0            # equal step budgets, whatever the machine load
  c.checkpoint_every = int(study.train_steps)
  c.keep_checkpoints = 1
  c.log_every = min(c.log_every, int(study.train_steps))
  c.sample.every = 0                   # the study samples itself
  c.model.mediator_num = int(v["mediator_num"])
  if v["elastic"]:
    c.model.elastic_grid = int(study.elastic_grid)
    c.elastic.mediators = ",".join(str(n) for n in study.mediators)
    c.elastic.mode = study.elastic_mode
  return c


def ensure_trained(study, v: dict, seed: int, skip_train: bool) -> pathlib.Path | None:
  """Trains (or resumes) one run; returns its workdir (None when missing and skip_train)."""
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  wd = ROOT / study.runs_dir / run_name(v, study.train_steps, seed)
  ck = ckpt_lib.checkpoint_dir(str(wd))
  if ck.exists() and ckpt_lib.Checkpointer(ck, read_only=True).latest_step() == study.train_steps:
    return wd
  if skip_train:
    print(f"--skip_train: {wd} is not finished; skipping it", flush=True)
    return None
  from edit_jax import train  # noqa: PLC0415
  cfg = train_config(study, v, seed)
  rec_path = wd / "study_train_time.json"
  # backward_fix: timed with the materialized-cotangent backward pass (issue 15, ~2x faster
  # train step than before); runs timed before it carry no such key.
  rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {
      "wall_seconds": 0.0, "cpu_seconds": 0.0, "steps_timed": 0, "sessions": 0,
      "backward_fix": True}
  t0, c0 = time.perf_counter(), time.process_time()
  start = ckpt_lib.Checkpointer(ck, read_only=True).latest_step() if ck.exists() else None
  result = train.train_and_evaluate(cfg, str(wd))
  rec["wall_seconds"] += time.perf_counter() - t0   # summed over sessions when resumed
  rec["cpu_seconds"] += time.process_time() - c0
  rec["steps_timed"] += int(result["step"]) - int(start or 0)
  rec["sessions"] += 1
  rec.update(steps=int(study.train_steps), complete=result["stopped"] == "done",
             load_average_end=list(__import__("os").getloadavg()))
  rec_path.write_text(json.dumps(rec))
  if result["stopped"] != "done":
    raise SystemExit(f"training {wd.name} stopped ({result['stopped']}) at step "
                     f"{result['step']}: rerun the same command to resume")
  print(f"trained {wd.name}: {rec['wall_seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU",
        flush=True)
  return wd


def train_cost(study, v: dict, wd: pathlib.Path) -> dict:
  """Measured time (when recorded) and analytic training FLOPs (3 x forward per example)."""
  from edit_jax import elastic, flops, train  # noqa: PLC0415
  cfg = train_config(study, v, 0)
  model = train.get_model(cfg)
  if v["elastic"]:
    sel = elastic.StepSelector(model, None, lambda f: f, mediators=study.mediators,
                               mode=study.elastic_mode)
    fwd = sel.forward_gflops()
  else:
    fwd = flops.gflops(model)
  out = {"train_gflops": 3.0 * fwd * cfg.global_batch_size * study.train_steps,
         "forward_gflops_per_example": fwd}
  rec = wd / "study_train_time.json"
  if rec.is_file():
    out.update(json.loads(rec.read_text()))
  return out


RESULTS_JSON = ROOT / "benchmarks" / "results" / "report_elastic.json"


def expected_rows(study) -> int:
  """Rows of one complete seed: full, static and elastic at each n, two schedules per rho."""
  return 1 + 2 * len(study.mediators) + 2 * len(study.rho)


def committed_seeds(study, path=None) -> dict:
  """{seed: {"rows", "train"}} of the seeds that are complete in the committed report JSON for
  the same study settings (steps, mediators, grid, mode, evaluation), so a fresh clone without
  `runs_dir` resumes the study instead of redoing finished seeds."""
  path = pathlib.Path(path or RESULTS_JSON)
  if not path.is_file():
    return {}
  old = json.loads(path.read_text())
  def norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v

  same = ("train_steps", "mediators", "elastic_grid", "elastic_mode")
  if old.get("eval_key") != eval_key(study) or any(
      norm(old["study"].get(k)) != norm(study[k]) for k in same):
    return {}
  rhos = [list(r) for r in study.rho]
  out = {}
  for seed in study.seeds:
    rs = [r for r in old["rows"] if r["seed"] == seed and (r["kind"] == "static" or
                                                            r.get("rho") in rhos)]
    if len(rs) >= expected_rows(study):
      out[seed] = {"rows": rs, "train": [t for t in old["train"] if t["seed"] == seed]}
  return out


# ----------------------------------------------------------------------------- evaluation
def sampler_config(ev):
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  if ev.kind == "sde":
    return samplers.SDEConfig(method=ev.method, num_steps=int(ev.num_steps))
  return samplers.ODEConfig(method=ev.method, num_steps=int(ev.num_steps))


def eval_inputs(num_samples: int, seed: int):
  """Fixed noise (N, 32, 32, 1), labels 0..9 cycled (N,), and N per-sample PRNG keys."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((num_samples, 32, 32, 1)).astype(np.float32)
  y = (np.arange(num_samples) % 10).astype(np.int32)
  return x0, y, samplers.per_sample_keys(jax.random.key(seed), num_samples)


def eval_key(study) -> str:
  ev = study.eval.to_dict()
  blob = json.dumps({**ev, "first_several": study.first_several, "distance": study.distance},
                    sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:10]


class Scorer:
  """Digit classifier + reference digits; `score(images, labels)` -> {"fdd", "accuracy"}."""

  def __init__(self):
    from edit_jax.eval import digits  # noqa: PLC0415
    self.digits = digits
    self.train_x, _, self.held_x, self.held_y = digits.digits_split()
    self.params, self.info = digits.load_or_train_classifier()

  def score(self, images, labels) -> dict:
    import numpy as np  # noqa: PLC0415
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return {"fdd": float(self.digits.frechet_digit_distance(x, self.train_x, params=self.params)),
            "accuracy": float(self.digits.conditional_accuracy(x, labels, params=self.params))}

  def real_floor(self, n: int) -> dict:
    """n held-out real digits (stratified: the first n/10 of each class) scored the same way."""
    import numpy as np  # noqa: PLC0415
    per = max(1, n // 10)
    idx = np.concatenate([np.nonzero(self.held_y == c)[0][:per] for c in range(10)])
    return {"num": int(idx.size), **self.score(self.held_x[idx], self.held_y[idx])}


def make_sampler(study, models_, params, rule_ratios, batch: int):
  """A DynamicSampler over (models_, params) with the study's sampler and guidance (one model:
  a static sampler with the same noise streams and FLOPs accounting)."""
  from edit_jax.diffusion import dynamic, transport  # noqa: PLC0415
  ev = study.eval
  gch = None if ev.guide_channels is None or ev.guide_channels < 0 else int(ev.guide_channels)
  rule = dynamic.SwitchRule(tuple(rule_ratios), study.first_several, study.distance)
  return dynamic.DynamicSampler(models_, params, transport.create_transport(),
                                sampler_config(ev), rule, batch_size=batch,
                                cfg_scale=float(ev.cfg_scale), guide_channels=gch,
                                bucket_sizes=(batch,) if len(models_) == 1 else None)


def _run_eval(ds, rule_ratios, study, x0, y, keys, scorer) -> dict:
  """Samples with `ds` under the rule's ratios and scores the images."""
  import numpy as np  # noqa: PLC0415
  from edit_jax.diffusion import dynamic  # noqa: PLC0415
  rule = dynamic.SwitchRule(tuple(rule_ratios), study.first_several, study.distance)
  c0 = time.process_time()
  res = ds.sample(x0, y, rng=keys, rule=rule)
  s = res.summary()
  out = {**scorer.score(np.asarray(res.x), y), "gflops_per_image": s["gflops_per_sample_mean"],
         "steps_per_stage": [round(v, 2) for v in s["steps_per_stage_mean"]],
         "nfe": float(s["nfe_per_sample"]), "sample_cpu_seconds": time.process_time() - c0}
  return out


def evaluate_seed(study, seed: int, wds: dict, scorer, x0, y, keys,
                  cached_only: bool = False) -> list[dict]:
  """Every quality and dynamic row of one seed (cached per run directory); `cached_only`: return
  the cached rows without sampling anything new."""
  from edit_jax import checkpoint as ckpt_lib, elastic  # noqa: PLC0415
  cache = ROOT / study.runs_dir / f"evals_{eval_key(study)}" / f"seed{seed}.json"
  rows = json.loads(cache.read_text()) if cache.is_file() else []
  done = {(r["kind"], r["model"], str(r.get("rho"))) for r in rows}
  if cached_only:
    return rows

  def want(kind, model, rho=None):
    return (kind, model, str(rho)) not in done

  def add(row):
    rows.append({"seed": seed, **row})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    print(f"seed {seed} {row['kind']} {row['model']} rho={row.get('rho')}: FDD "
          f"{row['fdd']:.2f} acc {row['accuracy']:.3f} GFLOPs/img "
          f"{row['gflops_per_image']:.3f} stages {row.get('steps_per_stage')}", flush=True)

  loaded = {name: ckpt_lib.load_params_for_sampling(str(wd), ema=True)
            for name, wd in wds.items()}
  # static points: each static model, and the elastic model at each n
  for name, (model, params) in loaded.items():
    targets = ([(f"elastic n={n}", elastic.at(model, n)) for n in study.mediators]
               if elastic.is_elastic(model) else [(name, model)])
    for label, m in targets:
      if want("static", label):
        ds = make_sampler(study, [m], [params], (), len(x0))
        add({"kind": "static", "model": label, "mediator_num": int(m.mediator_num),
             **_run_eval(ds, (), study, x0, y, keys, scorer)})
  # dynamic schedules: three static checkpoints, and the one elastic checkpoint
  schedules = {}
  statics = [f"static n={n}" for n in study.mediators]
  if all(s in loaded for s in statics):
    schedules["three static"] = ([loaded[s][0] for s in statics],
                                 [loaded[s][1] for s in statics])
  if "elastic" in loaded:
    em, ep = loaded["elastic"]
    schedules["one elastic"] = ([elastic.at(em, n) for n in study.mediators],
                                [ep] * len(study.mediators))
  for label, (ms, ps) in schedules.items():
    todo = [tuple(r) for r in study.rho if want("dynamic", label, list(r))]
    if not todo:
      continue
    ds = make_sampler(study, ms, ps, todo[0], len(x0))
    for rho in todo:
      add({"kind": "dynamic", "model": label, "rho": list(rho),
           **_run_eval(ds, rho, study, x0, y, keys, scorer)})
  return rows


def run(spec: str = DEFAULT_SPEC, skip_train: bool = False, only_train: bool = False,
        cached_only: bool = False) -> dict | None:
  """Trains what is missing, evaluates, returns the payload (None when nothing is trained).
  `cached_only`: no training and no sampling; the payload holds the finished runs and the cached
  evaluations (to render a partial study while the rest is still to run)."""
  skip_train = skip_train or cached_only
  study = load_study(spec)
  trained: dict[int, dict] = {}
  costs, rows = [], []
  scorer = x0 = y = keys = None
  prior = committed_seeds(study)
  for seed in study.seeds:  # seed-major: every finished seed is complete (train, then score)
    if seed in prior and not (ROOT / study.runs_dir / run_name(
        next(v for v in variants(study) if v["elastic"]), study.train_steps, seed)).exists():
      # complete in the committed JSON and not trained here (e.g. a fresh clone): reuse it
      print(f"seed {seed}: complete in {RESULTS_JSON.relative_to(ROOT)}; reusing its rows",
            flush=True)
      rows += prior[seed]["rows"]
      costs += prior[seed]["train"]
      trained.setdefault(seed, {})
      continue
    for v in train_order(study):
      wd = ensure_trained(study, v, seed, skip_train)
      if wd is None:
        continue
      trained.setdefault(seed, {})[v["name"]] = wd
      costs.append({"seed": seed, "model": v["name"], **train_cost(study, v, wd)})
      if not (only_train or cached_only):
        if scorer is None:
          scorer = Scorer()
          x0, y, keys = eval_inputs(int(study.eval.num_samples), int(study.eval.eval_seed))
        evaluate_seed(study, seed, {v["name"]: wd}, scorer, x0, y, keys)  # its static points
    if only_train or seed not in trained:
      continue
    if scorer is None:
      scorer = Scorer()
      x0, y, keys = eval_inputs(int(study.eval.num_samples), int(study.eval.eval_seed))
    # the dynamic schedules once every model of the seed is there; all rows from the cache
    rows += evaluate_seed(study, seed, trained[seed], scorer, x0, y, keys, cached_only)
  if only_train or not trained:
    return None
  if scorer is None:
    scorer = Scorer()
  from edit_jax import flops, train  # noqa: PLC0415
  base = train.get_model(train_config(study, variants(study)[0], 0))
  return {
      "command": "python benchmarks/report.py --parts elastic"
                 + ("" if spec == DEFAULT_SPEC else f" --elastic_config {spec}"),
      "study": study.to_dict(), "eval_key": eval_key(study),
      "model": {"hidden_size": base.hidden_size, "depth": base.depth, "patch_size":
                base.patch_size, "tokens": base.num_tokens,
                "gflops_forward": {("full" if n == 0 else f"n={n}"): flops.gflops(
                    base.clone(mediator_num=n)) for n in (0,) + tuple(study.mediators)}},
      "classifier": scorer.info, "real_reference": scorer.real_floor(int(study.eval.num_samples)),
      "rows": rows, "train": costs, "load_average": list(__import__("os").getloadavg())}


# ----------------------------------------------------------------------------- analysis
def mean_std(values) -> tuple[float, float]:
  import numpy as np  # noqa: PLC0415
  a = np.asarray(values, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def summarize(payload: dict) -> dict:
  """Seed means/stds of every static and dynamic point, and the verdicts on the two targets."""
  import numpy as np  # noqa: PLC0415
  rows = payload["rows"]
  ms = list(payload["study"]["mediators"])
  seeds = sorted({r["seed"] for r in rows})

  def agg(sel):
    out = {}
    for key in ("fdd", "accuracy", "gflops_per_image"):
      vals = [r[key] for r in sel]
      out[key] = mean_std(vals) if vals else (float("nan"), float("nan"))
    out["n_seeds"] = len(sel)
    return out

  static = {}
  for label in ["full"] + [f"static n={n}" for n in ms] + [f"elastic n={n}" for n in ms]:
    sel = [r for r in rows if r["kind"] == "static" and r["model"] == label]
    if sel:
      static[label] = agg(sel)
  dyn = {}
  for label in ("three static", "one elastic"):
    for rho in payload["study"]["rho"]:
      sel = [r for r in rows if r["kind"] == "dynamic" and r["model"] == label and
             r["rho"] == list(rho)]
      if sel:
        a = agg(sel)
        a["steps_per_stage"] = np.mean([r["steps_per_stage"] + [0] * (len(ms) -
                                        len(r["steps_per_stage"])) for r in sel], 0).tolist()
        dyn[(label, tuple(rho))] = a
  # target 1: elastic within one (static) std of static at every n, on each metric, over the
  # seeds that have both points; undecided (None) with fewer than 2 such seeds (no seed std)
  def pick(kind, model, seed, rho=None):
    return next((r for r in rows if r["kind"] == kind and r["model"] == model and
                 r["seed"] == seed and (rho is None or r.get("rho") == list(rho))), None)

  t1 = []
  for n in ms:
    both = [sd for sd in seeds if pick("static", f"static n={n}", sd) and
            pick("static", f"elastic n={n}", sd)]
    if not both:
      continue
    for key in ("fdd", "accuracy"):
      sv = [pick("static", f"static n={n}", sd)[key] for sd in both]
      ev = [pick("static", f"elastic n={n}", sd)[key] for sd in both]
      st_, el_ = mean_std(sv), mean_std(ev)
      diff = el_[0] - st_[0]
      t1.append({"n": n, "metric": key, "static": st_, "elastic": el_, "diff": diff,
                 "n_seeds": len(both),
                 "within": (abs(diff) <= st_[1]) if len(both) >= 2 else None,
                 "paired": mean_std([e - v for e, v in zip(ev, sv)])})
  # target 2: one-elastic schedule vs three-static schedule at equal GFLOPs (three-static curve
  # interpolated), over the seeds that have every rho point of both schedules
  t2 = []
  rhos = [tuple(r) for r in payload["study"]["rho"]]
  dseeds = [sd for sd in seeds if all(pick("dynamic", lab, sd, r) for r in rhos
                                      for lab in ("three static", "one elastic"))]

  def dagg(lab, rho):
    sel = [pick("dynamic", lab, sd, rho) for sd in dseeds]
    return {k: mean_std([r[k] for r in sel]) for k in ("fdd", "accuracy", "gflops_per_image")}

  three = sorted((v["gflops_per_image"][0], v["fdd"][0], v["accuracy"][0], v["fdd"][1])
                 for v in (dagg("three static", r) for r in rhos)) if dseeds else []
  if len(three) >= 2:
    gx = np.array([p[0] for p in three])
    for rho in rhos:
      v = dagg("one elastic", rho)
      g = v["gflops_per_image"][0]
      inside = gx.min() - 1e-9 <= g <= gx.max() + 1e-9
      f3 = float(np.interp(g, gx, [p[1] for p in three]))
      a3 = float(np.interp(g, gx, [p[2] for p in three]))
      s3 = float(np.interp(g, gx, [p[3] for p in three]))
      t2.append({"rho": list(rho), "gflops": g, "fdd_elastic": v["fdd"], "fdd_three": f3,
                 "acc_elastic": v["accuracy"], "acc_three": a3, "fdd_std_three": s3,
                 "inside_range": bool(inside), "n_seeds": len(dseeds),
                 "matches": (bool(inside and abs(v["fdd"][0] - f3) <= max(s3, v["fdd"][1]))
                             if len(dseeds) >= 2 else None)})
  complete = [sd for sd in seeds if
              sum(r["seed"] == sd and (r["kind"] == "static" or r.get("rho") in
                                       [list(x) for x in rhos]) for r in rows)
              >= 1 + 2 * len(ms) + 2 * len(rhos)]
  return {"seeds": seeds, "complete_seeds": complete, "static": static, "dynamic": dyn,
          "target_elastic": t1, "target_dynamic": t2}


def cost_table(payload: dict) -> list[dict]:
  """Training cost of each sampling option (one seed's runs; mean over seeds when measured)."""
  ms = payload["study"]["mediators"]
  tr = payload["train"]

  def per_model(name):
    sel = [r for r in tr if r["model"] == name]
    if not sel:
      return None
    return {"gflops": sel[0]["train_gflops"],
            "cpu": mean_std([r["cpu_seconds"] for r in sel if "cpu_seconds" in r]) if any(
                "cpu_seconds" in r for r in sel) else None,
            "wall": mean_std([r["wall_seconds"] for r in sel if "wall_seconds" in r]) if any(
                "wall_seconds" in r for r in sel) else None}

  out = []
  options = [("static n=64 only", [f"static n={ms[-1]}"]),
             ("three static (dynamic schedule)", [f"static n={n}" for n in ms]),
             ("one elastic (dynamic schedule, any n)", ["elastic"]),
             ("full attention", ["full"])]
  for label, names in options:
    parts = [per_model(n) for n in names]
    if any(p is None for p in parts):
      continue
    row = {"option": label, "runs": len(names),
           "train TFLOPs": sum(p["gflops"] for p in parts) / 1e3}
    if all(p["cpu"] for p in parts):
      row["CPU s (sum of runs)"] = sum(p["cpu"][0] for p in parts)
      row["wall s (sum of runs)"] = sum(p["wall"][0] for p in parts)
    out.append(row)
  return out


# ----------------------------------------------------------------------------- rendering
def plot(payload: dict, path) -> pathlib.Path:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  s = summarize(payload)
  ms = payload["study"]["mediators"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  xs = range(len(ms))
  for ax, key, ylab in ((axes[0], "fdd", "Frechet digit distance (lower = better)"),
                        (axes[1], "accuracy", "conditional accuracy")):
    for off, prefix, color in ((-0.1, "static", "C0"), (0.1, "elastic", "C3")):
      pts = [s["static"].get(f"{prefix} n={n}") for n in ms]
      ax.errorbar([x + off for x in xs], [p[key][0] if p else math.nan for p in pts],
                  yerr=[p[key][1] if p else 0 for p in pts], fmt="o", capsize=3, color=color,
                  label=f"{prefix} (one model per n)" if prefix == "static" else
                  "elastic (one model, all n)")
    full = s["static"].get("full")
    if full:
      m, sd = full[key]
      ax.axhspan(m - sd, m + sd, color="gray", alpha=0.2)
      ax.axhline(m, color="gray", lw=1, label="full attention (mean +- std)")
    ref = payload.get("real_reference")
    if ref:
      ax.axhline(ref[key], color="k", ls="--", lw=0.8, label=f"real digits (N={ref['num']})")
    ax.set_xticks(list(xs), [f"n={n}" for n in ms])
    ax.set_ylabel(ylab)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  ax = axes[2]
  for label, color, marker in (("three static", "C0", "s"), ("one elastic", "C3", "o")):
    pts = sorted(((v["gflops_per_image"][0], v["fdd"][0], v["fdd"][1], rho)
                  for (lab, rho), v in s["dynamic"].items() if lab == label))
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                  fmt=f"-{marker}", color=color, capsize=3, ms=4, label=f"dynamic, {label}")
  for label, color in ((f"static n={ms[-1]}", "C0"), (f"elastic n={ms[-1]}", "C3"),
                       (f"static n={ms[0]}", "C0"), (f"elastic n={ms[0]}", "C3")):
    p = s["static"].get(label)
    if p:
      ax.errorbar(p["gflops_per_image"][0], p["fdd"][0], yerr=p["fdd"][1], fmt="x",
                  color=color, capsize=3)
      ax.annotate(label, (p["gflops_per_image"][0], p["fdd"][0]), fontsize=6,
                  xytext=(3, -9), textcoords="offset points")
  ax.set_xlabel("GFLOPs per image (CFG doubling counted)")
  ax.set_ylabel("Frechet digit distance")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _pm(ms_, fmt, n_seeds: int = 2):
  """'mean +- std' (the value alone when it comes from one seed)."""
  if n_seeds < 2:
    return format(ms_[0], fmt)
  return f"{format(ms_[0], fmt)} +- {format(ms_[1], fmt)}"


RESUME_COMMAND = "python benchmarks/report.py --parts elastic --out docs/results.md"


def _verdict(flags) -> str:
  """'met' / 'not met' / 'undecided' from per-point verdicts (True / False / None)."""
  if not flags or any(f is None for f in flags):
    return "undecided"
  return "met" if all(flags) else "not met"


def markdown(payload: dict, png_rel: str | None, header: str) -> list[str]:
  """The section's Markdown lines: setup, status, tables, plot, target verdicts, costs, limits."""
  from benchmarks.report import md_table  # noqa: PLC0415
  st = payload["study"]
  ev = st["eval"]
  s = summarize(payload)
  ms = st["mediators"]
  ref = payload["real_reference"]
  nseeds = len(s["seeds"])
  done, planned = s["complete_seeds"], list(st["seeds"])
  sampler = (f"{'Euler-Maruyama SDE' if ev['kind'] == 'sde' else ev['method'] + ' ODE'}, "
             f"{ev['num_steps']} grid points, CFG {ev['cfg_scale']} on "
             f"{'all channels' if ev['guide_channels'] < 0 else str(ev['guide_channels']) + ' channels'}")
  L = ["## 6. Elastic mediators: one checkpoint for every n", "", header, "",
       "This section replaces sections 3-4 as evidence: those models were trained "
       "600 steps and their samples were classified as their label about 10 % of the time; "
       f"here every model is trained to the quickstart budget and sampled with guidance "
       f"(accuracies below).", ""]
  partial = [sd for sd in s["seeds"] if sd not in done]
  status = (f"**Status: {len(done)} of {len(planned)} planned training seeds complete** "
            f"(seeds {', '.join(map(str, done)) or 'none'}; the issue asks for >= 3)")
  if partial:
    status += (f"; seed(s) {', '.join(map(str, partial))} partly evaluated (their rows count "
               f"where present; the `seeds` column says how many seeds each figure averages)")
    want = (["full"] + [f"static n={n}" for n in ms] + [f"elastic n={n}" for n in ms]
            + [f"{lab} rho={tuple(r)}" for lab in ("three static", "one elastic")
               for r in st["rho"]])
    for sd in partial:
      have = {r["model"] if r["kind"] == "static" else f"{r['model']} rho={tuple(r['rho'])}"
              for r in payload["rows"] if r["seed"] == sd}
      missing = [w for w in want if w not in have]
      status += f"; seed {sd} still lacks: {', '.join(missing)}"
  status += (". Mean +- sample std where a figure has >= 2 seeds; a single value otherwise, and "
             "a target that needs a seed std is then 'undecided'. ")
  if len(done) < len(planned):
    status += (f"To finish the study (training runs and evaluations are cached and resume): "
               f"`{RESUME_COMMAND}`.")
  L += [status, ""]
  L += [f"Setup: `configs/quickstart.py` model ({payload['model']['depth']} blocks, width "
       f"{payload['model']['hidden_size']}, patch {payload['model']['patch_size']}, "
       f"{payload['model']['tokens']} tokens) trained {st['train_steps']} steps (the quickstart "
       f"recipe, no time limit) with seeds {', '.join(map(str, s['seeds']))}: full attention, "
       f"static n = {' / '.join(map(str, ms))} (one run each) and ONE elastic model "
       f"(`edit_jax.elastic`, {st['elastic_grid']}x{st['elastic_grid']} reference mediator grid, "
       f"n drawn {st['elastic_mode']}ly from {{{', '.join(map(str, ms))}}} every step). Same seed "
       f"= same initialisation and data order across variants. Each model (the elastic one at "
       f"each n) samples the same {ev['num_samples']} noises and labels (0..9 cycled, eval seed "
       f"{ev['eval_seed']}) with {sampler}, EMA weights. Metric: `edit_jax.eval.digits` (FDD vs "
       f"the 4,500 training digits; classifier held-out accuracy "
       f"{payload['classifier'].get('held_out_accuracy', float('nan')):.3f}). Real-data floor: "
       f"{ref['num']} held-out real digits (stratified) score FDD {ref['fdd']:.1f}, accuracy "
       f"{ref['accuracy']:.3f}. {nseeds} training seed(s) with results.", ""]
  rows = []
  for label in ["full"] + [f"static n={n}" for n in ms] + [f"elastic n={n}" for n in ms]:
    v = s["static"].get(label)
    if v:
      k = v["n_seeds"]
      rows.append({"model": label, "seeds": k, "FDD": _pm(v["fdd"], ".1f", k),
                   "accuracy": _pm(v["accuracy"], ".3f", k),
                   "GFLOPs/image": f"{v['gflops_per_image'][0]:.3f}"})
  L += ["### 6a. Static n vs the elastic model at n (equal training steps)", "",
        md_table(rows, ["model", "seeds", "FDD", "accuracy", "GFLOPs/image"]), ""]
  accs = [(lab, v["accuracy"][0]) for lab, v in s["static"].items()]
  if accs:
    low = [f"{lab} {a:.3f}" for lab, a in accs if a < 0.8]
    L += [("Every model reaches the issue's >= 80 % conditional accuracy (seed means)." if not low
           else "Below the issue's 80 % conditional accuracy (seed means): " + ", ".join(low)
           + "."), ""]
  if png_rel:
    L += [f"![elastic vs static, dynamic schedules]({png_rel})", "",
          "Left/middle: static and elastic at each n (error bars: seed std; grey band: full "
          "attention). Right: the dynamic schedule's quality vs GFLOPs per image (one point per "
          "rho pair), with the static n = 4 and n = 64 points.", ""]
  L += ["Target: elastic within one std (of the static runs' seed spread) at every n, on the "
        "seeds that have both points:", ""]
  for t in s["target_elastic"]:
    fmt = ".1f" if t["metric"] == "fdd" else ".3f"
    k = t["n_seeds"]
    verdict = ("undecided (one seed: no seed std)" if t["within"] is None else
               "within one std" if t["within"] else "NOT within one std")
    L.append(f"- n={t['n']} {t['metric']} ({k} seed{'s' if k > 1 else ''}): static "
             f"{_pm(t['static'], fmt, k)}, elastic {_pm(t['elastic'], fmt, k)}, difference "
             f"{t['diff']:+{fmt}}" + (f" (paired by seed {_pm(t['paired'], fmt, k)})" if k > 1
                                      else "") + f": {verdict}.")
  v1 = _verdict([t["within"] for t in s["target_elastic"]])
  decided = [t for t in s["target_elastic"] if t["within"] is not None]
  L += ["", f"**Target 1 {v1}** on this budget" + (
      f" ({sum(bool(t['within']) for t in decided)} of {len(decided)} (n, metric) pairs within "
      f"one std)." if decided else " (needs >= 2 seeds with both points)."), ""]
  drows = []
  for (label, rho), v in sorted(s["dynamic"].items(), key=lambda kv: (kv[0][0], kv[0][1])):
    k = v["n_seeds"]
    drows.append({"schedule": label, "rho": f"({rho[0]}, {rho[1]})", "seeds": k,
                  "GFLOPs/image": _pm(v["gflops_per_image"], ".3f", k),
                  "FDD": _pm(v["fdd"], ".1f", k), "accuracy": _pm(v["accuracy"], ".3f", k),
                  "steps at n": "/".join(f"{x:.1f}" for x in v["steps_per_stage"])})
  for label in (f"static n={ms[-1]}", f"elastic n={ms[-1]}", f"static n={ms[0]}"):
    v = s["static"].get(label)
    if v:
      k = v["n_seeds"]
      drows.append({"schedule": label, "rho": "-", "seeds": k, "GFLOPs/image":
                    _pm(v["gflops_per_image"], ".3f", k), "FDD": _pm(v["fdd"], ".1f", k),
                    "accuracy": _pm(v["accuracy"], ".3f", k), "steps at n": "-"})
  L += ["### 6b. Dynamic schedule: one elastic checkpoint vs three static checkpoints", "",
        f"Schedule n = {' -> '.join(map(str, ms))} (`edit_jax.diffusion.dynamic`, per-sample "
        f"switching, {st['distance'].upper()} distance, F = {st['first_several']}), same sampler "
        f"and noise as 6a. `steps at n`: mean sampler steps spent at each n. GFLOPs/image count "
        f"the guided (doubled) forwards of the n each sample used.", "",
        md_table(drows, ["schedule", "rho", "seeds", "GFLOPs/image", "FDD", "accuracy",
                         "steps at n"]), ""]
  if not s["dynamic"]:
    L += ["No dynamic-schedule evaluations yet: they run once all three static models and the "
          "elastic model of a seed are trained.", ""]
  L += ["Target: the one-checkpoint schedule matches the three-checkpoint schedule at equal "
        "GFLOPs (three-checkpoint FDD interpolated linearly at the elastic point's GFLOPs; "
        "'match' = difference within the larger of the two seed stds):", ""]
  for t in s["target_dynamic"]:
    k = t["n_seeds"]
    verdict = ("outside the three-static GFLOPs range" if not t["inside_range"] else
               "undecided (one seed: no seed std)" if t["matches"] is None else
               "match" if t["matches"] else "NO match")
    L.append(f"- rho {tuple(t['rho'])} ({k} seed{'s' if k > 1 else ''}): {t['gflops']:.3f} "
             f"GFLOPs/image, elastic FDD {_pm(t['fdd_elastic'], '.1f', k)} vs three-static "
             f"{t['fdd_three']:.1f}" + (f" (std {t['fdd_std_three']:.1f})" if k > 1 else "")
             + f"; accuracy {_pm(t['acc_elastic'], '.3f', k)} vs {t['acc_three']:.3f}: "
             f"{verdict}.")
  inside = [t for t in s["target_dynamic"] if t["inside_range"]]
  v2 = _verdict([t["matches"] for t in inside])
  L += ["", f"**Target 2 {v2}** for quality" + (
      f" ({sum(bool(t['matches']) for t in inside)} of {len(inside)} comparable rho points "
      f"match)." if inside and v2 != "undecided" else
      " (needs >= 2 seeds with every rho point of both schedules, and elastic points inside the "
      "three-static GFLOPs range)."), ""]
  crow = cost_table(payload)
  if crow:
    cols = [c for c in ["option", "runs", "train TFLOPs", "CPU s (sum of runs)",
                        "wall s (sum of runs)"] if any(c in r for r in crow)]
    pre = sorted({r["model"] for r in payload["train"]
                  if "cpu_seconds" in r and not r.get("backward_fix")})
    L += ["### 6c. Training cost of each option", "",
          "Analytic training FLOPs = 3 x forward GFLOPs x batch x steps (`edit_jax.flops`; the "
          "elastic run's forward is the mean over the n it draws): the primary cost figure. "
          "CPU/wall seconds: measured for each run on the shared 2-core CPU (mean over seeds, "
          "summed over the runs an option needs); other jobs ran at the same time (load average "
          "up to ~20), so treat them as +-30 % at best. Wall seconds also count any time the "
          "study was paused (SIGSTOP) to give timing benchmarks the machine, and the first "
          "stretch of some runs ran before the CPU allocator fix (edit_jax/hostmem.py, issue 15): "
          "compare options by FLOPs, then CPU seconds, not by wall time."
          + (f" Runs of {', '.join(pre)} were timed before the backward-pass fix (issue 15, "
             f"about 2x faster train step) and are not comparable with the later runs: compare "
             f"options by the FLOPs column." if pre else ""), "",
          md_table(crow, cols, {"train TFLOPs": ".2f", "CPU s (sum of runs)": ".0f",
                                "wall s (sum of runs)": ".0f"}), ""]
    three = next((r for r in crow if r["option"].startswith("three")), None)
    one = next((r for r in crow if r["option"].startswith("one elastic")), None)
    if three and one:
      L.append(f"The elastic option costs {one['train TFLOPs'] / three['train TFLOPs']:.2f} of "
               f"the three-model option's training FLOPs"
               + (f" and {one['CPU s (sum of runs)'] / three['CPU s (sum of runs)']:.2f} of its "
                  f"measured CPU time" if "CPU s (sum of runs)" in one and
                  "CPU s (sum of runs)" in three and not pre else "")
               + "; at sampling time it holds one parameter set instead of three.")
      L.append("")
  return L


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=DEFAULT_SPEC, help="study config[:preset]")
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--only_train", action="store_true")
  ap.add_argument("--cached_only", action="store_true",
                  help="no training, no sampling: summarize finished runs and cached evaluations")
  ap.add_argument("--out_json", default="", help="write the payload here (default: print a "
                  "summary only; benchmarks/report.py --parts elastic writes the report JSON)")
  args = ap.parse_args(argv)
  import logging  # noqa: PLC0415
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
  payload = run(args.config, args.skip_train, args.only_train, args.cached_only)
  if payload is None:
    return
  if args.out_json:
    pathlib.Path(args.out_json).write_text(json.dumps(payload, indent=2))
  s = summarize(payload)
  for k, v in s["static"].items():
    print(k, v)


if __name__ == "__main__":
  main()
