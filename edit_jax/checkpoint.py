"""Checkpoints: Orbax CheckpointManager (async) for training state, fallbacks, and weight loading.

A training checkpoint lives in ``WORKDIR/checkpoints/<step>/`` with two items:
  - ``state``: the TrainState pytree (step, params, opt_state, ema_params), saved sharded; restored
    onto any mesh / device count by passing the target shardings (``abstract_state``).
  - ``meta``: JSON {"step", "data_position" (next global step the input pipeline reads),
    "model_config" (``edit_jax.models.model_config``), "config" (the ml_collections config)}.

Restoring walks the steps newest first. Two different failures:
  - a checkpoint that reads fine but does not fit the run (other model config, other tensor
    shapes or optimizer state) raises ``CheckpointMismatchError`` naming the differing config
    fields and tensors, and changes nothing on disk;
  - a checkpoint whose data cannot be read (truncated / corrupt files, unreadable meta) is
    reported with the error and moved aside to ``checkpoints/corrupt-<step>-<time>`` (so the run
    can save that step again), and the previous one is used.

Also here: initializing from other weights (``load_init_params`` + ``merge_params``), moving
mediator parameters to another resolution (``resize_mediator_params``) and
``load_params_for_sampling`` for the sampling CLI.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from edit_jax import models

CKPT_SUBDIR = "checkpoints"
TORCH_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors", ".bin")
# Axis of the grid dimension in each mediator axis-bias table (shapes: see edit_jax.models.attention).
AXIS_BIAS_GRID_AXIS = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint that does not fit the model."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint written by a run with another model / optimizer configuration."""


class _QuietReadOnly(logging.Filter):
  """Drops Orbax's 'Given directory is read only' warning: we open checkpoints read-only on
  purpose (sampling, evaluation), so it is not actionable."""

  def filter(self, record):
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _path_str(path) -> str:
  """A jax key path -> 'params/blocks_0/attn/qkv/kernel' (dict keys, indices, attributes)."""
  out = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return "/".join(out)


def tree_differences(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 12) -> list[str]:
  """Human-readable differences between two {path: shape} maps (missing, extra, other shape)."""
  diffs = []
  for k in sorted(wanted):
    if k not in saved:
      diffs.append(f"{k} {tuple(wanted[k])} is not in the checkpoint")
    elif tuple(saved[k]) != tuple(wanted[k]):
      diffs.append(f"{k}: checkpoint {tuple(saved[k])} vs this run {tuple(wanted[k])}")
  diffs += [f"{k} {tuple(saved[k])} is in the checkpoint but not in this run"
            for k in sorted(saved) if k not in wanted]
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CKPT_SUBDIR


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------

