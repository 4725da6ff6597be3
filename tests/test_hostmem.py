"""edit_jax.hostmem: XLA:CPU's per-execution buffers are reused instead of page-faulted in.

The failure this guards against (issue 15): with glibc's defaults every call of a program whose
temporary buffer exceeds a thread arena's 64 MB heap mmaps a fresh buffer, so each call
page-faults all of it (42,000 faults per quickstart training step, ~1/3 of its time).
"""
import json
import os
import subprocess
import sys

import jax
import pytest

from edit_jax import hostmem

GLIBC = hostmem._libc() is not None

# A program with a 64 MB intermediate (2048 x 8192 float32), called repeatedly; prints the minor
# page faults per call after warm-up.
PROBE = r"""
import json, resource, sys
import edit_jax  # noqa: F401  (applies the allocator settings before the backend starts)
import jax, jax.numpy as jnp
from edit_jax import hostmem
f = jax.jit(lambda x, w1, w2: jnp.sum(jnp.tanh(x @ w1) @ w2))
x, w1, w2 = jnp.ones((2048, 64)), jnp.full((64, 8192), 1e-3), jnp.ones((8192, 4))
for _ in range(3):
  f(x, w1, w2).block_until_ready()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w1, w2).block_until_ready()
per_call = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(json.dumps({"faults_per_call": per_call, "status": hostmem.status()}))
"""


def _probe(mode: str, extra_env=None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env.update({hostmem.ENV: mode, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, **(extra_env or {}))
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the settings exist for glibc Linux only")
def test_buffers_are_reused_not_faulted_in():
  on, off = _probe("auto"), _probe("off")
  assert on["status"]["applied"], on
  assert not off["status"]["applied"], off
  # 64 MB = 16,384 pages: without the settings every call faults (nearly) all of them in ...
  assert off["faults_per_call"] > 8000, off
  # ... with them the freed buffer is reused: no faults in steady state.
  assert on["faults_per_call"] < 200, on


@pytest.mark.skipif(not GLIBC, reason="the settings exist for glibc Linux only")
def test_documented_environment_variables_are_equivalent():
  """The MALLOC_* variables the docs give work on their own (mode off) and are reported."""
  env = _probe("off", hostmem.ENV_EQUIVALENT)
  assert env["status"]["applied"] and "environment" in env["status"]["reason"], env
  assert env["faults_per_call"] < 200, env


def test_modes_and_errors(monkeypatch):
  with pytest.raises(ValueError, match=hostmem.ENV):
    hostmem.configure("sometimes")
  monkeypatch.setenv(hostmem.ENV, "bogus")
  with pytest.raises(ValueError, match="auto, on, off"):
    hostmem.configure()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem.cpu_backend_expected()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not hostmem.cpu_backend_expected()


def test_late_configure_says_how_to_fix(monkeypatch):
  jax.devices()  # the backend is running in this process
  for k in hostmem.ENV_EQUIVALENT:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(hostmem, "_status", {"applied": False, "reason": ""})
  st = hostmem.configure("on")
  assert not st["applied"]
  assert "import edit_jax first" in st["reason"] and "MALLOC_ARENA_MAX=1" in st["reason"]
  monkeypatch.setattr(hostmem, "_status", {"applied": False, "reason": ""})
  assert hostmem.configure("off") == {"applied": False, "reason": f"{hostmem.ENV}=off",
                                      "mode": "off"}
  monkeypatch.setattr(hostmem, "_status", {"applied": False, "reason": ""})
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert "accelerator" in hostmem.configure("auto")["reason"]


def test_suite_process_is_configured():
  """conftest imports edit_jax before the backend starts, so the suite itself runs with it."""
  if not GLIBC:
    pytest.skip("glibc Linux only")
  assert hostmem.status()["applied"] or os.environ.get(hostmem.ENV) == "off", hostmem.status()
