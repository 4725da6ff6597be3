"""DyDiT: quality and measured speed of sparse sampling vs the base model (FLOPs ratio beside time).

Two studies, each writing one JSON:

  digits (fine-tuned models):
    python benchmarks/dydit_speed.py digits --base runs/quickstart \\
        --dydit 0.7=runs/dydit_quickstart_0.7 --dydit 0.5=runs/dydit_quickstart_0.5 \\
        --out benchmarks/results/dydit_digits.json
  Base = the quickstart SiT (EMA weights); each DyDiT = that model fine-tuned with
  configs/dydit_quickstart.py:<lambda>. Sampler = the quickstart's (heun2, 30 grid points, CFG 3
  on all channels). Quality: 500 samples (50 per class, fixed noise) scored with the offline digit
  classifier (edit_jax.eval.digits): Frechet digit distance vs the 4,500 training digits and
  conditional accuracy, for the base, the DyDiT dense-masked forward (what the public code runs)
  and the DyDiT sparse sampler (`edit_jax.diffusion.dydit.SparseSampler`, token capacities
  calibrated on a separate noise batch).

  synthetic (a larger model, random weights):
    python benchmarks/dydit_speed.py synthetic --name SiT-S/2 --input_size 32 \\
        --targets 0.7,0.5 --out benchmarks/results/dydit_s2_cpu.json
  SiT-S/2 at 256 px latent shapes (32x32x4, 256 tokens), random weights; the routers get random
  weights and one bias offset per router kind, bisected so the DyDiT FLOPs ratio on the sampler
  grid is about the target (no training: this measures the cost side only).

Speed: the same batch through each variant, interleaved (base, dense-masked, sparse, base, ...)
for --repeats rounds after one warm-up call each; median wall-clock seconds and median process CPU
seconds (time.process_time: less sensitive to other processes on a shared CPU). "time ratio" =
sparse / base; "FLOPs ratio" = executed GFLOPs / base GFLOPs per image (whole network incl.
embedders, routers, final layer; bucket padding and token capacities included); "block ratio" =
DyDiT's own accounting (blocks only, the training loss's ratio).

  render: python benchmarks/dydit_speed.py render
  rewrites the generated block of docs/dydit.md from the committed JSONs (checked by
  tests/test_docs_numbers.py).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from edit_jax import checkpoint, flops, models  # noqa: E402
from edit_jax.diffusion import dydit as ddy  # noqa: E402
from edit_jax.diffusion import guidance, samplers, transport as tr  # noqa: E402
from edit_jax.models import dydit  # noqa: E402


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict, repeats: int) -> dict:
  """{name: fn()} -> {name: {"wall_s": median, "cpu_s": median, "walls": [...]}}; one warm-up
  call each, then `repeats` rounds in a fixed interleaved order."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  walls = {k: [] for k in fns}
  cpus = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      w, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      walls[k].append(time.perf_counter() - w)
      cpus[k].append(time.process_time() - c)
  return {k: {"wall_s": float(np.median(walls[k])), "cpu_s": float(np.median(cpus[k])),
              "wall_min_s": float(np.min(walls[k])), "walls": [round(v, 4) for v in walls[k]]}
          for k in fns}


def block_ratio(model, sp, token_fraction, evals_forwards):
  """DyDiT's blocks-only FLOPs ratio of the grid (the loss's accounting), forward-weighted."""
  attn, mlp = flops.block_costs(model)
  tot = (attn + mlp).sum()
  plan = sp.plan
  num = den = 0.0
  i = 0
  for k in range(plan.head.shape[0]):
    ne = 1 if k >= sp.program.num_steps else plan.head.shape[1]
    for e in range(ne):
      tok = 1.0 if token_fraction is None else token_fraction[k, e]
      r = (attn * plan.head[k, e].mean(-1) + mlp * plan.group[k, e].mean(-1) * tok).sum() / tot
      num += evals_forwards[i] * r
      den += evals_forwards[i]
      i += 1
  return float(num / den)


