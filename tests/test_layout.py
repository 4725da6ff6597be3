"""Package layout rules (docs/architecture.md): moved modules, import direction, self-containment."""
import ast
import importlib
import pathlib
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The reference folder's path spellings, assembled so this file does not contain them itself.
_REF = "sha" + "red"
FORBIDDEN = (f"../{_REF}", f'"{_REF}"', f"/{_REF}/golden")


@pytest.mark.parametrize("old,new", [
    ("edit_jax.transport", "edit_jax.diffusion.transport"),
    ("edit_jax.samplers", "edit_jax.diffusion.samplers"),
    ("edit_jax.guidance", "edit_jax.diffusion.guidance"),
    ("edit_jax.dynamic", "edit_jax.diffusion.dynamic"),
    ("edit_jax.attention", "edit_jax.models.attention"),
])
def test_old_import_paths_are_the_new_modules(old, new):
  sys.modules.pop(old, None)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    mod = importlib.import_module(old)
  assert mod is importlib.import_module(new)
  assert any(issubclass(x.category, DeprecationWarning) and new in str(x.message) for x in w)


def test_models_package_keeps_public_api():
  from edit_jax import models  # noqa: PLC0415
  for name in ("SiT", "build_model", "init_params", "model_config", "model_from_config",
               "precompute_mediator_biases", "SIZES", "count_params"):
    assert hasattr(models, name), name


def _imports(path):
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return out


def test_kernel_does_not_import_dispatcher():
  pallas = _imports(ROOT / "edit_jax/kernels/mediator_pallas.py")
  assert not any("mediator_attention" in m and "reference" not in m for m in pallas
                 if m.startswith("edit_jax")), pallas
  ref = _imports(ROOT / "edit_jax/kernels/reference.py")
  assert not any(m.startswith("edit_jax") for m in ref), ref


def test_models_do_not_import_diffusion_or_training():
  for f in (ROOT / "edit_jax/models").glob("*.py"):
    bad = [m for m in _imports(f) if m.startswith(("edit_jax.diffusion", "edit_jax.train",
                                                   "edit_jax.sample"))]
    assert not bad, (f.name, bad)


def test_repository_is_self_contained():
  """Nothing the package, tests or benchmarks run reads the reference folder beside the repo (a
  clone has nothing beside it)."""
  offenders = []
  for sub in ("edit_jax", "tests", "benchmarks", "configs", "launch"):
    for f in (ROOT / sub).rglob("*"):
      if f.suffix not in (".py", ".sh") or f.name == "test_layout.py":
        continue
      text = f.read_text()
      if any(p in text for p in FORBIDDEN):
        offenders.append(str(f.relative_to(ROOT)))
  assert not offenders, offenders
