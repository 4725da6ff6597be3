"""Elastic mediators: one SiT parameter set that runs at every mediator count n.

The official layer's position-bias tables carry the mediator count n (an_bias / na_bias (h, n, 7, 7),
ah / aw / ha / wa with an n axis), so each n is its own checkpoint. An elastic model
(`SiT(elastic_grid=R)`) stores them over a fixed R x R reference grid of mediator positions and
resizes that grid to sqrt(n) x sqrt(n) with the official token-table resize (bilinear,
align_corners=False, no antialias; identity at n = R^2). qkv, proj and the depthwise conv were
already n-free. The same parameters therefore run at any perfect square n:

    model_n = elastic.at(model, 16)          # = model.clone(mediator_num=16)
    out = model_n.apply({"params": params}, x, t, y)

Here:
  * `at`, `parse_mediators`: models at a given n, mediator lists such as "4,16,64".
  * `mediators_for_step`: the n (or n-tuple) a training step uses: "uniform" (one n per step) or
    "sandwich" (smallest + largest + `num_random` from between, every step). A pure function of
    (seed, step): a resumed run sees the same sequence. `step_selector` gives the trainer one
    compiled train step per n-tuple (built on first use; no recompilation afterwards).
  * Conversions: `static_to_elastic` (a static-n checkpoint, official or ours -> elastic params that
    compute exactly the static model at that n), `elastic_to_static` (-> static-n params for the
    official-layout model, computing exactly what the elastic model computes at that n),
    `adapt_init_params` (used by `config.init_from`), `export_static` (files).

Command line (errors: one line, exit code 2):
    python -m edit_jax.elastic export CKPT --mediators 16 --out OUT [--raw_weights] [--overwrite]
        OUT.npz / OUT.safetensors: official PyTorch state_dict names and layouts (load with
        `load_state_dict` in the official code, or edit_jax.convert); otherwise a directory
        like `python -m edit_jax.convert` writes.
    python -m edit_jax.elastic init CKPT --grid 8 --out OUT_DIR [--raw_weights] [--overwrite]
        a static-n checkpoint (workdir, converted dir, official .pt/.npz) -> elastic params.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edit_jax import models
from edit_jax.models import attention as attn_lib

MODES = ("uniform", "sandwich")
TABLE_NAMES = tuple(attn_lib.STATIC_TABLES)


# --------------------------------------------------------------------------- models at n
def is_elastic(model) -> bool:
  return bool(getattr(model, "elastic_grid", 0)) and bool(getattr(model, "mediator_num", 0))


def at(model: models.SiT, n: int) -> models.SiT:
  """The elastic `model` running `n` mediators (same parameters). Raises on a static model."""
  if not is_elastic(model):
    if getattr(model, "mediator_num", 0) == n:
      return model
    raise ValueError(f"this checkpoint is a static mediator model (n={model.mediator_num}, "
                     f"elastic_grid=0): it only runs at n={model.mediator_num}; train or convert "
                     f"an elastic one (python -m edit_jax.elastic init ...) to run at n={n}")
  out = model.clone(mediator_num=int(n))
  out.validate()
  return out


def parse_mediators(value, num_tokens: int | None = None) -> tuple[int, ...]:
  """'4,16,64' (or a sequence) -> (4, 16, 64): sorted, unique, perfect squares (<= num_tokens)."""
  if isinstance(value, str):
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
      ns = [int(v) for v in items]
    except ValueError:
      raise ValueError(f"mediator list {value!r}: expected comma-separated perfect squares such as "
                       f"4,16,64") from None
  else:
    ns = [int(v) for v in value]
  if not ns:
    raise ValueError("empty mediator list: give comma-separated perfect squares such as 4,16,64")
  for n in ns:
    attn_lib.check_mediator_num(n, num_tokens if num_tokens else n)
  return tuple(sorted(set(ns)))


# --------------------------------------------------------------------------- training schedule
def check_mode(mode: str, num_random: int = 1):
  if mode not in MODES:
    raise ValueError(f"elastic mode {mode!r}: expected 'uniform' (one n per step) or 'sandwich' "
                     f"(smallest + largest + random ones every step)")
  if int(num_random) != num_random or num_random < 0:
    raise ValueError(f"num_random={num_random} must be an int >= 0")


def mediators_for_step(mediators: Sequence[int], mode: str, seed: int, step: int,
                       num_random: int = 1) -> tuple[int, ...]:
  """The mediator counts trained at `step` (sorted tuple); a pure function of (seed, step).

  uniform: one n drawn uniformly from `mediators`.
  sandwich: the smallest and the largest, plus `num_random` distinct ones drawn uniformly from
  those strictly between (all of them when there are fewer).
  """
  ms = sorted(set(int(n) for n in mediators))
  check_mode(mode, num_random)
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step),
                                                      0x3E1A5]))
  if mode == "uniform":
    return (ms[int(rng.integers(len(ms)))],)
  inner = ms[1:-1]
  k = min(int(num_random), len(inner))
  pick = [inner[i] for i in rng.choice(len(inner), size=k, replace=False)] if k else []
  return tuple(sorted({ms[0], ms[-1], *pick}))


def step_keys(mediators: Sequence[int], mode: str, num_random: int = 1) -> list[tuple[int, ...]]:
  """Every n-tuple `mediators_for_step` can return (= the compiled train steps needed)."""
  import itertools  # noqa: PLC0415
  ms = sorted(set(int(n) for n in mediators))
  if mode == "uniform":
    return [(n,) for n in ms]
  inner = ms[1:-1]
  k = min(int(num_random), len(inner))
  return [tuple(sorted({ms[0], ms[-1], *c})) for c in itertools.combinations(inner, k)]


def make_loss_fn(model: models.SiT, transport, mediators: Sequence[int],
                 loss_for: Callable | None = None):
  """Training loss of the elastic `model` averaged over `mediators` (same batch, t and noise for
  each n). Returns `loss_fn(params, x1, y, rng) -> (loss, aux)` like
  `edit_jax.diffusion.transport.make_loss_fn`; aux["loss_by_n"]: (len(mediators),).
  loss_for(model_at_n) builds the per-n loss (default: the transport loss of `transport`; the
  trainer passes its objective's, e.g. DiT's Gaussian diffusion loss)."""
  if loss_for is None:
    from edit_jax.diffusion import transport as transport_lib  # noqa: PLC0415
    loss_for = lambda m: transport_lib.make_loss_fn(m, transport)  # noqa: E731
  fns = [loss_for(at(model, n)) for n in mediators]

  def loss_fn(params, x1, y, rng):
    outs = [f(params, x1, y, rng) for f in fns]
    losses = jnp.stack([o[0] for o in outs])
    per = jnp.mean(jnp.stack([o[1]["loss_per_sample"] for o in outs]), axis=0)
    return losses.mean(), {"loss_per_sample": per, "t": outs[0][1]["t"], "loss_by_n": losses}

  return loss_fn


class StepSelector:
  """`selector(step)` -> the jitted train step for the n-tuple of that step.

  build(loss_fn) makes one jitted train step (e.g. `edit_jax.train.make_train_step`);
  loss_for(model) the loss of one model (default: the transport loss of `transport`). Steps are
  built lazily per n-tuple and kept, so after every tuple has occurred once nothing is traced or
  compiled again. Static (non-elastic) training: one step for every step.
  """

  def __init__(self, model, transport, build: Callable, *, mediators: Sequence[int] = (),
               mode: str = "uniform", seed: int = 0, num_random: int = 1,
               loss_for: Callable | None = None):
    from edit_jax.diffusion import transport as transport_lib  # noqa: PLC0415
    self.model, self.transport, self.build = model, transport, build
    self.loss_for = loss_for or (lambda m: transport_lib.make_loss_fn(m, transport))
    self.mediators = tuple(sorted(set(int(n) for n in mediators)))
    self.mode, self.seed, self.num_random = mode, int(seed), int(num_random)
    self.steps: dict[tuple[int, ...], Callable] = {}
    if not self.mediators:
      self._static = build(self.loss_for(model))
    else:
      check_mode(mode, num_random)
      self._static = None

  def mediators_at(self, step: int) -> tuple[int, ...]:
    if not self.mediators:
      return (int(self.model.mediator_num),)
    return mediators_for_step(self.mediators, self.mode, self.seed, step, self.num_random)

  def forward_gflops(self) -> float:
    """Expected forward GFLOPs per example per step (edit_jax.flops): the model's for static
    training, the mean over n (uniform) or the mean over n-tuples of their sum (sandwich)."""
    from edit_jax import flops  # noqa: PLC0415
    if not self.mediators:
      return flops.gflops(self.model)
    keys = step_keys(self.mediators, self.mode, self.num_random)
    return float(np.mean([sum(flops.gflops(at(self.model, n)) for n in k) for k in keys]))

  def __call__(self, step: int) -> Callable:
    if self._static is not None:
      return self._static
    key = self.mediators_at(step)
    fn = self.steps.get(key)
    if fn is None:
      fn = self.steps[key] = self.build(make_loss_fn(self.model, self.transport, key,
                                                     self.loss_for))
    return fn


def step_selector(config, model, transport, build: Callable,
                  loss_for: Callable | None = None) -> StepSelector:
  """The trainer's StepSelector from `config.elastic` (absent / empty mediators: static);
  loss_for(model) -> loss_fn of the run's objective (default: transport)."""
  ec = config.get("elastic") if hasattr(config, "get") else None
  ms = ec.mediators if ec is not None else ""
  if not ms:
    return StepSelector(model, transport, build, loss_for=loss_for)
  return StepSelector(model, transport, build, mediators=parse_mediators(ms, model.num_tokens),
                      mode=ec.mode, seed=config.seed, num_random=ec.num_random,
                      loss_for=loss_for)


