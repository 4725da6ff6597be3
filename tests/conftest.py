"""Test setup: 8 fake CPU devices, the persistent compilation cache, float32 matmuls.

The environment variables must be set before jax is imported anywhere.
"""
import os
import pathlib
import sys

# The suite's time is ~85 % XLA:CPU compilation of tiny programs. Two compile-speed settings,
# test-only (same HLO passes, same numerics up to float rounding; every parity tolerance holds):
#  - backend (LLVM) optimization level 0;
#  - fusions emitted by XLA:CPU's classic elemental emitter instead of the MLIR fusion emitters:
#    with O0, a small SiT's forward and gradient compile 3x faster than with O0 alone and 5x
#    faster than with the defaults (benchmarks/compile_flags.py, docs/benchmarks.md).
# Subprocesses started by tests inherit them (tests that change the device count keep the rest).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import edit_jax  # noqa: E402,F401  (its allocator settings must precede the backend: hostmem.py)
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

# Reference tensors from the official PyTorch code live inside the repository (tests/golden/README.md
# says which code, commit and calls produced each file); the tests read nothing outside the clone.
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture(scope="session")
def golden_dir():
  if not (GOLDEN / "README.md").is_file():
    pytest.fail(f"golden tensors not found at {GOLDEN}: the checkout is incomplete (git status)")
  return GOLDEN
