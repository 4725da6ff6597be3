"""EDT measurements: FLOPs/params of the official sizes, CPU forward time of EDT-S/2 vs SiT-S/2,
masked vs plain EDT training on digits, and the training-free AMM on a trained SiT and on EDT.

    python benchmarks/edt_study.py                          # every part (~40 min on 2 CPU cores)
    python benchmarks/edt_study.py --parts flops,speed      # the quick ones
    python benchmarks/edt_study.py --render_only            # rebuild the docs section from JSON

Parts (each writes benchmarks/results/edt_<part>.json; the Markdown section "EDT" of
docs/benchmarks.md is rebuilt from every JSON present, between the `<!-- edt_study:begin -->` and
`<!-- edt_study:end -->` markers; tests/test_docs_numbers.py checks it is exactly that):
  flops   analytic GFLOPs (edit_jax.flops; official `get_flops` convention and with norms) and
          parameters of EDT-S/B/XL-2 at 256 px vs the published table, the XL layout question,
          EDT-S/2 vs SiT-S/2.
  speed   jitted float32 forward time of EDT-S/2 (without and with AMM) vs SiT-S/2 at 256 px
          (32x32x4 latents), batch 1 and 8, random weights; variants interleaved, median / min of
          `--speed_repeats` rounds, wall and process CPU time.
  masked  configs/edt_digits.py `plain` vs `masked` trained for `--train_steps` steps (same seed,
          init, data order and schedule); EMA weights at every saved checkpoint sample
          `--num_samples` digits (Euler ODE, `--sample_steps` points, CFG `--cfg_scale` on all
          channels, fixed noise and labels 0..9), scored by the Frechet digit distance and the
          conditional accuracy (edit_jax.eval.digits); the final checkpoints also without AMM.
  amm_sit the quickstart SiT with full attention (configs/quickstart.py, mediator_num=0) trained
          for `--train_steps`; its final EMA weights sampled as above with AMM off and in
          several block sets (training-free: the same weights).
Training runs are cached in --runs (default runs/edt_study/, gitignored) and resume.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402  (machine description, tables, digit scoring)

RESULTS_DIR = ROOT / "benchmarks" / "results"
PARTS = ("flops", "speed", "masked", "amm_sit")
RUNNERS = PARTS + ("floor",)
BEGIN, END = "<!-- edt_study:begin -->", "<!-- edt_study:end -->"
SIT_AMM_SETS = ("none", "3", "2", "1,3", "all")


def write_part(part: str, payload: dict) -> pathlib.Path:
  path = RESULTS_DIR / f"edt_{part}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"part": part, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": report.machine_description(), "command": " ".join(sys.argv), **payload}
  path.write_text(json.dumps(payload, indent=2))
  print(f"wrote {path}", flush=True)
  return path


def read_part(part: str) -> dict | None:
  path = RESULTS_DIR / f"edt_{part}.json"
  return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- flops
def run_flops(args) -> dict:
  from edit_jax import flops, models  # noqa: PLC0415
  rows = []
  for name, res, g_stated, p_stated, _, _ in flops.PUBLISHED_EDT:
    m = flops.model_at(name, res)
    rows.append({"model": name, "layout": "-".join(map(str, m.stage_depths)),
                 "gflops_official": round(flops.gflops(m, norms=False), 3),
                 "gflops_with_norms": round(flops.gflops(m), 3), "gflops_stated": g_stated,
                 "params_m": round(models.count_params(models.abstract_params(m)) / 1e6, 2),
                 "params_stated_m": p_stated, "amm_blocks": list(m.amm_blocks)})
  alt = models.build_model("EDT-XL/2", input_size=32, stage_depths=(5, 5, 4, 7, 7))
  rows.append({"model": "EDT-XL/2 (12/12/4 split)", "layout": "5-5-4-7-7",
               "gflops_official": round(flops.gflops(alt, norms=False), 3),
               "gflops_with_norms": round(flops.gflops(alt), 3), "gflops_stated": 51.83,
               "params_m": round(models.count_params(models.abstract_params(alt)) / 1e6, 2),
               "params_stated_m": 708.4, "amm_blocks": []})
  sit = flops.model_at("SiT-S/2", 256)
  rows.append({"model": "SiT-S/2", "layout": "12 x 16x16",
               "gflops_official": round(flops.gflops(sit, norms=False), 3),
               "gflops_with_norms": round(flops.gflops(sit), 3), "gflops_stated": 6.06,
               "params_m": round(models.count_params(models.abstract_params(sit)) / 1e6, 2),
               "params_stated_m": 33.0, "amm_blocks": []})
  payload = {"rows": rows}
  write_part("flops", payload)
  return payload


# ----------------------------------------------------------------------------- speed
def run_speed(args) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from edit_jax import flops, models  # noqa: PLC0415
  variants = {
      "SiT-S/2": models.build_model("SiT-S/2", input_size=32),
      "EDT-S/2 (no AMM)": models.build_model("EDT-S/2", input_size=32, amm_layers="none"),
      "EDT-S/2 (AMM 7,10)": models.build_model("EDT-S/2", input_size=32),
  }
  rows = []
  for batch in args.speed_batches:
    fns = {}
    for name, m in variants.items():
      p = models.init_params(m, jax.random.key(0))
      x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 4))
      t = jnp_full(batch, 0.5)
      y = np.zeros((batch,), np.int32)
      f = jax.jit(lambda p, x, t, y, m=m: m.apply({"params": p}, x, t, y))
      jax.block_until_ready(f(p, x, t, y))  # compile
      jax.block_until_ready(f(p, x, t, y))  # warm
      fns[name] = (f, (p, x, t, y))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(args.speed_repeats):  # interleaved rounds
      for name, (f, a) in fns.items():
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*a))
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
    base = float(np.median(wall["SiT-S/2"]))
    for name, m in variants.items():
      rows.append({"model": name, "batch": batch, "gflops": round(flops.gflops(m), 3),
                   "median_s": round(float(np.median(wall[name])), 4),
                   "min_s": round(float(np.min(wall[name])), 4),
                   "cpu_median_s": round(float(np.median(cpu[name])), 4),
                   "time_vs_sit": round(float(np.median(wall[name])) / base, 3),
                   "flops_vs_sit": round(flops.gflops(m) / flops.gflops(variants["SiT-S/2"]), 3)})
    print(report.md_table(rows, list(rows[0])), flush=True)
  payload = {"rows": rows, "repeats": args.speed_repeats}
  write_part("speed", payload)
  return payload


def jnp_full(n, v):
  import numpy as np  # noqa: PLC0415
  return np.full((n,), v, np.float32)


# ----------------------------------------------------------------------------- training runs
def edt_config(preset: str, steps: int, num_checkpoints: int):
  sys.path.insert(0, str(ROOT / "configs"))
  import edt_digits  # noqa: PLC0415
  c = edt_digits.get_config(preset)
  c.num_train_steps = int(steps)
  c.checkpoint_every = report.checkpoint_steps(steps, num_checkpoints)[0]
  c.keep_checkpoints = num_checkpoints + 1
  c.log_every = min(c.log_every, c.checkpoint_every)
  c.sample.every = 0
  return c


def ensure(runs: pathlib.Path, name: str, cfg, skip_train: bool) -> pathlib.Path | None:
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  wd = runs / name
  ck = ckpt_lib.checkpoint_dir(str(wd))
  if ck.exists() and ckpt_lib.Checkpointer(ck, read_only=True).latest_step() == cfg.num_train_steps:
    return wd
  if skip_train:
    print(f"--skip_train: {wd} not finished; skipping", flush=True)
    return None
  from edit_jax import train  # noqa: PLC0415
  t0, c0 = time.perf_counter(), time.process_time()
  train.train_and_evaluate(cfg, str(wd))
  info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
          "steps": cfg.num_train_steps}
  (wd / "study_train_time.json").write_text(json.dumps(info))
  print(f"trained {name} in {info['seconds']:.0f} s", flush=True)
  return wd


def train_seconds(wd) -> dict:
  p = pathlib.Path(wd) / "study_train_time.json"
  return json.loads(p.read_text()) if p.is_file() else {}


def restore(wd, step):
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  return ckpt_lib.load_params_for_sampling(str(wd), ema=True, step=step)


class Evaluator:
  """Fixed noise/labels, the digit classifier and real digits; jitted guided Euler-ODE sampling
  per model (compiled once per architecture/AMM setting)."""

  def __init__(self, args):
    import numpy as np  # noqa: PLC0415
    from edit_jax import train  # noqa: PLC0415
    from edit_jax.eval import digits  # noqa: PLC0415
    self.args = args
    self.transport = train.get_transport(edt_config("plain", 10, 1))
    self.x0, self.y = report.eval_inputs(args.num_samples, args.eval_seed)
    self.real, _, _, _ = digits.digits_split()
    self.classifier, self.info = digits.load_or_train_classifier()
    self._fns = {}
    self.np = np

  def sample(self, model, params):
    import jax  # noqa: PLC0415
    from edit_jax.diffusion import samplers  # noqa: PLC0415
    from edit_jax import models  # noqa: PLC0415
    key = json.dumps(models.model_config(model), sort_keys=True, default=str)
    if key not in self._fns:
      fn = samplers.make_sample_fn(model, self.transport,
                                   samplers.ODEConfig(method="euler",
                                                      num_steps=self.args.sample_steps),
                                   cfg_scale=self.args.cfg_scale, guide_channels=None)
      self._fns[key] = jax.jit(lambda p, x0, y: fn(p, x0, y).x)
    f = self._fns[key]
    chunk = 100
    out = [self.np.asarray(f(params, self.x0[s:s + chunk], self.y[s:s + chunk]))
           for s in range(0, len(self.x0), chunk)]
    return self.np.concatenate(out)

  def score(self, model, params) -> dict:
    t0 = time.perf_counter()
    imgs = self.sample(model, params)
    r = report.score_digits(imgs, self.y, self.real, self.classifier)
    r["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return r


def run_masked(args, ev) -> dict | None:
  runs = pathlib.Path(args.runs)
  wds = {v: ensure(runs, f"edt-{v}-{args.train_steps}", edt_config(v, args.train_steps,
                                                                    args.num_checkpoints),
                   args.skip_train) for v in ("plain", "masked")}
  if any(w is None for w in wds.values()):
    return None
  rows = []
  steps = report.checkpoint_steps(args.train_steps, args.num_checkpoints)
  for step in steps:
    for v, wd in wds.items():
      model, params = restore(wd, step)
      amm_sets = ("official", "none") if step == args.train_steps else ("official",)
      for amm in amm_sets:
        m = model.clone(amm_layers=amm)
        r = ev.score(m, params)
        rows.append({"training": v, "step": step, "amm": "7,10" if amm == "official" else "off",
                     "fdd": round(r["fdd"], 1), "accuracy": round(r["accuracy"], 3),
                     "eval_s": r["eval_seconds"]})
        print(rows[-1], flush=True)
  payload = {"rows": rows, "train_time": {v: train_seconds(w) for v, w in wds.items()},
             "train_steps": args.train_steps, "num_samples": args.num_samples,
             "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale,
             "classifier": ev.info, "real_floor": real_floor(ev)}
  write_part("masked", payload)
  return payload


def real_floor(ev) -> dict:
  from edit_jax.eval import digits  # noqa: PLC0415
  _, _, hx, hy = digits.digits_split()
  return report.real_reference(ev.args.num_samples, ev.real, (hx, hy), ev.classifier)


def run_floor(args, ev) -> dict | None:
  m = read_part("masked")
  if m is None:
    print("floor: no edt_masked.json yet", flush=True)
    return None
  ev.args.num_samples = m["num_samples"]
  m["real_floor"] = real_floor(ev)
  path = RESULTS_DIR / "edt_masked.json"
  path.write_text(json.dumps(m, indent=2))
  print(f"updated the real-data floor in {path}: {m['real_floor']}", flush=True)
  return m


def sit_config(steps: int):
  sys.path.insert(0, str(ROOT / "configs"))
  import quickstart  # noqa: PLC0415
  c = quickstart.get_config()
  c.model.mediator_num = 0
  c.num_train_steps = int(steps)
  c.checkpoint_every = steps
  c.sample.every = 0
  c.max_train_seconds = 0.0
  return c


def run_amm_sit(args, ev) -> dict | None:
  wd = ensure(pathlib.Path(args.runs), f"sit-full-{args.train_steps}", sit_config(args.train_steps),
              args.skip_train)
  if wd is None:
    return None
  model, params = restore(wd, args.train_steps)
  rows = []
  for amm in SIT_AMM_SETS:
    m = model.clone(amm_layers=amm)
    r = ev.score(m, params)
    rows.append({"amm_blocks": "off" if amm == "none" else amm, "fdd": round(r["fdd"], 1),
                 "accuracy": round(r["accuracy"], 3), "eval_s": r["eval_seconds"]})
    print(rows[-1], flush=True)
  # sampling-noise spread of the baseline: the same weights on a second noise draw
  x0, y = ev.x0, ev.y
  ev.x0, ev.y = report.eval_inputs(args.num_samples, args.eval_seed + 1)
  r = ev.score(model.clone(amm_layers="none"), params)
  ev.x0, ev.y = x0, y
  payload = {"rows": rows, "train_time": train_seconds(wd), "train_steps": args.train_steps,
             "num_samples": args.num_samples, "sample_steps": args.sample_steps,
             "cfg_scale": args.cfg_scale, "noise_check_off": {k: round(v, 3) for k, v in r.items()}}
  write_part("amm_sit", payload)
  return payload


# ----------------------------------------------------------------------------- markdown
def _cmd(p):
  return (f"`python {p['command'].replace(str(ROOT) + '/', '')}` on {p['machine']}, {p['date']}")


def build_markdown(parts: dict) -> str:
  L = [BEGIN, "## EDT (`benchmarks/edt_study.py`)", "",
       "Generated by `python benchmarks/edt_study.py` (raw numbers: "
       "`benchmarks/results/edt_<part>.json`; `--render_only` rebuilds this section). Model "
       "details: [edt.md](edt.md).", ""]
  f = parts.get("flops")
  if f:
    cols = ["model", "layout", "gflops_official", "gflops_stated", "gflops_with_norms",
            "params_m", "params_stated_m", "amm_blocks"]
    L += ["### FLOPs and parameters at 256 px (analytic)", "", _cmd(f) + ".", "",
          report.md_table(f["rows"], cols), "",
          "`gflops_official` is the official `EDT.get_flops()` convention (matmul multiply-adds "
          "only; it reproduces the official count of the golden model exactly, tests/test_edt.py); "
          "`gflops_with_norms` adds the layer norms as the SiT FLOPs tables do. EDT-S/2 "
          "and EDT-B/2 reproduce the published 2.66 / 10.20 GFLOPs and 38.3 / 152.2 M parameters. "
          "The released EDT-XL/2 layout [6,4,4,7,7] (the official constructor; the goldens' key "
          "list of the full-size model has exactly these block shapes) costs 53.44 GFLOPs and "
          "698.52 M parameters, not the stated 51.83 / 708.4: those belong to 12 blocks at "
          "16x16, 12 at 8x8 and 4 at 4x4 (e.g. [5,5,4,7,7]).", ""]
  s = parts.get("speed")
  if s:
    cols = ["model", "batch", "gflops", "median_s", "min_s", "cpu_median_s", "time_vs_sit",
            "flops_vs_sit"]
    L += ["### Forward time at 256 px (CPU)", "", _cmd(s) + ".", "",
          report.md_table(s["rows"], cols), "",
          f"Median / min of {s['repeats']} interleaved rounds of jitted float32 forwards (random "
          "weights, 32x32x4 latents) after a warm-up; `cpu_median_s` is process CPU time. The "
          "CPU is shared with other jobs: compare ratios from the same run. The GPU numbers "
          "belong to the device check (issue 14).", ""]
  m = parts.get("masked")
  if m:
    cols = ["training", "step", "amm", "fdd", "accuracy"]
    tt = m.get("train_time", {})
    times = ", ".join(f"{k} {v.get('seconds', 0) / 60:.1f} min wall / "
                      f"{v.get('cpu_seconds', 0) / 60:.1f} min CPU" for k, v in tt.items())
    L += ["### Masked vs plain EDT training (digits)", "", _cmd(m) + ".", "",
          f"`configs/edt_digits.py` (`plain` / `masked`), {m['train_steps']} steps each, same "
          f"seed, initialisation, data order and schedule; {m['num_samples']} samples per row "
          f"(Euler ODE, {m['sample_steps']} points, CFG {m['cfg_scale']} on all channels, the "
          f"same noise and labels 0..9 for every row), EMA weights. Training time: {times}. "
          f"Real-data floor at the same N ({m['real_floor']['num']} held-out digits, "
          f"{m['real_floor']['num'] // 10} of each class): FDD {m['real_floor']['fdd']:.1f}, "
          f"accuracy {m['real_floor']['accuracy']:.3f}.", "",
          report.md_table(m["rows"], cols), ""]
    L += masked_observations(m) + [""]
  a = parts.get("amm_sit")
  if a:
    cols = ["amm_blocks", "fdd", "accuracy"]
    nc = a["noise_check_off"]
    L += ["### AMM on a trained SiT (training-free)", "", _cmd(a) + ".", "",
          f"The quickstart SiT with full attention (4 blocks, width 128, patch 4, 8x8 tokens; "
          f"`configs/quickstart.py` with `mediator_num=0`) trained {a['train_steps']} steps; the "
          f"same EMA weights sampled with AMM in the listed blocks ({a['num_samples']} samples, "
          f"Euler ODE {a['sample_steps']} points, CFG {a['cfg_scale']}, fixed noise). Sampling "
          f"noise of the baseline (AMM off, a second noise draw): FDD {nc['fdd']:.1f}, accuracy "
          f"{nc['accuracy']:.3f}.", "", report.md_table(a["rows"], cols), ""]
    L += amm_observations(a) + [""]
  L += [END]
  return "\n".join(L)


def masked_observations(m) -> list[str]:
  rows = m["rows"]
  final = m["train_steps"]
  get = lambda tr, st, amm: next((r for r in rows if r["training"] == tr and r["step"] == st  # noqa: E731
                                  and r["amm"] == amm), None)
  out = ["Observations (computed from the table):", ""]
  p, q = get("plain", final, "7,10"), get("masked", final, "7,10")
  if p and q:
    out.append(f"- At step {final} (AMM on): masked FDD {q['fdd']} vs plain {p['fdd']} "
               f"({q['fdd'] - p['fdd']:+.1f}); accuracy {q['accuracy']} vs {p['accuracy']}.")
  for tr in ("plain", "masked"):
    on, off = get(tr, final, "7,10"), get(tr, final, "off")
    if on and off:
      out.append(f"- AMM (blocks 7, 10) on the final {tr} model: FDD {off['fdd']} -> {on['fdd']} "
                 f"({on['fdd'] - off['fdd']:+.1f}), accuracy {off['accuracy']} -> "
                 f"{on['accuracy']}.")
  return out


def amm_observations(a) -> list[str]:
  rows = a["rows"]
  base = next(r for r in rows if r["amm_blocks"] == "off")
  noise = abs(a["noise_check_off"]["fdd"] - base["fdd"])
  out = ["Observations (computed from the table):", ""]
  for r in rows:
    if r is base:
      continue
    d = r["fdd"] - base["fdd"]
    verdict = "within sampling noise" if abs(d) <= noise else ("better" if d < 0 else "worse")
    out.append(f"- AMM in blocks {r['amm_blocks']}: FDD {d:+.1f} vs off ({verdict}; noise "
               f"{noise:.1f}), accuracy {r['accuracy'] - base['accuracy']:+.3f}.")
  return out


def render(path: pathlib.Path) -> str:
  parts = {p: read_part(p) for p in PARTS}
  parts = {k: v for k, v in parts.items() if v}
  section = build_markdown(parts)
  text = path.read_text() if path.is_file() else "# Benchmarks\n"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + section + rest.split(END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  path.write_text(text)
  print(f"wrote {path} ({', '.join(parts) or 'no parts yet'})", flush=True)
  return section


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--parts", default="flops,speed,masked,amm_sit")
  ap.add_argument("--out", default="docs/benchmarks.md")
  ap.add_argument("--render_only", action="store_true")
  ap.add_argument("--runs", default=str(ROOT / "runs" / "edt_study"))
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--train_steps", type=int, default=1000)
  ap.add_argument("--num_checkpoints", type=int, default=2)
  ap.add_argument("--num_samples", type=int, default=300)
  ap.add_argument("--sample_steps", type=int, default=30)
  ap.add_argument("--cfg_scale", type=float, default=3.0)
  ap.add_argument("--eval_seed", type=int, default=0)
  ap.add_argument("--speed_repeats", type=int, default=5)
  ap.add_argument("--speed_batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
  args = ap.parse_args(argv)
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  bad = [p for p in parts if p not in RUNNERS]
  if bad:
    ap.error(f"unknown parts {bad}; choose from {', '.join(RUNNERS)}")
  logging.basicConfig(level=logging.WARNING)
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
  if not args.render_only:
    ev = None
    for p in parts:
      print(f"== {p}", flush=True)
      if p in ("masked", "amm_sit", "floor"):
        ev = ev or Evaluator(args)
        {"masked": run_masked, "amm_sit": run_amm_sit, "floor": run_floor}[p](args, ev)
      else:
        {"flops": run_flops, "speed": run_speed}[p](args)
  out = pathlib.Path(args.out)
  render(out if out.is_absolute() else ROOT / out)


if __name__ == "__main__":
  main()