def check_config(config, model) -> None:
  """Raises ValueError when config.elastic does not fit the model."""
  ec = config.get("elastic")
  if ec is None or not ec.mediators:
    return
  if not is_elastic(model):
    raise ValueError(f"elastic.mediators={ec.mediators!r} needs an elastic model: set "
                     f"--config.model.elastic_grid=R (R x R reference mediator grid, e.g. "
                     f"{math.isqrt(max(parse_mediators(ec.mediators)))}) and "
                     f"--config.model.mediator_num to the count used for samples")
  parse_mediators(ec.mediators, model.num_tokens)
  check_mode(ec.mode, ec.num_random)


# --------------------------------------------------------------------------- resize algebra
def resize_matrix(src: int, dst: int) -> np.ndarray:
  """(dst, src) float64 matrix A of the 1-D bilinear resize (align_corners=False, no antialias)
  that `attention.resize_bilinear` applies along each axis: resize(X) = A X A^T."""
  if src == dst:
    return np.eye(src)
  eye = jnp.eye(src, dtype=jnp.float32)
  a = jax.image.resize(eye, (dst, src), method="bilinear", antialias=False)
  return np.asarray(a, np.float64)


def grid_to_reference(t: np.ndarray, axis: int, grid: int) -> np.ndarray:
  """Static table with its n axis at `axis` -> elastic table with R x R axes at (axis, axis + 1).

  E = U + P (T - A U A^T) P^T per table slice, with T the s x s table (s = sqrt(n)), A the R -> s
  resize, P = pinv(A) and U = the bilinear s -> R upsample of T. For s <= R, A P = I, so
  resize(E) = A E A^T = T exactly (up to float rounding): the elastic model at n reproduces the
  static one, and other n see a smooth (bilinear) extension. For s > R it is the least-squares fit.
  """
  n = t.shape[axis]
  s = math.isqrt(n)
  if s * s != n:
    raise ValueError(f"mediator axis of size {n} is not a perfect square")
  t64 = np.moveaxis(np.asarray(t, np.float64), axis, -1)
  t64 = t64.reshape(t64.shape[:-1] + (s, s))
  if s == grid:
    e = t64
  else:
    a = resize_matrix(grid, s)             # (s, R)
    up = resize_matrix(s, grid)            # (R, s)
    p = np.linalg.pinv(a)                  # (R, s)
    u = np.einsum("ri,...ij,qj->...rq", up, t64, up)
    resid = t64 - np.einsum("ir,...rq,jq->...ij", a, u, a)
    e = u + np.einsum("ri,...ij,qj->...rq", p, resid, p)
  return np.moveaxis(e, (-2, -1), (axis, axis + 1)).astype(np.float32)


