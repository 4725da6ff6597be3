"""Attention-redundancy analysis: how alike are the attention rows of each layer over sampling?

The mediator paper's motivation is that many queries attend almost identically, so a few
mediators can carry the query->key interaction. We measure it per layer and per sampling
timestep with the Jensen-Shannon divergence between attention rows:

  JSD(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2          (natural log, 0 <= JSD <= ln 2)
  score(layer, t) = mean over batch, heads and pairs of query rows (i != j) of JSD(P_i, P_j)
  redundancy(layer, t) = 1 - score / ln 2                   (1 = every row identical)

A score of 0 means every query attends identically (fully redundant). For mediator layers the
row is the effective query->key attention A2 @ A1 (the part of the layer that mixes tokens through
attention; the depthwise conv is separate).

Rows come from the "attention_maps" collection the attention layers sow (edit_jax.models.attention).
Inputs follow the model's own deterministic trajectory from noise, so the analysis needs only a
trained model: the Euler ODE for the transport (t = 0 noise -> 1 data), DDIM (eta 0) on a
`timesteps`-step respacing for the Gaussian objective (reported at t = k / timesteps as well, with
the model's own timestep in "model_t"). The objective is read from the checkpoint
(`edit_jax.checkpoint.load_objective`) unless --objective is given.

    python -m edit_jax.eval.redundancy --checkpoint WORKDIR_OR_CONVERTED_DIR --out DIR \
        [--timesteps 10] [--batch 4] [--label 3] [--objective transport|gaussian]

writes DIR/redundancy.json, DIR/redundancy.md (layer x timestep table of the JSD score, in nats)
and DIR/redundancy.png (heat map); refuses to overwrite them. User errors (missing checkpoint,
existing outputs, bad options) exit with status 2 and one line; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax import cli

LN2 = math.log(2.0)


def _entropy(p, axis=-1):
  p = jnp.asarray(p, jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def jsd(p, q):
  """Jensen-Shannon divergence (natural log) between distributions on the last axis."""
  return _entropy((p + q) / 2) - (_entropy(p) + _entropy(q)) / 2


def pairwise_jsd_score(probs, max_pairs: int = 4096, rng=None):
  """Mean JSD over pairs of distinct rows. probs: (..., N_rows, N_cols), rows sum to 1.

  All pairs when N_rows * (N_rows - 1) / 2 <= max_pairs, else `max_pairs` random pairs (fixed rng).
  Returns a scalar (mean over leading axes and pairs).
  """
  n = probs.shape[-2]
  if n < 2:
    return jnp.float32(0.0)
  iu, ju = np.triu_indices(n, k=1)
  if iu.size > max_pairs:
    sel = np.random.default_rng(0 if rng is None else rng).choice(iu.size, max_pairs, replace=False)
    iu, ju = iu[sel], ju[sel]
  p = jnp.take(probs, jnp.asarray(iu), axis=-2)
  q = jnp.take(probs, jnp.asarray(ju), axis=-2)
  return jnp.mean(jsd(p, q))


def layer_scores(attention_maps, max_pairs: int = 4096) -> dict[str, float]:
  """{block name: JSD score} from an "attention_maps" collection of one forward pass."""
  out = {}
  for block, sub in attention_maps.items():
    probs = sub["attn"]["probs"][0]  # sow stores a tuple
    out[block] = float(pairwise_jsd_score(probs, max_pairs=max_pairs))
  return out


def analyse(model, params, *, timesteps: int = 10, batch: int = 4, labels=None, seed: int = 0,
            max_pairs: int = 4096, diffusion=None):
  """Runs the model's trajectory and records the JSD score of every layer at every evaluated
  timestep: the Euler ODE (timesteps + 1 grid points over [0, 1]) for a transport model, or DDIM
  (eta 0, clipping off) on `diffusion.respace(str(timesteps))` when `diffusion` (a
  `edit_jax.diffusion.gaussian.GaussianDiffusion`) is given.

  Returns {"t": [..] (0 = noise, 1 = data), "model_t": [..] (what the network saw), "layers":
  [block names], "score": [[layer x t]], "redundancy": [[...]], "mediator_blocks": [...]}.
  """
  if timesteps < 1:
    raise ValueError(f"timesteps={timesteps} must be >= 1")
  rng = jax.random.key(seed)
  x = jax.random.normal(rng, (batch, model.input_size, model.input_size, model.in_channels))
  if labels is None:
    labels = np.arange(batch) % model.num_classes
  from edit_jax.diffusion import samplers  # noqa: PLC0415
  samplers.check_labels(np.asarray(labels), model.num_classes)
  y = jnp.asarray(np.broadcast_to(np.asarray(labels), (batch,)), jnp.int32)

  gauss = diffusion is not None

  @jax.jit
  def fwd(x, t):
    out, state = model.apply({"params": params}, x, jnp.full((batch,), t, jnp.float32), y,
                             full_output=gauss, mutable=["attention_maps"])
    return out, state["attention_maps"]

  ts, model_ts, per_t = [], [], []
  if gauss:
    from edit_jax.diffusion import gaussian  # noqa: PLC0415
    cfg = gaussian.GaussianSamplerConfig("ddim", respacing=str(timesteps))
    d = gaussian.for_sampling(diffusion, cfg)

    @jax.jit
    def ddim_step(out, x, i):
      tb = jnp.full((batch,), i, jnp.int32)
      pmv = d.p_mean_variance_from_output(out, x, tb, clip_denoised=False)
      return d._ddim_update(pmv, x, tb, None, 0.0)  # noqa: SLF001 (the module's own step)

    for k in range(timesteps):
      i = timesteps - 1 - k
      out, maps = fwd(x, float(d.timestep_map[i]))
      ts.append(k / timesteps)
      model_ts.append(float(d.timestep_map[i]))
      per_t.append(layer_scores(maps, max_pairs=max_pairs))
      x = ddim_step(out, x, i)
  else:
    grid = np.linspace(0.0, 1.0, timesteps + 1)
    for k in range(timesteps):
      v, maps = fwd(x, grid[k])
      ts.append(float(grid[k]))
      model_ts.append(float(grid[k]))
      per_t.append(layer_scores(maps, max_pairs=max_pairs))
      x = x + v * (grid[k + 1] - grid[k])
  layers = sorted(per_t[0], key=lambda s: int(s.split("_")[-1]))
  score = [[per_t[j][name] for j in range(len(ts))] for name in layers]
  return {"t": ts, "model_t": model_ts, "layers": layers, "score": score,
          "redundancy": [[1 - s / LN2 for s in row] for row in score],
          "mediator_blocks": list(model.mediator_blocks)}


def to_markdown(result) -> str:
  head = "| layer (JSD, nats) | " + " | ".join(f"t={t:.2f}" for t in result["t"]) + " |"
  sep = "|---" * (len(result["t"]) + 1) + "|"
  rows = []
  for name, row in zip(result["layers"], result["score"]):
    kind = " (mediator)" if int(name.split("_")[-1]) in result["mediator_blocks"] else ""
    rows.append(f"| {name}{kind} | " + " | ".join(f"{s:.4f}" for s in row) + " |")
  return "\n".join([head, sep, *rows])


def heatmap_png(result, path):
  """Writes a layer x timestep heat map of the JSD score (lower = more redundant)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  data = np.asarray(result["score"])
  fig, ax = plt.subplots(figsize=(1.0 + 0.5 * data.shape[1], 1.0 + 0.35 * data.shape[0]))
  im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-6))
  ax.set_xticks(range(len(result["t"])), [f"{t:.1f}" for t in result["t"]], fontsize=7)
  ax.set_yticks(range(len(result["layers"])), result["layers"], fontsize=7)
  ax.set_xlabel("sampling time t (0 = noise, 1 = data)")
  ax.set_title("JSD between attention rows (0 = identical rows)", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_model(checkpoint):
  """(model, params) from a training workdir / Orbax checkpoint or a converted checkpoint dir."""
  ckpt = pathlib.Path(checkpoint)
  if not ckpt.exists():
    raise FileNotFoundError(f"checkpoint {ckpt} does not exist: pass a training workdir or a "
                            f"directory written by python -m edit_jax.convert")
  if (ckpt / "model_config.json").exists():
    from edit_jax import convert  # noqa: PLC0415
    return convert.load_converted(ckpt)
  if ckpt.suffix in (".pt", ".pth", ".npz", ".safetensors"):
    from edit_jax import convert  # noqa: PLC0415
    return convert.load_torch_checkpoint(ckpt)
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  return ckpt_lib.load_params_for_sampling(ckpt)


def _diffusion_for(checkpoint, objective, model):
  """The GaussianDiffusion of a gaussian-objective checkpoint, or None (transport)."""
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  rec = ckpt_lib.load_objective(str(checkpoint))
  objective = objective or (rec or {}).get("objective", "transport")
  if objective != "gaussian":
    return None
  from edit_jax.diffusion import gaussian  # noqa: PLC0415
  return gaussian.diffusion_from_settings((rec or {}).get("diffusion"), model.learn_sigma)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m edit_jax.eval.redundancy",
                               description="JSD redundancy of attention rows per layer and timestep")
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--timesteps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--label", type=int, default=None, help="one class for every sample (default: 0..B-1)")
  ap.add_argument("--max_pairs", type=int, default=4096)
  ap.add_argument("--objective", choices=("transport", "gaussian"), default=None,
                  help="what the checkpoint was trained with (default: recorded in it, else "
                       "transport)")
  cli.add_debug_flag(ap)
  args = ap.parse_args(argv)
  if args.timesteps < 1 or args.batch < 1 or args.max_pairs < 1:
    raise ValueError(f"--timesteps ({args.timesteps}), --batch ({args.batch}) and --max_pairs "
                     f"({args.max_pairs}) must be >= 1")
  out = pathlib.Path(args.out)
  targets = [out / f"redundancy.{ext}" for ext in ("json", "md", "png")]
  existing = [str(p) for p in targets if p.exists()]
  if existing:
    raise FileExistsError(f"refusing to overwrite {existing}: choose another --out directory")
  model, params = load_model(args.checkpoint)
  diffusion = _diffusion_for(args.checkpoint, args.objective, model)
  result = analyse(model, params, timesteps=args.timesteps, batch=args.batch,
                   labels=args.label, max_pairs=args.max_pairs, diffusion=diffusion)
  result["objective"] = "transport" if diffusion is None else "gaussian"
  out.mkdir(parents=True, exist_ok=True)
  result["checkpoint"] = str(args.checkpoint)
  targets[0].write_text(json.dumps(result, indent=2))
  md = to_markdown(result)
  targets[1].write_text(md + "\n")
  heatmap_png(result, targets[2])
  print(md)
  print(f"wrote {', '.join(map(str, targets))}")


if __name__ == "__main__":
  cli.run(main, "python -m edit_jax.eval.redundancy")