# Orbax saves a replicated array "replica-parallel" (its default off GPU): each replica writes one
# slice, cut on device by a small compiled program per (shape, slice). For a slice under this size
# the split saves no write time worth having (a bias, a norm scale, a step counter) and costs a
# compilation per tensor shape and replica the first time a model is saved (240 for a 3-block
# model's train state on a 4 x 2 mesh); larger tensors are still written replica-parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _use_replica_parallel_for_large_slices_only():
  """Registers orbax's jax.Array handler with REPLICA_PARALLEL_MIN_SLICE_BYTES, once, when the
  registered one is orbax's own default (a handler someone else registered is left alone)."""
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if (type(current) is not ocp.type_handlers.ArrayHandler
      or getattr(current, "_min_slice_bytes_for_replica_parallel", None) is not None):
    return
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=getattr(current, "_array_metadata_store", None),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``meta``."""

  def __init__(self, directory, max_to_keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    directory = str(directory)
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self._opts = dict(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                      create=not read_only, read_only=read_only)
    _use_replica_parallel_for_large_slices_only()
    self.manager = self._make()

  def _make(self):
    return ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                 options=ocp.CheckpointManagerOptions(**_read_only_safe(self._opts)))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = True) -> bool:
    """Starts an (async) save of ``state`` and ``meta`` at ``step``."""
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(int(step)))
    except Exception:  # noqa: BLE001 - the preemption service is optional
      return False

  def restore_meta(self, step: int) -> dict:
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def saved_shapes(self, step: int) -> dict[str, tuple] | None:
    """{tensor path: shape} of the saved ``state`` item (from its metadata), None if unreadable."""
    try:  # a read-only manager that knows the item handlers (needed to read metadata)
      reader = ocp.CheckpointManager(
          self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                         "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(**_read_only_safe(dict(
              self._opts, read_only=True, create=False, enable_async_checkpointing=False))))
      try:
        md = reader.item_metadata(int(step))["state"]
      finally:
        reader.close()
      flat = jax.tree_util.tree_flatten_with_path(md)[0]
    except Exception:  # noqa: BLE001 - unreadable metadata: the caller treats it as corrupt
      return None
    if not flat:
      return None
    return {_path_str(k): tuple(getattr(v, "shape", ())) for k, v in flat}

  def restore(self, abstract_state, step: int | None = None,
              compare_meta=None) -> tuple[Any, dict] | None:
    """(state, meta) from ``step`` (default: newest usable one), or None if there is none.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set (the target
    mesh/shardings; they may differ from the ones at save time). ``compare_meta(meta)``:
    optional, returns (differences that forbid resuming, other differences) as lists of
    "field: checkpoint -> now" strings.

    A readable checkpoint that does not fit (``compare_meta`` reports blocking differences, or
    the saved tensors differ from ``abstract_state``) raises ``CheckpointMismatchError`` naming
    the fields and tensors; nothing on disk changes. Unreadable checkpoints are reported with
    logging.error, moved aside, and the previous step is tried.
    """
    steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
    wanted = {_path_str(k): tuple(v.shape)
              for k, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    errors = []
    for s in steps:
      try:
        meta = self.restore_meta(s)
      except Exception as e:  # noqa: BLE001 - unreadable meta means "corrupt"
        self._unreadable(s, e, step, errors)
        continue
      blocking, others = compare_meta(meta) if compare_meta is not None else ([], [])
      if blocking:
        saved = self.saved_shapes(s)
        raise self._mismatch(s, blocking, tree_differences(saved, wanted) if saved else [])
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # noqa: BLE001 - sorted out below: mismatch or corrupt
        saved = self.saved_shapes(s)
        tensors = tree_differences(saved, wanted) if saved else []
        if tensors:
          raise self._mismatch(s, others, tensors) from e
        self._unreadable(s, e, step, errors)
        continue
      if errors:
        logging.warning("resumed from checkpoint step %d after skipping unreadable ones: %s", s,
                        "; ".join(errors))
      return out["state"], meta
    if errors:
      raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors)
                            + ". Delete the directory to start from scratch.")
    return None

  def _mismatch(self, step: int, fields: list[str], tensors: list[str]) -> CheckpointMismatchError:
    parts = [f"checkpoint step {step} in {self.directory} was written by a run with another "
             f"configuration, so this run cannot resume from it"]
    if fields:
      parts.append("config fields that differ (checkpoint -> this run): " + "; ".join(fields))
    if tensors:
      parts.append("tensors that differ: " + "; ".join(tensors))
    parts.append("nothing on disk was changed. Rerun with the checkpoint's settings (see "
                 "config.json beside checkpoints/) to resume, or pass a new --workdir (add "
                 "--config.init_from=<this workdir> to start from its weights)")
    return CheckpointMismatchError(". ".join(parts))

  def _unreadable(self, s: int, e: Exception, step: int | None, errors: list[str]):
    msg = (f"checkpoint step {s} in {self.directory} is unreadable "
           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})")
    if step is not None:
      raise CheckpointError(msg + ": delete it or pick another step") from e
    logging.error("%s; falling back to the previous checkpoint", msg)
    errors.append(msg)
    self._quarantine(s)

  def _quarantine(self, step: int):
    """Moves an unreadable step directory aside so the step can be saved again."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"corrupt-{step}-{int(time.time())}"
      try:
        src.rename(dst)
        logging.error("moved unreadable checkpoint %s to %s", src, dst)
      except Exception as e:  # noqa: BLE001
        logging.error("could not move unreadable checkpoint %s aside: %s", src, e)
    _barrier(f"quarantine-{step}")
    self.manager.close()
    self.manager = self._make()