def speed_rows(base, bp, dy, dp, transport, cfg, x0, y, calib_x0, args, label):
  """Timing + FLOPs rows for base / dense-masked / sparse at one batch."""
  gkw = dict(cfg_scale=args.cfg, guide_channels=None if args.guide_all else 3)
  base_fn = jax.jit(samplers.make_sample_fn(base, transport, cfg, **gkw))
  dense_fn = jax.jit(samplers.make_sample_fn(dy, transport, cfg, **gkw))
  t0 = time.perf_counter()
  sp = ddy.SparseSampler(dy, dp, transport, cfg, batch_size=len(y), bucket=args.bucket, **gkw)
  frac = sp.token_activity(calib_x0, y) if dy.token_routing else None
  if frac is not None:
    sp = sp.with_token_capacity(frac, capacity_margin=args.capacity_margin,
                                capacity_levels=args.capacity_levels)
  setup_s = time.perf_counter() - t0
  rng = jax.random.key(0)
  res = interleaved({
      "base": lambda: base_fn(bp, x0, y, rng).x,
      "dydit_dense": lambda: dense_fn(dp, x0, y, rng).x,
      "dydit_sparse": lambda: sp.sample(x0, y).x,
  }, args.repeats)
  dense_g, masked_g, exec_g = sp.gflops()
  base_g = dense_g  # the base network's GFLOPs per image over the run (CFG doubling counted)
  fwd = np.asarray(guidance.guidance_forwards(
      sp.program.eval_times(), args.cfg if args.cfg > 1 else 1.0, None))
  b = len(y)
  rows = []
  for name in ("base", "dydit_dense", "dydit_sparse"):
    r = res[name]
    g = {"base": base_g, "dydit_dense": base_g + sum(fwd) * dy.router_flops() / 1e9,
         "dydit_sparse": exec_g}[name]
    rows.append({"model": label, "variant": name, "batch": b,
                 "images_per_s": round(b / r["wall_s"], 2), "wall_s": round(r["wall_s"], 3),
                 "cpu_s": round(r["cpu_s"], 3), "time_ratio": round(r["wall_s"] /
                                                                    res["base"]["wall_s"], 3),
                 "cpu_ratio": round(r["cpu_s"] / res["base"]["cpu_s"], 3),
                 "gflops_per_image": round(g, 4), "flops_ratio": round(g / base_g, 3),
                 "walls": r["walls"]})
  info = {"signatures": sp.plan.num_signatures, "runs": len(sp.plan.runs),
          "setup_s": round(setup_s, 1), "masked_flops_ratio": round(masked_g / base_g, 3),
          "block_flops_ratio": round(block_ratio(dy, sp, frac, fwd), 3),
          "token_fraction_mean": None if frac is None else round(float(frac.mean()), 3),
          "head_fraction_mean": round(float(sp.plan.head.mean()), 3),
          "group_fraction_mean": round(float(sp.plan.group.mean()), 3)}
  return rows, info, sp


# ----------------------------------------------------------------------------- digits
def digits_study(args) -> dict:
  from edit_jax import train  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  base, bp = checkpoint.load_params_for_sampling(args.base)
  transport = tr.create_transport()
  cfg = samplers.ODEConfig(method=args.method, num_steps=args.num_steps)
  gkw = dict(cfg_scale=args.cfg, guide_channels=None if args.guide_all else 3)
  shape = (base.input_size, base.input_size, base.in_channels)
  n = args.quality_samples
  x0 = np.asarray(jax.random.normal(jax.random.key(args.seed), (n,) + shape))
  y = np.repeat(np.arange(10, dtype=np.int32), n // 10)
  calib = np.asarray(jax.random.normal(jax.random.key(args.seed + 1), (args.batch,) + shape))
  tx, _, _, _ = digits.digits_split()
  classifier, _ = digits.load_or_train_classifier()

  def score(x):
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    return {"fdd": round(float(digits.frechet_digit_distance(x, tx, params=classifier)), 3),
            "accuracy": round(float(digits.conditional_accuracy(x, y, params=classifier)), 4)}

  def chunks(fn, b):
    return np.concatenate([np.asarray(fn(x0[i:i + b], y[i:i + b])) for i in range(0, n, b)])

  b = args.batch
  base_fn = jax.jit(samplers.make_sample_fn(base, transport, cfg, **gkw))
  quality = [{"model": "base", "variant": "base", **score(chunks(
      lambda a, c: base_fn(bp, a, c).x, b))}]
  rows, infos = [], {}
  for spec in args.dydit:
    lam, wd = spec.split("=", 1)
    dy, dp = checkpoint.load_params_for_sampling(wd)
    if not isinstance(dy, dydit.DyDiT):
      raise SystemExit(f"{wd} is not a DyDiT checkpoint")
    label = f"dydit_{lam}"
    r, info, sp = speed_rows(base, bp, dy, dp, transport, cfg, x0[:b], y[:b], calib, args, label)
    rows += r
    infos[label] = info
    dense_fn = jax.jit(samplers.make_sample_fn(dy, transport, cfg, **gkw))
    xd = chunks(lambda a, c: dense_fn(dp, a, c).x, b)
    xs = chunks(lambda a, c: sp.sample(a, c).x, b)
    quality.append({"model": label, "variant": "dydit_dense", **score(xd)})
    quality.append({"model": label, "variant": "dydit_sparse", **score(xs),
                    "max_abs_diff_vs_dense": float(np.abs(xs - xd).max())})
  print(f"\nquality ({n} samples)")
  common.print_table(quality, ["model", "variant", "fdd", "accuracy"])
  print("\nspeed")
  common.print_table(rows, ["model", "variant", "batch", "images_per_s", "wall_s", "cpu_s",
                            "time_ratio", "cpu_ratio", "gflops_per_image", "flops_ratio"])
  return {"study": "digits", "sampler": f"{args.method} {args.num_steps} points, CFG {args.cfg}",
          "quality": quality, "speed": rows, "plans": infos, "args": vars(args)}


# ----------------------------------------------------------------------------- synthetic
def random_params(model, seed, scale=0.02):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype),
                                models.abstract_params(model))


