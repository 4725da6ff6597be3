"""Load official PyTorch SiT / Attention-Mediators / DyDiT checkpoints into edit_jax.

    model, params = load_torch_checkpoint("SiT-XL-2-256x256.pt")
    out = model.apply({"params": params}, x_nhwc, t, y)

The architecture (depth, width, patch, in-channels, classes, learned sigma, mediator count and which
blocks have mediators, input size, DyDiT routers and their format) is inferred from the tensors; the
number of heads comes from the standard size table (S/B/L/XL) or from the mediator bias tables,
unless given. DyDiT checkpoints (`blocks.i.attn_rate.router`, `mlp_rate.router`,
`token_selection.mlp_head.{0,2}`) load as `edit_jax.models.dydit.DyDiT` in either released router
format (H - 1 outputs with unit 0 forced on, or the first release's H outputs).

PyTorch layouts at this boundary: Linear weights (out, in) -> kernel (in, out); Conv2d weights
(out, in, kh, kw) -> kernel (kh, kw, in, out); the model itself is NHWC.

The tensors cannot tell DiT from SiT (same network): the objective the weights were trained with
is an argument and is recorded with the converted checkpoint (`objective_record`), so that
sampling picks the right sampler. DiT checkpoints (`DiT-XL-2-256x256.pt`) use
`--objective gaussian` (DiT's 1000-step linear diffusion; the network sees integer timesteps
0..999); SiT ones `--objective transport` (t in [0, 1]). Without the flag, a file named `DiT-*` or
`EDT-*`, or any official EDT checkpoint (EDT trains with DiT's diffusion), is taken as gaussian and
anything else as transport (the command prints which).

Command line (writes an Orbax checkpoint that training and sampling restore):
    python -m edit_jax.convert SRC OUT_DIR [--objective transport|gaussian] [--diffusion_steps 1000]
        [--num_heads H] [--model_only] [--overwrite] [--debug]

Files that are not checkpoints are named in a ValueError; PyTorch files are read with
``weights_only=True`` only (never unpickling arbitrary objects). CLI user errors: one line on
stderr, exit status 2 (``edit_jax.cli``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np

from edit_jax import cli, models

SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")


# --------------------------------------------------------------------------- reading
def _torch_load(path):
  """A torch.save file as nested dicts whose tensors are pt_reader.LazyTensor (or np.ndarray).

  Read without torch by edit_jax.pt_reader (allow-listed unpickling: no code runs). Files it
  cannot read (pre-1.6 format, pickled objects outside its allow-list) are handed to
  ``torch.load(weights_only=True)`` when torch is installed, else its error explains the fix.
  """
  from edit_jax import pt_reader  # noqa: PLC0415
  try:
    return pt_reader.load(path)
  except (pt_reader.LegacyFormatError, pt_reader.UnsafePickleError) as e:
    try:
      import torch  # noqa: PLC0415
    except ImportError:
      raise ValueError(f"{e} (or install torch, which this reader falls back to)") from None
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as te:  # noqa: BLE001
      # torch's own message advises unsafe loading: name only the error type.
      raise ValueError(f"{e}\n(torch.load(weights_only=True) failed too: "
                       f"{type(te).__name__})") from None


def _read_npz(path) -> dict:
  import zipfile  # noqa: PLC0415
  try:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
      reason = "it holds a single array, not named arrays"
    else:
      with f:
        return {k: f[k] for k in f.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    msg = str(e)
    reason = ("it is not a zip archive of .npy arrays" if "pickle" in msg
              or isinstance(e, (zipfile.BadZipFile, EOFError)) else msg.splitlines()[0][:200])
  raise ValueError(f"{path} is not a checkpoint: numpy cannot read it as an .npz of named arrays "
                   f"({reason}). Expected a file written by np.savez(path, **state_dict) with one "
                   f"array per official parameter name")


def _read_safetensors(path) -> dict:
  from safetensors.numpy import load_file  # noqa: PLC0415
  try:
    return load_file(str(path))
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} is not a checkpoint: it cannot be read as a .safetensors file "
                     f"({reason}); the file is damaged or has another format") from None


def _to_numpy(v):
  if hasattr(v, "detach"):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  a = np.asarray(v)  # np.ndarray or pt_reader.LazyTensor (reads its bytes now)
  if a.dtype.name == "bfloat16":
    a = a.astype(np.float32)
  return a


def read_state_dict(src, use_ema: bool = True) -> dict[str, np.ndarray]:
  """Returns the model state_dict (name -> np.ndarray) from a path or a mapping.

  Training checkpoints ({"model", "ema", "opt", "args", ...}) yield "ema" by default ("model" with
  use_ema=False). A DDP "module." prefix is stripped.
  """
  if isinstance(src, (str, os.PathLike)):
    path = pathlib.Path(src)
    if not path.exists():
      raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if not path.is_file():
      raise IsADirectoryError(f"{path} is a directory, not a checkpoint file: pass a .pt/.pth, "
                              f".npz or .safetensors file (load_converted reads converted dirs)")
    if suffix in (".pt", ".pth", ".bin"):
      obj = _torch_load(str(path))
    elif suffix == ".npz":
      obj = _read_npz(path)
    elif suffix == ".safetensors":
      obj = _read_safetensors(path)
    else:
      raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; expected one of {SUFFIXES}")
  elif isinstance(src, Mapping):
    obj = src
  else:
    raise TypeError(f"src must be a path or a mapping name -> array, got {type(src).__name__}")

  if "ema" in obj or "model" in obj:
    key = "ema" if (use_ema and "ema" in obj) else "model"
    if key not in obj:
      raise ValueError(f"checkpoint has no {key!r} entry; its keys are {sorted(obj)}")
    obj = obj[key]
  elif any(k.startswith(("ema.", "model.")) for k in obj):  # flattened training checkpoint (npz)
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in obj) else "model."
    obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
  sd = {}
  for k, v in obj.items():
    if k.startswith("module."):
      k = k[len("module."):]
    sd[k] = _to_numpy(v)
  return sd


# --------------------------------------------------------------------------- inference
def _learn_sigma(sd, in_ch: int, p: int) -> bool:
  """Whether the final layer also outputs the learned-sigma channels (2 x in_channels)."""
  out_ch = int(sd["final_layer.linear.weight"].shape[0]) // (p * p)
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"final_layer.linear has {out_ch * p * p} outputs, which fits neither "
                     f"learn_sigma=True ({2 * in_ch * p * p}) nor False ({in_ch * p * p})")
  return out_ch == 2 * in_ch


def is_edt_state_dict(sd: Mapping[str, Any]) -> bool:
  """An official EDT state_dict (xinwangChen/EDT) has DownSample `reduction` weights."""
  return any(re.fullmatch(r"down_blocks\.\d+\.reduction\.weight", k) for k in sd)


def infer_edt_config(sd: Mapping[str, np.ndarray], **overrides) -> dict:
  """EDT constructor arguments inferred from an official EDT state_dict.

  Per block: width from `attn.qkv.weight` (3w, w), heads and token grid from the relative-position
  table ((2g-1)^2, heads); stages are the runs of equal grid (neighbouring stages always differ by
  a 2x2 merge). AMM placement is not stored in checkpoints: `amm_layers` defaults to the official
  list of the layout (pass amm_layers=... to change it).
  """
  need = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight",
          "final_layer.linear.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise ValueError(f"not an official EDT state_dict: missing {missing}")
  w = sd["x_embedder.proj.weight"]
  d0, in_ch, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
  block_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
  if block_ids != list(range(len(block_ids))) or not block_ids:
    raise ValueError(f"state_dict blocks are not numbered 0..n-1: {block_ids}")
  widths, heads, grids = [], [], []
  for i in block_ids:
    tab = f"blocks.{i}.attn.rel_pos_bias.relative_position_bias_table"
    if tab not in sd:
      raise ValueError(f"{tab} missing: every official EDT block has a relative-position table")
    rows, h = (int(v) for v in sd[tab].shape)
    side = int(round(rows ** 0.5))
    if side * side != rows or side % 2 == 0:
      raise ValueError(f"{tab} has {rows} rows, not (2g-1)^2 for an integer grid g")
    widths.append(int(sd[f"blocks.{i}.attn.qkv.weight"].shape[1]))
    heads.append(h)
    grids.append((side + 1) // 2)
  depths, dims, sheads, sgrids = [], [], [], []
  for i, g in enumerate(grids):
    if i == 0 or g != grids[i - 1] or widths[i] != widths[i - 1] or heads[i] != heads[i - 1]:
      depths.append(0)
      dims.append(widths[i])
      sheads.append(heads[i])
      sgrids.append(g)
    depths[-1] += 1
  n_down = len([k for k in sd if re.fullmatch(r"down_blocks\.\d+\.reduction\.weight", k)])
  if len(depths) != 2 * n_down + 1:
    raise ValueError(f"found {len(depths)} stages (block grids {grids}) but {n_down} DownSample "
                     f"modules: expected {2 * n_down + 1} stages")
  rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
  learn_sigma = _learn_sigma(sd, in_ch, p)
  cfg = dict(arch="edt", input_size=sgrids[0] * p, patch_size=p, in_channels=in_ch,
             stage_depths=tuple(depths), stage_dims=tuple(dims), stage_heads=tuple(sheads),
             mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / widths[0],
             num_classes=rows - 1, class_dropout_prob=0.1, learn_sigma=learn_sigma)
  if dims[0] != d0:
    raise ValueError(f"stage-0 width {dims[0]} differs from the patch embedding width {d0}")
  token_enhance = "down_blocks.0.adaLN_modulation.1.weight" in sd
  cfg["token_enhance"] = token_enhance
  cfg.update(overrides)
  return cfg


def infer_config(sd: Mapping[str, np.ndarray], num_heads: int | None = None, **overrides) -> dict:
  """Model constructor arguments inferred from an official state_dict (SiT, DiT, Attention
  Mediators; DyDiT adds arch="dydit" and the router format; EDT "arch": "edt")."""
  if is_edt_state_dict(sd):
    if num_heads is not None:
      raise ValueError("num_heads is read from an EDT checkpoint's relative-position tables; do "
                       "not pass it")
    return infer_edt_config(sd, **overrides)
  need = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise ValueError(f"not an official SiT state_dict: missing {missing} "
                     f"(first keys: {sorted(sd)[:8]})")
  w = sd["x_embedder.proj.weight"]
  d, in_ch, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
  block_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
  depth = len(block_ids)
  if block_ids != list(range(depth)):
    raise ValueError(f"state_dict blocks are not numbered 0..{depth - 1}: {block_ids}")
  rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
  learn_sigma = _learn_sigma(sd, in_ch, p)
  med_blocks = [i for i in block_ids if f"blocks.{i}.attn.an_bias" in sd]
  mediator_num = int(sd[f"blocks.{med_blocks[0]}.attn.an_bias"].shape[1]) if med_blocks else 0
  elastic_grid = 0
  if med_blocks and sd[f"blocks.{med_blocks[0]}.attn.an_bias"].ndim == 5:
    # edit_jax elastic tables (h, R, R, 7, 7) (edit_jax.elastic), not an official layout
    elastic_grid, mediator_num = mediator_num, mediator_num ** 2
  if num_heads is None and med_blocks:
    num_heads = int(sd[f"blocks.{med_blocks[0]}.attn.an_bias"].shape[0])
  if num_heads is None:
    if d not in models.HEADS_BY_WIDTH:
      raise ValueError(f"hidden size {d} is not a standard SiT width {sorted(models.HEADS_BY_WIDTH)}:"
                       f" pass num_heads=... to load_torch_checkpoint")
    num_heads = models.HEADS_BY_WIDTH[d]
  if "pos_embed" in sd:
    tokens = int(sd["pos_embed"].shape[1])
    grid = int(round(tokens ** 0.5))
  elif med_blocks:
    grid = int(sd[f"blocks.{med_blocks[0]}.attn.ah_bias"].shape[-2])
  else:
    grid = None
  cfg = dict(
      hidden_size=d, in_channels=in_ch, patch_size=p, depth=depth, num_heads=num_heads,
      num_classes=rows - 1, class_dropout_prob=0.1, learn_sigma=learn_sigma,
      mediator_num=mediator_num,
      mediator_layers=None if len(med_blocks) == depth else tuple(med_blocks))
  if elastic_grid:
    cfg["elastic_grid"] = elastic_grid
  if depth and f"blocks.{block_ids[0]}.mlp.fc1.weight" in sd:
    cfg["mlp_ratio"] = sd[f"blocks.{block_ids[0]}.mlp.fc1.weight"].shape[0] / d
  if depth:
    cfg.update(_infer_dydit(sd, block_ids[0], d, num_heads))
  if grid is not None:
    cfg["input_size"] = grid * p
  cfg.update(overrides)
  if "input_size" not in cfg:
    raise ValueError("cannot infer the input size (no pos_embed and no mediator tables): pass "
                     "input_size=... (latent size, e.g. 32 for 256 px images)")
  return cfg


def _infer_dydit(sd, b0: int, d: int, num_heads: int) -> dict:
  """DyDiT fields when the state_dict has DyDiT routers (else {}).

  Two released router formats: alibaba-damo-academy/DyDiT `attn_rate.router` / `mlp_rate.router`
  with H - 1 outputs (unit 0 always on) -> router_format "forced"; the first NUS-HPC-AI-Lab release
  with H outputs -> "all". The token router's hidden width gives token_router_ratio = D / hidden.
  """
  key = f"blocks.{b0}.attn_rate.router.weight"
  tok = f"blocks.{b0}.token_selection.mlp_head.0.weight"
  if key not in sd and tok not in sd:
    return {}
  out = {"arch": "dydit", "width_routing": key in sd, "token_routing": tok in sd}
  if key in sd:
    units = int(sd[key].shape[0])
    if units == num_heads - 1:
      out["router_format"] = "forced"
    elif units == num_heads:
      out["router_format"] = "all"
    else:
      raise ValueError(f"{key} has {units} outputs, which fits neither DyDiT router format for "
                       f"{num_heads} heads ({num_heads - 1}: unit 0 forced on; {num_heads}: the "
                       f"first release): pass the right num_heads")
  if tok in sd:
    hidden = int(sd[tok].shape[0])
    if d % hidden:
      raise ValueError(f"{tok} has {hidden} rows; DyDiT's token router is D -> D/r -> 1 with D={d}")
    out["token_router_ratio"] = d // hidden
  return out


# --------------------------------------------------------------------------- name mapping
def torch_to_flax_name(name: str) -> tuple[tuple[str, ...], str]:
  """'blocks.3.attn.qkv.weight' -> (('blocks_3', 'attn', 'qkv', 'kernel'), 'linear')."""
  parts = name.split(".")
  leaf = parts[-1]
  mods: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and mods:
      mods[-1] = f"{mods[-1]}_{p}"
    else:
      mods.append(p)
  if leaf == "weight" and mods and mods[-1] == "embedding_table":
    return tuple(mods), "copy"
  if leaf == "weight":
    return tuple(mods) + ("kernel",), "weight"
  return tuple(mods) + (leaf,), "copy"


def _convert_tensor(v: np.ndarray, kind: str) -> np.ndarray:
  if kind == "weight":
    if v.ndim == 2:
      return v.T
    if v.ndim == 4:
      return v.transpose(2, 3, 1, 0)
  return v


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def fixed_embeddings(model) -> dict[str, np.ndarray]:
  """The frozen sin-cos embeddings an official state_dict stores (name -> (1, N, C)); this port
  recomputes them, the converter checks them."""
  out = {"pos_embed": models.sincos_pos_embed(model.hidden_size, model.grid)[None]}
  if models.arch_of(model) == "edt" and model.pos_supplement:
    sg, dims = model.stage_grids, model.stage_dims
    for s in range(model.num_down):
      out[f"down_blocks.{s}.pos_embed"] = models.sincos_pos_embed(dims[s + 1], sg[s + 1])[None]
    for j, s in enumerate(range(model.num_down + 1, model.num_stages)):
      out[f"concat_blocks.{j}.pos_embed"] = models.sincos_pos_embed(dims[s], sg[s])[None]
  return out


def state_dict_to_params(sd: Mapping[str, np.ndarray], model) -> dict:
  """Converts an official state_dict for `model` (SiT or EDT); raises listing every mismatching
  tensor. Frozen sin-cos embeddings are not parameters here: their shapes are checked (and for
  EDT their values, which must equal the recomputed ones to 1e-5)."""
  expected = {path: tuple(s.shape) for path, s in _flatten(models.abstract_params(model)).items()}
  fixed = fixed_embeddings(model)
  edt = models.arch_of(model) == "edt"
  flat, unexpected, misshaped = {}, [], []
  for name, v in sd.items():
    if name in fixed or name.endswith("pos_embed"):
      want = fixed.get(name)
      if want is None:
        unexpected.append(f"{name} {tuple(v.shape)}")
      elif tuple(v.shape) != want.shape:
        misshaped.append(f"{name}: checkpoint {tuple(v.shape)} vs model {want.shape}")
      elif edt and np.abs(np.asarray(v, np.float32) - want).max() > 1e-5:
        misshaped.append(f"{name}: values differ from the 2-D sin-cos embedding this port "
                         f"recomputes (max |diff| {np.abs(np.asarray(v) - want).max():.3g})")
      continue  # recomputed, not a parameter
    path, kind = torch_to_flax_name(name)
    if path not in expected:
      unexpected.append(f"{name} {tuple(v.shape)}")
      continue
    arr = _convert_tensor(np.asarray(v, np.float32), kind)
    if tuple(arr.shape) != expected[path]:
      misshaped.append(f"{name}: checkpoint {tuple(v.shape)} -> {tuple(arr.shape)} vs model "
                       f"{expected[path]}")
      continue
    flat[path] = arr
  missing = ["/".join(p) + f" {s}" for p, s in expected.items() if p not in flat and
             not any(m.startswith("/".join(p)) for m in misshaped)]
  if missing or unexpected or misshaped:
    if edt:
      desc = (f"EDT stage_depths={list(model.stage_depths)}, stage_dims={list(model.stage_dims)}, "
              f"stage_heads={list(model.stage_heads)}, input_size={model.input_size}, "
              f"patch={model.patch_size}")
    else:
      desc = (f"depth={model.depth}, hidden={model.hidden_size}, heads={model.num_heads}, "
              f"input_size={model.input_size}, patch={model.patch_size}, mediator_num="
              f"{model.mediator_num}, mediator_blocks={list(model.mediator_blocks)}")
    lines = [f"checkpoint does not match the model ({desc}):"]
    lines += [f"  missing from checkpoint: {m}" for m in missing]
    lines += [f"  unexpected in checkpoint: {m}" for m in unexpected]
    lines += [f"  wrong shape: {m}" for m in misshaped]
    raise ValueError("\n".join(lines))
  return _unflatten(flat)


class _ShapeOnly:
  """Stand-in for an abstract leaf: supports .ndim, .T and .transpose for the name mapping."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(shape), dtype

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def T(self):  # noqa: N802
    return jax.ShapeDtypeStruct(self.shape[::-1], self.dtype)

  def transpose(self, *axes):
    return jax.ShapeDtypeStruct(tuple(self.shape[a] for a in axes), self.dtype)