def _read_only_safe(opts: dict) -> dict:
  """Manager options; read-only ones get the values Orbax would force (and warn about)."""
  opts = dict(opts)
  if opts.get("read_only"):
    opts.update(max_to_keep=None, save_interval_steps=0)
  return opts


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) carrying ``shardings``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------------------------
# Resolution change for mediator models
# ----------------------------------------------------------------------------------------------

def _interp_align_corners(x: np.ndarray, axis: int, new: int) -> np.ndarray:
  """1-D linear interpolation along ``axis`` to ``new`` points, align_corners=True."""
  old = x.shape[axis]
  if old == new:
    return x
  pos = np.linspace(0.0, old - 1.0, new) if new > 1 else np.zeros(1)
  lo = np.clip(np.floor(pos).astype(int), 0, old - 1)
  hi = np.clip(lo + 1, 0, old - 1)
  w = (pos - lo).astype(np.float64)
  shape = [1] * x.ndim
  shape[axis] = new
  w = w.reshape(shape)
  xl = np.take(x, lo, axis=axis).astype(np.float64)
  xh = np.take(x, hi, axis=axis).astype(np.float64)
  return (xl * (1 - w) + xh * w).astype(x.dtype)


def resize_mediator_params(params, old_grid: int, new_grid: int):
  """Moves mediator parameters from a ``old_grid`` to a ``new_grid`` token grid (the official
  256 -> 512 -> 1024 fine-tuning rule of ``train_256to512.py``).

  - ``ah_bias``/``aw_bias``/``ha_bias``/``wa_bias``: linear interpolation along their grid axis with
    ``align_corners=True`` (e.g. 16 -> 32);
  - ``an_bias``/``na_bias`` (7x7 tables, resized at run time) are kept;
  - the sin-cos position embedding is regenerated: edit_jax computes it from ``input_size``, so there
    is no parameter to change (a ``pos_embed`` leaf, if present, is recomputed).
  Returns a new tree of numpy arrays; other leaves are unchanged.
  """
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  out = {}
  for path, v in flat.items():
    name = path[-1]
    if name in AXIS_BIAS_GRID_AXIS:
      ax = AXIS_BIAS_GRID_AXIS[name]
      if v.shape[ax] != old_grid:
        raise ValueError(f"{'/'.join(path)} has shape {v.shape}: expected grid size {old_grid} on "
                         f"axis {ax}; pass the grid (input_size // patch_size) it was trained at")
      v = _interp_align_corners(v, ax, new_grid)
    elif name == "pos_embed":
      v = models.sincos_pos_embed(v.shape[-1], new_grid).reshape((1, new_grid ** 2, v.shape[-1]))
    out[path] = v
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------
# Loading weights: training workdirs, converted checkpoints, official PyTorch files
# ----------------------------------------------------------------------------------------------

def _find_training_ckpt_dir(path: epath.Path) -> tuple[epath.Path, int | None] | None:
  """(checkpoints dir, step or None) if ``path`` is a workdir, its checkpoints dir, or a step."""
  if (path / CKPT_SUBDIR).is_dir():
    return path / CKPT_SUBDIR, None
  if (path / "state").is_dir() and (path / "meta").is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() and (p / "state").is_dir() for p in path.iterdir()):
    return path, None
  return None


def _restore_params_from_training(ckdir: epath.Path, step: int | None, ema: bool):
  ck = Checkpointer(ckdir, read_only=True)
  steps = [step] if step is not None else sorted(ck.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"{ckdir} holds no checkpoints")
  key = "ema_params" if ema else "params"
  errors = []
  for s in steps:
    try:
      meta = ck.restore_meta(s)
      model = models.model_from_config(meta["model_config"])
      abstract = models.abstract_params(model)
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            abstract)
      handler_args = ocp.args.PyTreeRestore(
          item={key: target},
          restore_args={key: jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding),
                                          abstract)},
          partial_restore=True)
      out = ck.manager.restore(s, args=ocp.args.Composite(state=handler_args))
      return model, out["state"][key], meta
    except Exception as e:  # noqa: BLE001
      errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      logging.error("could not read checkpoint %s/%s (%s); trying the previous one", ckdir, s,
                    errors[-1])
  raise CheckpointError(f"no readable checkpoint in {ckdir}: " + "; ".join(errors))