def set_router_offsets(dy, params, width_offset, token_offset):
  p = jax.tree_util.tree_map(lambda a: a, params)
  for i in range(dy.depth):
    blk = p[f"blocks_{i}"]
    for r in ("attn_rate", "mlp_rate"):
      blk[r]["router"]["bias"] = jnp.full_like(blk[r]["router"]["bias"], width_offset) + \
          0.5 * jax.random.normal(jax.random.key(i), blk[r]["router"]["bias"].shape)
    if "token_selection" in blk:
      blk["token_selection"]["mlp_head_2"]["bias"] = jnp.full((1,), token_offset)
  return p


def synthetic_study(args) -> dict:
  if args.name == "quickstart":  # the digits model's shape (configs/quickstart.py)
    base = models.build_model(None, input_size=32, in_channels=1, num_classes=10, patch_size=4,
                              hidden_size=128, depth=4, num_heads=4, mediator_num=16,
                              learn_sigma=False)
  else:
    base = models.build_model(args.name, input_size=args.input_size, num_classes=10,
                              learn_sigma=False)
  bp = random_params(base, 0)
  transport = tr.create_transport()
  cfg = samplers.ODEConfig(method=args.method, num_steps=args.num_steps)
  dy = dydit.from_sit(base)
  fresh = dydit.init_from_base(dy, bp, jax.random.key(1))
  # routers with larger random weights (masks that change along the trajectory)
  fresh = jax.tree_util.tree_map_with_path(
      lambda pth, a: a * 20 if "router" in jax.tree_util.keystr(pth) and "kernel" in
      jax.tree_util.keystr(pth) else a, fresh)
  shape = (base.input_size, base.input_size, base.in_channels)
  b = args.batch
  x0 = np.asarray(jax.random.normal(jax.random.key(args.seed), (b,) + shape))
  y = np.arange(b, dtype=np.int32) % 10
  calib = np.asarray(jax.random.normal(jax.random.key(args.seed + 1), (b,) + shape))
  ts = samplers.program(transport, cfg).eval_times()
  route = jax.jit(lambda v: dy.apply(v, ts, method=dydit.DyDiT.route))
  tok = jax.jit(lambda v: dydit.forward_with_gates(dy, v, calib, jnp.full((b,), 0.5), y)[1][
      "token"].mean())
  attn, mlp = flops.block_costs(base)
  share_a = attn.sum() / (attn + mlp).sum()
  rows, infos = [], {}
  for lam in args.targets:
    # width fraction w and token fraction rho with share_a w + (1 - share_a) w rho = lambda,
    # rho = min(1, lambda + 0.2): bisect the router offsets for each
    rho = min(1.0, lam + 0.2)
    w = lam / (share_a + (1 - share_a) * rho)

    def bisect(f, target, lo=-30.0, hi=30.0):
      for _ in range(30):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
          hi = mid
        else:
          lo = mid
      return 0.5 * (lo + hi)

    wo = bisect(lambda o: float(np.asarray(route({"params": set_router_offsets(
        dy, fresh, o, 35.0)})[0]).mean()), w)
    to = bisect(lambda o: float(tok({"params": set_router_offsets(dy, fresh, wo, o)})), rho)
    dp = set_router_offsets(dy, fresh, wo, to)
    label = f"{args.name}_lambda{lam}"
    r, info, _ = speed_rows(base, bp, dy, dp, transport, cfg, x0, y, calib, args, label)
    rows += r
    infos[label] = {**info, "target": lam, "width_target": round(w, 3), "token_target": rho}
  common.print_table(rows, ["model", "variant", "batch", "images_per_s", "wall_s", "cpu_s",
                            "time_ratio", "cpu_ratio", "gflops_per_image", "flops_ratio"])
  return {"study": "synthetic", "model": args.name, "input_size": args.input_size,
          "sampler": f"{args.method} {args.num_steps} points, CFG {args.cfg}", "speed": rows,
          "plans": infos, "args": vars(args)}


