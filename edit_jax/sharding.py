"""Device meshes and shardings for training: data parallel + FSDP, by logical axis rules.

Mesh: two axes ``("data", "fsdp")`` (names configurable), built with ``jax.sharding.Mesh`` so the
axes are Auto (Flax logical constraints fail under Explicit axes, which ``jax.make_mesh`` defaults
to). One axis may be -1 ("all remaining devices").

Batches are split over both axes (FSDP is data parallel too): batch sharding = P(("data","fsdp")).
Parameters (and the optimizer moments and EMA, which mirror them) follow the logical axis names the
model puts on them with ``nn.with_logical_partitioning`` (see ``edit_jax.models``); with
``DEFAULT_RULES`` the hidden dimension "embed" of every weight is sharded over "fsdp" and every
other axis is replicated. A parameter stays replicated when it is smaller than ``fsdp_min_size``
elements, and a dimension stays unsharded when the mesh axis size does not divide it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from flax.core.meta import AxisMetadata
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")

# logical axis name -> mesh axis (or None = replicated). Logical names: see edit_jax.models.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("heads_merged", "fsdp"),
    ("adaln", None),
    ("vocab", None),
    ("patch_out", None),
)


class MeshError(ValueError):
  """A mesh or batch setting does not fit the devices; the message says how to fix it."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = AXES) -> tuple[int, ...]:
  """Replace a single -1 in ``shape`` so that prod(shape) == num_devices; validate."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axis_names):
    raise MeshError(f"mesh shape {shape} has {len(shape)} axes but the mesh axes are "
                    f"{tuple(axis_names)}: give one size per axis, e.g. --config.mesh_shape="
                    f"'({-1}, 1)'")
  if sum(s == -1 for s in shape) > 1:
    raise MeshError(f"mesh shape {shape} has more than one -1: at most one axis can take "
                    "'all remaining devices'")
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh shape {shape} has a size that is 0 or negative (other than -1)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f"mesh shape {shape}: {num_devices} devices are not divisible by the fixed "
                      f"axes' product {known}; use sizes whose product divides {num_devices}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are "
                    f"available: make the product of the sizes {num_devices}, or use -1 for one "
                    "axis")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ``jax.sharding.Mesh`` (Auto axes) over ``devices`` (default: all devices).

  Uses ``mesh_utils.create_device_mesh`` for a topology-aware layout on TPU/GPU, a plain reshape
  otherwise (e.g. a subset of devices).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices), axis_names)
  try:
    if len(devices) == len(jax.devices()) and jax.process_count() == 1:
      from jax.experimental import mesh_utils  # noqa: PLC0415
      arr = mesh_utils.create_device_mesh(shape, devices=devices)
    elif jax.process_count() > 1 and len(devices) == len(jax.devices()):
      from jax.experimental import mesh_utils  # noqa: PLC0415
      arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
      arr = np.asarray(devices, dtype=object).reshape(shape)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, tuple(axis_names))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH) -> NamedSharding:
  """Leading (batch) dimension split over ``batch_axes``, the rest replicated."""
  return NamedSharding(mesh, P(tuple(a for a in batch_axes if a in mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh, batch_axes: Sequence[str] = BATCH) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes if a in mesh.axis_names)


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1,
                     process_count: int | None = None) -> None:
  """Raise MeshError unless the global batch splits evenly over devices/processes/micro-steps."""
  process_count = jax.process_count() if process_count is None else process_count
  n = batch_devices(mesh)
  if grad_accum_steps < 1:
    raise MeshError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
  if global_batch_size % process_count:
    raise MeshError(f"global batch size {global_batch_size} is not divisible by the number of "
                    f"processes {process_count}")
  if global_batch_size % (n * grad_accum_steps):
    k = n * grad_accum_steps
    raise MeshError(
        f"global batch size {global_batch_size} is not divisible by the {n} devices of the batch "
        f"axes{' x ' + str(grad_accum_steps) + ' accumulation steps' if grad_accum_steps > 1 else ''}"
        f": use a multiple of {k} (e.g. {max(k, global_batch_size // k * k)}), or change "
        "mesh_shape / grad_accum_steps")


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  """Drop mesh axes that do not divide their dimension; replicate tensors below ``min_size``."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if dim % size == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES, fsdp_min_size: int = 0):
  """NamedShardings for a tree that may hold ``nn.LogicallyPartitioned`` boxes.

  ``abstract_tree``: the (boxed) output of ``jax.eval_shape`` of an init function. Leaves without
  logical metadata are replicated. Returns a tree matching ``nn.unbox(abstract_tree)``.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(abstract_tree)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, tuple(x.shape), mesh, fsdp_min_size)),
      mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def strip_boxes(tree):
  """Replace ``nn.Partitioned``/``LogicallyPartitioned`` boxes by their values.

  Unlike ``nn.unbox`` this adds no sharding constraints (which need a concrete mesh context).
  """
  is_box = lambda x: isinstance(x, AxisMetadata)  # noqa: E731

  def strip(x):
    if isinstance(x, nn.Partitioned):
      return x.unbox(apply_constraint=False)
    return x.unbox() if is_box(x) else x

  return jax.tree.map(strip, tree, is_leaf=is_box)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES, with ``config.sharding_rules`` (a sequence of (logical, mesh axis)) first."""
  extra = tuple(tuple(r) for r in (config.get("sharding_rules", None) or ()))
  if not config.get("fsdp", True):
    extra = extra + tuple((name, None) for name, ax in DEFAULT_RULES if ax == "fsdp")
  return extra + DEFAULT_RULES


def describe(tree_of_shardings) -> dict[str, str]:
  """{'path': 'PartitionSpec(...)'} for logging/tests."""
  flat = jax.tree_util.tree_flatten_with_path(tree_of_shardings)[0]
  return {jax.tree_util.keystr(k): str(s.spec) for k, s in flat}