def load_init_params(path: str, ema: bool = True, num_heads: int | None = None):
  """(source model or None, params as numpy tree, description) from any supported source:

  - a training workdir / its checkpoints dir / one step dir (EMA params by default);
  - a directory written by ``python -m edit_jax.convert`` (``model_config.json`` + ``params``);
  - an official PyTorch-named file (.pt/.pth/.npz/.safetensors) via
    ``edit_jax.convert.load_torch_checkpoint``.
  """
  from edit_jax import convert  # noqa: PLC0415
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"init_from={path!r} does not exist: pass a training workdir, a "
                          "directory written by `python -m edit_jax.convert`, or a .pt/.npz file")
  if p.is_file():
    if not str(p).endswith(TORCH_SUFFIXES):
      raise CheckpointError(f"init_from={path!r}: unknown file type; expected one of "
                            f"{TORCH_SUFFIXES} or a checkpoint directory")
    model, params = convert.load_torch_checkpoint(str(p), num_heads=num_heads, use_ema=ema)
    return model, jax.tree.map(np.asarray, params), f"official checkpoint {p}"
  if (p / "model_config.json").exists():
    model, params = convert.load_converted(str(p))
    return model, jax.tree.map(np.asarray, params), f"converted checkpoint {p}"
  found = _find_training_ckpt_dir(p)
  if found is None:
    raise CheckpointError(f"init_from={path!r} is a directory but neither a training workdir "
                          "(with checkpoints/) nor a converted checkpoint (with model_config.json)")
  model, params, meta = _restore_params_from_training(found[0], found[1], ema)
  return (model, jax.tree.map(np.asarray, params),
          f"training checkpoint {found[0]} step {meta.get('step')}")


def merge_params(fresh, source, *, src_grid: int | None = None, dst_grid: int | None = None,
                 place=None):
  """Copies ``source`` tensors into ``fresh`` where names and shapes match.

  ``fresh``: the new model's params (jax Arrays, possibly sharded over several hosts, or numpy);
  ``source``: host (numpy) params. Mediator axis biases whose grid differs (``src_grid`` !=
  ``dst_grid``) are resized with ``resize_mediator_params`` first. ``place(src_np, fresh_leaf)``
  puts a loaded tensor where the fresh one lives (default: numpy, cast to the fresh dtype); fresh
  leaves that are not loaded are returned untouched. Returns (merged params, report dict with
  "loaded", "missing" (kept fresh init), "mismatched" (shape differs; kept fresh), "unused").
  """
  if src_grid and dst_grid and src_grid != dst_grid:
    source = resize_mediator_params(source, src_grid, dst_grid)
  if place is None:
    place = lambda src, like: np.asarray(src, like.dtype)  # noqa: E731
  f_flat = traverse_util.flatten_dict(fresh)
  s_flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, source))
  merged, report = {}, {"loaded": [], "missing": [], "mismatched": [], "unused": []}
  for k, v in f_flat.items():
    name = "/".join(k)
    if k in s_flat and tuple(s_flat[k].shape) == tuple(v.shape):
      merged[k] = place(s_flat[k], v)
      report["loaded"].append(name)
    elif k in s_flat:
      merged[k] = v
      report["mismatched"].append(f"{name} {tuple(s_flat[k].shape)}->{tuple(v.shape)}")
    else:
      merged[k] = v
      report["missing"].append(name)
  report["unused"] = sorted("/".join(k) for k in s_flat if k not in f_flat)
  return traverse_util.unflatten_dict(merged), report