# ----------------------------------------------------------------------------- docs
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "dydit.md"
DIGITS_JSON = "benchmarks/results/dydit_digits.json"
SYNTHETIC_JSON = "benchmarks/results/dydit_s2_cpu.json"
MARK = "<!-- generated by benchmarks/dydit_speed.py markdown() from benchmarks/results/dydit_*.json -->"
END = "<!-- end of generated text -->"
TARGET_GAP = 0.1  # issue 12: time ratio within 0.1 of the FLOPs ratio


def _setup_line(r: dict) -> str:
  la = r.get("load_average") or {}
  load = ""
  if la:
    load = (f"; load average {la['start'][0]:.1f} at the start, {la['end'][0]:.1f} at the end "
            f"(1-minute)")
  return (f"`{r['command']}` on {r['device']} ({r.get('note', '')}{load}), {r['date']} UTC, "
          f"commit {r.get('commit', '?')}. Sampler: {r['sampler']}.")


def _speed_table(rows: list[dict]) -> list[str]:
  out = ["| model | variant | batch | images/s | wall s | CPU s | time ratio (wall) | "
         "time ratio (CPU) | FLOPs ratio | GFLOPs/image |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.2f} | "
               f"{r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['time_ratio']:.3f} | "
               f"{r['cpu_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['gflops_per_image']:.4f} |")
  return out


def _plans_table(plans: dict) -> list[str]:
  out = ["| model | signatures | runs | heads on | groups on | tokens on (calibration) | "
         "blocks-only FLOPs ratio | FLOPs ratio the masks imply |", "|---|---|---|---|---|---|---|---|"]
  for k, v in plans.items():
    tok = "-" if v["token_fraction_mean"] is None else f"{v['token_fraction_mean']:.3f}"
    out.append(f"| {k} | {v['signatures']} | {v['runs']} | {v['head_fraction_mean']:.3f} | "
               f"{v['group_fraction_mean']:.3f} | {tok} | {v['block_flops_ratio']:.3f} | "
               f"{v['masked_flops_ratio']:.3f} |")
  return out


def verdicts(rows: list[dict]) -> list[dict]:
  """Per sparse row: the gap |time ratio - FLOPs ratio| (wall and CPU) and whether it is within
  TARGET_GAP."""
  out = []
  for r in rows:
    if r["variant"] != "dydit_sparse":
      continue
    gw, gc = abs(r["time_ratio"] - r["flops_ratio"]), abs(r["cpu_ratio"] - r["flops_ratio"])
    out.append({"model": r["model"], "flops_ratio": r["flops_ratio"], "wall_gap": round(gw, 3),
                "cpu_gap": round(gc, 3), "wall_ok": gw <= TARGET_GAP, "cpu_ok": gc <= TARGET_GAP})
  return out


def _verdict_lines(rows: list[dict]) -> list[str]:
  lines = []
  for v in verdicts(rows):
    def say(ok, gap):
      return (f"within {TARGET_GAP}" if ok else f"**target missed** by {gap - TARGET_GAP:.3f}") + \
          f" (|gap| {gap:.3f})"
    lines.append(f"- {v['model']} (FLOPs ratio {v['flops_ratio']:.3f}): wall-clock "
                 f"{say(v['wall_ok'], v['wall_gap'])}; CPU time {say(v['cpu_ok'], v['cpu_gap'])}.")
  return lines