def _mediator_layers(params) -> list[tuple[str, ...]]:
  """Paths (to the attn dict) of every mediator layer in a params tree."""
  flat = traverse_util.flatten_dict(params)
  return sorted({k[:-1] for k in flat if k[-1] == "an_bias"})


# --------------------------------------------------------------------------- conversions
def static_to_elastic(model: models.SiT, params, grid: int | None = None):
  """(elastic model, params) from a static mediator model and its params.

  grid: R of the reference mediator grid (default sqrt(n) of the source, an exact relabelling;
  use the largest n you will train, e.g. 8 for 4 / 16 / 64). The result runs at the source n
  exactly as the source (tables solved so their resize returns the source tables; see
  `grid_to_reference`) and at every other n through the bilinear extension. Non-mediator
  parameters are copied.
  """
  if not model.mediator_num:
    raise ValueError("the source model has no mediators (mediator_num=0): a vanilla SiT has no "
                     "bias tables to convert; use it as init_from of an elastic config instead "
                     "(qkv/proj load, the mediator tables and dwc start fresh)")
  if is_elastic(model):
    raise ValueError("the source model is already elastic (elastic_grid="
                     f"{model.elastic_grid}); use elastic_to_static / regrid instead")
  grid = int(grid or math.isqrt(model.mediator_num))
  if grid < 1:
    raise ValueError(f"grid={grid} must be >= 1")
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(params)))
  out = {}
  for k, v in flat.items():
    if k[-1] in attn_lib.STATIC_TABLES:
      v = grid_to_reference(v, attn_lib.STATIC_TABLES[k[-1]][1], grid)
    out[k] = v
  elastic = model.clone(elastic_grid=grid)
  elastic.validate()
  return elastic, traverse_util.unflatten_dict(out)