def place_like(src: np.ndarray, like: jax.Array) -> jax.Array:
  """A jax.Array with ``like``'s sharding holding host array ``src``; every process fills only
  its own shards (``make_array_from_callback``), so this works across hosts."""
  src = np.asarray(src, like.dtype)
  return jax.make_array_from_callback(src.shape, like.sharding, lambda idx: src[idx])


def load_params_for_sampling(workdir_or_ckpt: str, ema: bool = True, step: int | None = None,
                             num_heads: int | None = None, **model_overrides):
  """(model, params) for sampling/evaluation from any checkpoint.

  ``workdir_or_ckpt``: a training workdir (newest readable step, or ``step``), a checkpoints dir or
  step dir, a directory written by ``python -m edit_jax.convert``, or an official .pt/.npz file.
  ``ema``: the EMA weights (default, as the official sampler) or the raw training weights.
  ``model_overrides``: SiT fields to change (e.g. ``attention_impl="pallas"``, ``dtype=...``); the
  architecture fields must match the checkpoint. ``num_heads``: only for official files of a
  non-standard width (the converter infers it otherwise). Params land on the first local device.
  """
  from edit_jax import convert  # noqa: PLC0415
  p = epath.Path(workdir_or_ckpt)
  if not p.exists():
    raise CheckpointError(f"{workdir_or_ckpt!r} does not exist: pass a training workdir, a "
                          "converted checkpoint directory or a .pt/.npz file")
  if p.is_file():
    return convert.load_torch_checkpoint(str(p), num_heads=num_heads, use_ema=ema,
                                         **model_overrides)
  if (p / "model_config.json").exists():
    return convert.load_converted(str(p), **model_overrides)
  found = _find_training_ckpt_dir(p)
  if found is None:
    raise CheckpointError(f"{workdir_or_ckpt!r} holds no checkpoint: expected a training workdir "
                          "(checkpoints/<step>/), or a directory with model_config.json")
  model, params, meta = _restore_params_from_training(found[0], step if step is not None else found[1],
                                                      ema)
  if model_overrides:
    cfg = models.model_config(model)
    cfg.update(model_overrides)
    model = models.model_from_config(cfg)
  logging.info("loaded %s params of step %s from %s", "EMA" if ema else "raw", meta.get("step"),
               found[0])
  return model, params


def load_objective(workdir_or_ckpt: str, step: int | None = None) -> dict | None:
  """The objective a checkpoint was trained with, as ``convert.objective_record`` writes it:
  {"objective": "transport" | "gaussian", "time_scale", "diffusion" (gaussian)}, or None when
  unknown (an official file whose name says nothing; callers then default to "transport").

  Training workdirs: the run's config (``config.objective``, ``config.diffusion``); converted
  directories: model_config.json (written by ``python -m edit_jax.convert``); official files:
  the name (``DiT-*``, ``EDT-*`` -> gaussian).
  """
  from edit_jax import convert  # noqa: PLC0415
  p = epath.Path(workdir_or_ckpt)
  if not p.exists():
    raise CheckpointError(f"{workdir_or_ckpt!r} does not exist")
  if p.is_file():
    guess = convert.guess_objective(p)
    return None if guess is None else convert.objective_record(guess)
  if (p / "model_config.json").exists():
    meta = json.loads((p / "model_config.json").read_text())
    if "objective" not in meta:
      return None  # converted before objectives were recorded: SiT
    return convert.objective_record(meta["objective"], meta.get("diffusion"))
  found = _find_training_ckpt_dir(p)
  if found is None:
    return None
  ck = Checkpointer(found[0], read_only=True)
  chosen = step if step is not None else found[1]
  steps = [chosen] if chosen is not None else sorted(ck.all_steps(), reverse=True)
  for s in steps:
    try:
      cfg = ck.restore_meta(s).get("config") or {}
    except Exception:  # noqa: BLE001 - an unreadable step: try the previous one
      continue
    obj = cfg.get("objective", "transport")
    return convert.objective_record(obj, cfg.get("diffusion") if obj == "gaussian" else None)
  return None


def write_json(path, obj):
  """Writes JSON to a local or gs:// path (process 0 only is the caller's job)."""
  epath.Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