def params_to_state_dict(params, model=None) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params` (plus the fixed embeddings when `model` is given):
  official names and torch layouts. Abstract params (ShapeDtypeStructs, e.g.
  `models.abstract_params(model)`) give ShapeDtypeStructs of the torch shapes."""
  sd = {}
  if model is not None:
    sd.update(fixed_embeddings(model))
  for path, v in _flatten(params).items():
    if isinstance(v, jax.ShapeDtypeStruct):  # abstract params: names and torch shapes only
      v = _ShapeOnly(v.shape, v.dtype)
    else:
      v = np.asarray(jax.device_get(v))
    mods = []
    for m in path[:-1]:
      mm = re.fullmatch(r"(.*)_(\d+)", m)
      if mm and mm.group(1) in ("blocks", "mlp", "adaLN_modulation", "mlp_head", "down_blocks",
                                "up_blocks", "concat_blocks"):
        mods += [mm.group(1), mm.group(2)]
      else:
        mods.append(m)
    leaf = path[-1]
    if leaf == "kernel":
      sd[".".join(mods + ["weight"])] = v.T if v.ndim == 2 else v.transpose(3, 2, 0, 1)
    else:
      if isinstance(v, _ShapeOnly):
        v = jax.ShapeDtypeStruct(v.shape, v.dtype)
      sd[".".join(mods + (["embedding_table", "weight"] if leaf == "embedding_table" else [leaf]))] = v
  return sd


def load_torch_checkpoint(src, num_heads: int | None = None, use_ema: bool = True, **overrides):
  """(model, params) from an official checkpoint (path or mapping name -> array).

  overrides: any SiT field (e.g. attention_impl="pallas", dtype=jnp.bfloat16, input_size=...).
  """
  sd = read_state_dict(src, use_ema=use_ema)
  cfg = infer_config(sd, num_heads=num_heads, **overrides)
  model = models.build_model(None, **cfg)
  params = state_dict_to_params(sd, model)
  return model, jax.tree_util.tree_map(jax.numpy.asarray, params)


# --------------------------------------------------------------------------- Orbax I/O
def save_converted(out_dir, model: models.SiT, params, overwrite: bool = False, extra=None):
  """Writes OUT_DIR/params (Orbax) and OUT_DIR/model_config.json. Never overwrites silently."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  out = pathlib.Path(out_dir).resolve()
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out} exists and is not empty: choose a new directory or pass "
                            f"--overwrite")
    import shutil  # noqa: PLC0415
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out / "params", params)
  ckptr.wait_until_finished()
  meta = {"model_config": models.model_config(model), **(extra or {})}
  (out / "model_config.json").write_text(json.dumps(meta, indent=2))
  return out


def load_converted(ckpt_dir, **overrides):
  """(model, params) from a directory written by `save_converted` / the CLI."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  d = pathlib.Path(ckpt_dir).resolve()
  cfg_path = d / "model_config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: {d} is not a converted checkpoint directory "
                            f"(write one with python -m edit_jax.convert SRC {d})")
  cfg = json.loads(cfg_path.read_text())["model_config"]
  cfg.update(overrides)
  model = models.model_from_config(cfg)
  target = models.abstract_params(model)
  params = ocp.StandardCheckpointer().restore(d / "params", target)
  return model, params


OBJECTIVES = ("transport", "gaussian")


def guess_objective(path) -> str | None:
  """"gaussian" for official DiT/EDT file names (`DiT-*`, `EDT-*`), "transport" for `SiT-*`,
  else None."""
  name = pathlib.Path(str(path)).name.lower()
  if name.startswith(("dit", "edt")):
    return "gaussian"
  if name.startswith("sit"):
    return "transport"
  return None


def objective_record(objective: str, diffusion: Mapping | None = None) -> dict:
  """What converted checkpoints record about the objective: {"objective", "time_scale" (the
  model's timestep range: 1 for the transport's t in [0, 1], T for Gaussian timesteps 0..T-1),
  and for "gaussian" "diffusion" (DiT's create_diffusion settings, defaults filled in)}."""
  from edit_jax.diffusion import gaussian  # noqa: PLC0415
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: expected one of {list(OBJECTIVES)}")
  if objective == "transport":
    if diffusion:
      raise ValueError("diffusion settings only apply to objective='gaussian'")
    return {"objective": "transport", "time_scale": 1.0}
  settings = dict(gaussian.DIFFUSION_DEFAULTS)
  unknown = set(diffusion or {}) - set(settings)
  if unknown:
    raise ValueError(f"unknown diffusion settings {sorted(unknown)}; valid: {sorted(settings)}")
  settings.update(diffusion or {})
  gaussian.get_named_beta_schedule(settings["noise_schedule"], settings["diffusion_steps"])
  return {"objective": "gaussian", "time_scale": float(settings["diffusion_steps"]),
          "diffusion": settings}


def _record_from_args(objective: str, diffusion_steps) -> dict:
  if diffusion_steps is not None and objective != "gaussian":
    raise ValueError(f"--diffusion_steps applies to --objective gaussian only (this run: "
                     f"{objective}): drop it or pass --objective gaussian")
  return objective_record(objective, None if diffusion_steps is None
                          else {"diffusion_steps": diffusion_steps})


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m edit_jax.convert", description=__doc__.split("\n")[0])
  ap.add_argument("src", help="official checkpoint: .pt/.pth (read without torch), .npz or "
                  ".safetensors")
  ap.add_argument("out_dir", help="output directory for the Orbax checkpoint")
  ap.add_argument("--objective", choices=OBJECTIVES, default=None,
                  help="what the weights were trained with: gaussian (DiT, EDT) or transport "
                       "(SiT); default: from the file name (DiT-*/EDT-* -> gaussian), EDT "
                       "weights -> gaussian, else transport")
  ap.add_argument("--diffusion_steps", type=int, default=None,
                  help="gaussian only: the training chain length (DiT: 1000)")
  ap.add_argument("--num_heads", type=int, default=None)
  ap.add_argument("--model_only", action="store_true", help="use 'model' instead of 'ema'")
  ap.add_argument("--overwrite", action="store_true")
  cli.add_debug_flag(ap)
  args = ap.parse_args(argv)
  objective = args.objective or guess_objective(args.src)  # None: decided by the architecture
  if objective is not None:
    record = _record_from_args(objective, args.diffusion_steps)
  src = pathlib.Path(args.src)
  if not src.exists():
    raise FileNotFoundError(f"checkpoint {src} does not exist")
  out_dir = pathlib.Path(args.out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir} exists and is a file: choose a directory for the output")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
    raise FileExistsError(f"{out_dir.resolve()} exists and is not empty: choose a new directory "
                          f"or pass --overwrite")
  model, params = load_torch_checkpoint(args.src, num_heads=args.num_heads,
                                        use_ema=not args.model_only)
  if objective is None:  # official EDT weights were trained with DiT's Gaussian diffusion
    objective = "gaussian" if models.arch_of(model) == "edt" else "transport"
    record = _record_from_args(objective, args.diffusion_steps)
  if objective == "gaussian" and not model.learn_sigma:
    print("note: no learned-sigma channels: the Gaussian objective samples with the fixed "
          "(large) variance")
  out = save_converted(args.out_dir, model, params, overwrite=args.overwrite,
                       extra={"source": str(args.src), **record})
  print(f"converted {args.src} -> {out}: {describe(model)} "
        f"params={models.count_params(params):,} objective={objective}"
        f"{'' if args.objective else ' (from the file name or architecture; pass --objective to choose)'}")


def describe(model) -> str:
  """One line naming the architecture (SiT/DiT or EDT)."""
  if models.arch_of(model) == "edt":
    return (f"EDT stage_depths={list(model.stage_depths)} stage_dims={list(model.stage_dims)} "
            f"stage_heads={list(model.stage_heads)} patch={model.patch_size} "
            f"input={model.input_size} classes={model.num_classes} "
            f"amm_blocks={list(model.amm_blocks)}")
  return (f"depth={model.depth} hidden={model.hidden_size} heads={model.num_heads} "
          f"patch={model.patch_size} input={model.input_size} classes={model.num_classes} "
          f"mediator_num={model.mediator_num}")


if __name__ == "__main__":
  cli.run(main, "python -m edit_jax.convert")
