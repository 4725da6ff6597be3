"""Model families (Flax linen; NHWC images; parameters are plain pytrees).

  sit        SiT/DiT backbone: embedders, adaLN-Zero blocks, final layer, construction helpers
             (`build_model`, `init_params`, `model_config`, ...). DiT is this network with integer
             timesteps (see `edit_jax.diffusion.gaussian`).
  dydit      DyDiT: SiT/DiT with timestep-wise width routers and token routers, registered as the
             "dydit" family of the SiT backbone (`model.arch = "dydit"`); sparse inference slices
             its weights.
  edt        EDT (NeurIPS 2024): the five-stage U-shaped backbone with token merging, long skips,
             relative-position bias, AMM and the masked training forward (`model.arch = "edt"`).
  amm        EDT's attention modulation matrix, usable in any full-attention block (SiT/DiT too).
  attention  full attention (core in `attention_core`: `jax.nn.dot_product_attention`, or its
             head-major jnp form, the default on CPU) and mediator attention (jnp reference
             of the official `AttentionWithMediators`; the fused kernel is in `edit_jax.kernels`).

`from edit_jax import models; models.build_model("SiT-S/2", ...)` keeps working: the public names
of `sit` are re-exported here, and `build_model` / `model_config` / `model_from_config` dispatch
on the family ("EDT-..." names, `arch="edt"`, or an EDT instance).
"""
from edit_jax.models import amm  # noqa: F401
from edit_jax.models import attention  # noqa: F401
from edit_jax.models import edt  # noqa: F401
from edit_jax.models import sit as _sit
from edit_jax.models.edt import EDT  # noqa: F401
from edit_jax.models.sit import *  # noqa: F401,F403
from edit_jax.models.sit import SiT, init_params  # noqa: F401  (explicit for readers)
from edit_jax.models import dydit  # noqa: F401,E402  (registers the "dydit" family of sit)
from edit_jax.models.dydit import DyDiT  # noqa: F401,E402

ARCHS = ("sit", "edt", "dydit")
MODEL_NAMES = _sit.MODEL_NAMES + edt.MODEL_NAMES


def arch_of(model) -> str:
  """"edt" for EDT models, "sit" for the SiT backbone (DyDiT included: `sit.family_of` tells it
  apart)."""
  return getattr(model, "arch", "sit")


def build_model(name="SiT-XL/2", **overrides):
  """A model by name ('SiT-S/2' ... 'SiT-XL/8', 'EDT-S/2', 'EDT-B/2', 'EDT-XL/2') with any field
  overridden; with name=None the family comes from `arch` ("sit" default, "edt", or a family of
  the SiT backbone registered with `sit.register_family`, e.g. "dydit", which takes SiT names)."""
  arch = overrides.pop("arch", None)
  if arch not in (None, "", *ARCHS):
    raise ValueError(f"unknown model arch {arch!r}: expected one of {', '.join(ARCHS)}")
  if (name and str(name).startswith("EDT")) or (not name and arch == "edt"):
    return edt.build_model(name, **overrides)
  if name and arch == "edt":
    raise ValueError(f"model name {name!r} is not an EDT name ({', '.join(edt.MODEL_NAMES)}) but "
                     f"arch='edt': use an EDT name, or an empty name with the stage fields")
  return _sit.build_model(name, arch=arch or "sit", **overrides)


def model_config(model) -> dict:
  """JSON-serialisable constructor arguments; EDT's carry "arch": "edt", DyDiT's "dydit"."""
  if arch_of(model) == "edt":
    return edt.model_config(model)
  return _sit.model_config(model)


def model_from_config(cfg: dict):
  """Inverse of `model_config` (configs without "arch" are SiT, as older checkpoints)."""
  if cfg.get("arch") == "edt":
    return edt.model_from_config(cfg)
  return _sit.model_from_config(cfg)  # "arch" picks the SiT-backbone family (default "sit")