def markdown(digits: dict | None, synthetic: dict | None) -> str:
  """The docs' Markdown (docs/dydit.md, between MARK and END) for the committed result JSONs;
  tests/test_docs_numbers.py checks that the doc holds exactly this text."""
  lines = []
  if digits is not None:
    lines += ["### Digits: fine-tuned quickstart models", "", _setup_line(digits), "",
              f"Quality ({digits['args']['quality_samples']} samples, "
              f"{digits['args']['quality_samples'] // 10} per class, the same noise "
              f"for every model; Frechet digit distance vs the training digits and conditional "
              f"accuracy of the offline digit classifier):", "",
              "| model | variant | FDD | accuracy | max abs diff sparse vs dense |", "|---|---|---|---|---|"]
    for q in digits["quality"]:
      d = q.get("max_abs_diff_vs_dense")
      lines.append(f"| {q['model']} | {q['variant']} | {q['fdd']:.3f} | {q['accuracy']:.4f} | "
                   f"{'-' if d is None else f'{d:.2e}'} |")
    lines += ["", f"Speed (one batch of {digits['args']['batch']}, variants interleaved, "
              f"median of {digits['args']['repeats']} rounds after a warm-up; time ratio = "
              f"variant / base, CPU = process CPU seconds):", ""]
    lines += _speed_table(digits["speed"]) + [""] + _plans_table(digits["plans"]) + [""]
    lines += _verdict_lines(digits["speed"]) + [""]
  if synthetic is not None:
    lines += [f"### Cost side on a larger model: {synthetic['model']}, "
              f"{synthetic['input_size']}x{synthetic['input_size']}x4 latents, random weights", "",
              _setup_line(synthetic) + " Router biases bisected to each target (no training; "
              "quality is meaningless here).", ""]
    lines += _speed_table(synthetic["speed"]) + [""] + _plans_table(synthetic["plans"]) + [""]
    lines += _verdict_lines(synthetic["speed"]) + [""]
  return "\n".join(lines).rstrip() + "\n" if lines else ""


def _read(path):
  import json  # noqa: PLC0415
  p = pathlib.Path(__file__).resolve().parents[1] / path
  return json.loads(p.read_text()) if p.exists() else None


def render(check: bool = False) -> bool:
  """Writes markdown(committed JSONs) into docs/dydit.md between MARK and END (check: only
  compare). Returns whether the doc already held it."""
  text = DOC.read_text()
  i, j = text.index(MARK) + len(MARK), text.index(END)
  block = "\n" + markdown(_read(DIGITS_JSON), _read(SYNTHETIC_JSON))
  same = text[i:j] == block
  if not check and not same:
    DOC.write_text(text[:i] + block + text[j:])
    print(f"wrote {DOC}")
  return same


def _environment() -> dict:
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).resolve().parents[1],
                            check=False).stdout.strip() or "?"
  except OSError:
    commit = "?"
  return {"commit": commit, "cpu_count": os.cpu_count()}


def main(argv=None):
  import os  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("study", choices=("digits", "synthetic", "render"))
  ap.add_argument("--out", help="digits / synthetic: the result JSON to write")
  ap.add_argument("--base", help="digits: base SiT workdir / checkpoint")
  ap.add_argument("--dydit", action="append", default=[], help="digits: LAMBDA=WORKDIR")
  ap.add_argument("--name", default="SiT-S/2", help="synthetic: a model name or 'quickstart'")
  ap.add_argument("--input_size", type=int, default=32)
  ap.add_argument("--targets", default="0.7,0.5")
  ap.add_argument("--method", default="heun2")
  ap.add_argument("--num_steps", type=int, default=30)
  ap.add_argument("--cfg", type=float, default=3.0)
  ap.add_argument("--guide_all", type=int, default=1)
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--quality_samples", type=int, default=500)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--bucket", type=int, default=1)
  ap.add_argument("--capacity_margin", type=float, default=0.1)
  ap.add_argument("--capacity_levels", type=int, default=0,
                  help="per-step token capacities in 1/L of the rows (0: one per width signature)")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  a.targets = [float(v) for v in str(a.targets).split(",")]
  if a.study == "render":
    render()
    return
  if not a.out:
    ap.error("--out is required")
  load_start, env = os.getloadavg(), _environment()  # the commit that runs, read at the start
  if a.study == "digits":
    if not a.base or not a.dydit:
      ap.error("digits needs --base and at least one --dydit LAMBDA=WORKDIR")
    out = digits_study(a)
  else:
    out = synthetic_study(a)
  out["command"] = "python benchmarks/dydit_speed.py " + " ".join(argv or sys.argv[1:])
  out["note"] = ("2-core CPU; the load average says whether other jobs shared it (this run's own "
                 "threads alone give ~2); cpu_s beside wall_s")
  out["load_average"] = {"start": [round(v, 2) for v in load_start],
                         "end": [round(v, 2) for v in os.getloadavg()]}
  out.update(env)
  common.write_json(a.out, out)


if __name__ == "__main__":
  main()