def mediator_tables(model: models.SiT, params) -> dict:
  """{block path: {table name: array in the static shapes at model.mediator_num}} (jitted)."""
  def fn(p):
    def collect(m):
      return {f"blocks_{i}": m.blocks[i].attn.tables() for i in m.mediator_blocks}
    return model.apply({"params": p}, method=collect)
  return jax.tree.map(np.asarray, jax.jit(fn)(params))


def elastic_to_static(model: models.SiT, params, n: int | None = None):
  """(static model, params) of the elastic `model` at n mediators (default model.mediator_num).

  The static model (official layout, elastic_grid=0) computes exactly what the elastic one
  computes at n: its tables are the elastic tables resized to sqrt(n), other params are copied.
  """
  if not is_elastic(model):
    raise ValueError("the source model is not elastic (elastic_grid=0): nothing to export")
  m = at(model, int(n or model.mediator_num))
  tables = mediator_tables(m, params)
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(params)))
  out = {}
  for k, v in flat.items():
    if k[-1] in attn_lib.ELASTIC_TABLES:
      block = next(b for b in k if b.startswith("blocks_"))
      v = tables[block][k[-1]]
    out[k] = v
  static = m.clone(elastic_grid=0)
  static.validate()
  return static, traverse_util.unflatten_dict(out)


def adapt_init_params(src_model, src_params, dst_model, src_grid: int):
  """Brings `config.init_from` params into the destination's mediator layout.

  static -> elastic: `static_to_elastic` with the destination's R; elastic -> static: exported at
  the destination's n; elastic -> elastic with another R: via the static model at n = R_src^2
  (exact). A token-grid change (`src_grid` != the destination's) is applied on the static form
  (`checkpoint.resize_mediator_params`). Returns (params, grid of the returned params).
  Anything else (vanilla sources, same layouts) is returned unchanged.
  """
  from edit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  if src_model is None or not getattr(src_model, "mediator_num", 0) or \
      not getattr(dst_model, "mediator_num", 0):
    return src_params, src_grid
  src_el, dst_el = is_elastic(src_model), is_elastic(dst_model)
  if not src_el and not dst_el:
    return src_params, src_grid
  if src_el and dst_el and src_model.elastic_grid == dst_model.elastic_grid and \
      src_grid == dst_model.grid:
    return src_params, src_grid
  if src_el:
    n = dst_model.mediator_num if not dst_el else src_model.elastic_grid ** 2
    src_model, src_params = elastic_to_static(src_model, src_params, n)
  if src_grid != dst_model.grid:
    src_params = ckpt_lib.resize_mediator_params(src_params, src_grid, dst_model.grid)
    src_grid = dst_model.grid
  if dst_el:
    _, src_params = static_to_elastic(src_model, src_params, dst_model.elastic_grid)
  return src_params, src_grid


# --------------------------------------------------------------------------- files
def export_static(ckpt: str, n: int, out: str, *, ema: bool = True, overwrite: bool = False):
  """Writes the elastic checkpoint `ckpt` at n mediators as a static checkpoint.

  out ending in .npz / .safetensors: official PyTorch state_dict names and layouts (with
  pos_embed), loadable by the official `load_state_dict` and by edit_jax.convert; otherwise a
  converted directory (model_config.json + Orbax params). Returns (static model, out path).
  """
  import pathlib  # noqa: PLC0415
  from edit_jax import checkpoint as ckpt_lib, convert  # noqa: PLC0415
  path = pathlib.Path(out)
  is_file = path.suffix.lower() in (".npz", ".safetensors")
  if is_file and path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists: choose another --out or pass --overwrite")
  if not is_file and path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty: choose another --out or pass "
                          f"--overwrite")
  model, params = ckpt_lib.load_params_for_sampling(ckpt, ema=ema)
  static, sparams = elastic_to_static(model, params, n)
  if is_file:
    sd = convert.params_to_state_dict(sparams, static)
    sd = {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    if path.suffix.lower() == ".npz":
      np.savez(tmp, **sd)
    else:
      from safetensors.numpy import save_file  # noqa: PLC0415
      save_file(sd, str(tmp))
    tmp.replace(path)
  else:
    convert.save_converted(path, static, sparams, overwrite=overwrite,
                           extra={"source": str(ckpt), "exported_from_elastic_at": int(n)})
  return static, path


def init_elastic(ckpt: str, grid: int, out: str, *, ema: bool = True, overwrite: bool = False):
  """Writes a converted directory holding the elastic version of static checkpoint `ckpt`."""
  from edit_jax import checkpoint as ckpt_lib, convert  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  path = pathlib.Path(out)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty: choose another --out or pass "
                          f"--overwrite")
  model, params = ckpt_lib.load_params_for_sampling(ckpt, ema=ema)
  elastic, eparams = static_to_elastic(model, params, grid)
  convert.save_converted(path, elastic, eparams, overwrite=overwrite,
                         extra={"source": str(ckpt), "elastic_from_static_n": model.mediator_num})
  return elastic, path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m edit_jax.elastic",
                               description="Convert between static-n and elastic mediator models.")
  sub = ap.add_subparsers(dest="cmd", required=True)
  ex = sub.add_parser("export", help="elastic checkpoint -> static checkpoint at n mediators")
  ex.add_argument("ckpt")
  ex.add_argument("--mediators", type=int, required=True, help="n to export (a perfect square)")
  ex.add_argument("--out", required=True, help=".npz / .safetensors (official layout) or a dir")
  it = sub.add_parser("init", help="static-n checkpoint -> elastic converted directory")
  it.add_argument("ckpt")
  it.add_argument("--grid", type=int, required=True, help="R of the R x R reference grid")
  it.add_argument("--out", required=True)
  for p in (ex, it):
    p.add_argument("--raw_weights", action="store_true", help="raw instead of EMA weights")
    p.add_argument("--overwrite", action="store_true")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "export":
      m, path = export_static(args.ckpt, args.mediators, args.out, ema=not args.raw_weights,
                              overwrite=args.overwrite)
      print(f"exported {args.ckpt} at n={m.mediator_num} -> {path} (static, official layout)")
    else:
      m, path = init_elastic(args.ckpt, args.grid, args.out, ema=not args.raw_weights,
                             overwrite=args.overwrite)
      print(f"wrote elastic model (R={m.elastic_grid}, default n={m.mediator_num}) -> {path}")
  except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
