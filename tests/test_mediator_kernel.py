"""The Pallas mediator-attention kernel vs the jnp reference (CPU, interpret mode).

Covers forward and gradients w.r.t. q, k, v, m, bias1, bias2 (f32 and bf16), odd mediator counts
(4, 9, 49), token counts 64..4096 incl. ones that are not a block multiple, head dims 64 and 72,
batch > 1, the GPU (Triton) and TPU (Mosaic) plans run by the interpreter, jax.shard_map over
batch and heads on 8 fake devices, the fallback warning, error messages, and lowering of the GPU
and TPU plans to Triton / Mosaic IR (lowering only: nothing is compiled for a GPU/TPU here).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from edit_jax.kernels import mediator_pallas as mp
from edit_jax.kernels.mediator_attention import mediator_attention, mediator_attention_reference
from edit_jax.kernels.mediator_pallas import BlockSizes, mediator_attention_pallas, pallas_available


def _inputs(B, N, h, hd, n, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  q, k, v = (jax.random.normal(ks[i], (B, N, h, hd), jnp.float32).astype(dtype) for i in range(3))
  m = jax.random.normal(ks[3], (B, n, h, hd), jnp.float32).astype(dtype)
  b1 = 0.5 * jax.random.normal(ks[4], (h, n, N), jnp.float32)
  b2 = 0.5 * jax.random.normal(ks[5], (h, N, n), jnp.float32)
  w = jax.random.normal(ks[6], (B, N, h, hd), jnp.float32)   # cotangent / loss weights
  return (q, k, v, m, b1, b2), w


def _kernel(**kw):
  return lambda *a: mediator_attention_pallas(*a, **kw)


def _ref(**kw):
  return lambda *a: mediator_attention_reference(*a, **kw)


def _fwd_and_grads(fn, args, w):
  """(out, grads w.r.t. the six inputs of sum(out * w)) from one jitted forward + VJP."""
  def both(w, *a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(w.astype(out.dtype))
  return jax.jit(both)(w, *args)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


NAMES = ("q", "k", "v", "m", "bias1", "bias2")


def _assert_close(out, grads, out_r, grads_r, tol):
  assert out.shape == out_r.shape and out.dtype == out_r.dtype
  assert _rel(out, out_r) < tol, f"forward: rel err {_rel(out, out_r):.2e}"
  for name, g, gr in zip(NAMES, grads, grads_r):
    assert g.shape == gr.shape and g.dtype == gr.dtype, name
    assert _rel(g, gr) < tol, f"d{name}: rel err {_rel(g, gr):.2e}"


# (B, N, h, hd, n): n in {4, 9, 49, 64} here, 16 in the bf16 test; N in 64..1024, incl. non-block
# multiples (196; 200 in the plan tests); N = 4096 in test_forward_large_n_and_custom_scale.
F32_CASES = [
    (2, 64, 2, 64, 4),
    (2, 256, 2, 72, 49),
    (3, 196, 1, 64, 9),
    (1, 1024, 1, 72, 64),
]


@pytest.mark.parametrize("shape", F32_CASES, ids=lambda s: "B{}_N{}_h{}_hd{}_n{}".format(*s))
def test_forward_and_grads_f32(shape):
  args, w = _inputs(*shape)
  out, grads = _fwd_and_grads(_kernel(), args, w)
  out_r, grads_r = _fwd_and_grads(_ref(), args, w)
  _assert_close(out, grads, out_r, grads_r, 2e-5)


def test_forward_large_n_and_custom_scale():
  args, _ = _inputs(2, 4096, 2, 64, 64, seed=1)
  out = jax.jit(_kernel(scale=0.3))(*args)
  assert _rel(out, mediator_attention_reference(*args, scale=0.3)) < 2e-5


@pytest.mark.parametrize("shape", [(2, 256, 2, 72, 16)],
                         ids=lambda s: "B{}_N{}_h{}_hd{}_n{}".format(*s))
def test_forward_and_grads_bf16(shape):
  """bf16 inputs: the kernel's error vs an f32 reference is within the bf16 reference's own."""
  args, w = _inputs(*shape, dtype=jnp.bfloat16)
  args32 = tuple(a.astype(jnp.float32) for a in args)
  out, grads = _fwd_and_grads(_kernel(), args, w)
  out_r, grads_r = _fwd_and_grads(_ref(), args, w)
  out_x, grads_x = _fwd_and_grads(_ref(), args32, w)        # exact answer for these inputs
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  assert grads[4].dtype == jnp.float32                       # bias grads keep the bias dtype
  for name, a, r, x in zip(("out",) + NAMES, (out,) + grads, (out_r,) + grads_r,
                           (out_x,) + grads_x):
    err, err_ref = _rel(a, x), _rel(r, x)
    assert err < 2 * err_ref + 4e-3, f"{name}: kernel {err:.2e} vs bf16 reference {err_ref:.2e}"


PLAN_BLOCKS = BlockSizes(block_q=64, block_k=32, block_k_major=128, block_q_bwd=64,
                         block_k_bwd=64, block_b=2, block_b_bwd=2)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_gpu_and_tpu_plans_interpreted(backend):
  """The GPU plan (pow2 padding of n/hd, per-group bias grads) and the TPU plan (transposed
  layout, bias grads accumulated over the batch grid axis), with small blocks so every loop and
  grid axis runs more than once."""
  args, w = _inputs(4, 200, 2, 72, 4, seed=2)
  fn = _kernel(backend=backend, interpret=True, block_sizes=PLAN_BLOCKS)
  out, grads = _fwd_and_grads(fn, args, w)
  out_r, grads_r = _fwd_and_grads(_ref(), args, w)
  _assert_close(out, grads, out_r, grads_r, 2e-5)


def test_tpu_plan_tpu_interpreter_no_races():
  """TPU plan under the TPU interpreter (simulated VMEM/DMA, race detection)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  args, w = _inputs(2, 256, 1, 64, 9, seed=3)
  bs = BlockSizes(block_q=128, block_k=128, block_k_major=256, block_q_bwd=128, block_k_bwd=128,
                  block_b=1, block_b_bwd=1)
  fn = _kernel(backend="tpu", interpret=pltpu.InterpretParams(detect_races=True), block_sizes=bs)
  out, grads = _fwd_and_grads(fn, args, w)
  out_r, grads_r = _fwd_and_grads(_ref(), args, w)
  _assert_close(out, grads, out_r, grads_r, 2e-5)
  assert not ipc.races.races_found


def test_backward_saves_statistics_not_probabilities():
  """Residuals for the backward: inputs, V_M and per-mediator log-sum-exp; the reference keeps
  the (B, h, n, N) / (B, h, N, n) probability matrices."""
  from jax._src.ad_checkpoint import saved_residuals  # noqa: PLC0415
  B, N, h, hd, n = 2, 256, 2, 64, 16
  args, _ = _inputs(B, N, h, hd, n)
  probs = B * h * n * N
  sizes = [int(np.prod(aval.shape)) for aval, _ in saved_residuals(_kernel(), *args)]
  assert max(sizes) == B * N * h * hd and probs not in sizes
  assert B * h * n in sizes                                   # lse1 (B, h, n, 1)
  ref_sizes = [int(np.prod(aval.shape)) for aval, _ in saved_residuals(_ref(), *args)]
  assert probs in ref_sizes                                   # the test can tell the difference


def test_shard_map_batch_and_heads():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
  act, bias = P("data", None, "model", None), P("model", None, None)
  sharded = jax.shard_map(_kernel(), mesh=mesh, in_specs=(act, act, act, act, bias, bias),
                          out_specs=act, check_vma=False)
  args, w = _inputs(4, 128, 2, 64, 16, seed=4)
  out, grads = _fwd_and_grads(sharded, args, w)
  out_r, grads_r = _fwd_and_grads(_ref(), args, w)
  _assert_close(out, grads, out_r, grads_r, 2e-5)


def test_dispatcher_uses_kernel():
  args, _ = _inputs(2, 64, 1, 64, 4, seed=5)
  out = jax.jit(lambda *a: mediator_attention(*a, impl="pallas"))(*args)
  assert _rel(out, mediator_attention_reference(*args)) < 2e-5


def test_fallback_warns_and_matches_reference(monkeypatch):
  args, _ = _inputs(1, 64, 1, 64, 4, seed=6)
  for platform in ("gpu", "METAL"):   # no GPU in this process -> no usable lowering
    monkeypatch.setattr(mp, "_current_platform", lambda p=platform: p)
    with pytest.warns(UserWarning, match="no Pallas lowering for backend .*falling back"):
      out = mediator_attention_pallas(*args)
    np.testing.assert_array_equal(out, mediator_attention_reference(*args))


def test_availability_and_defaults():
  assert pallas_available("cpu") and pallas_available()
  assert not pallas_available("gpu") and not pallas_available("cuda")
  assert not pallas_available("tpu") and not pallas_available("rocm")
  for backend in ("cpu", "gpu", "cuda", "tpu"):
    assert isinstance(BlockSizes.get_default(backend), BlockSizes)


def test_error_messages():
  args, _ = _inputs(1, 64, 1, 64, 4)
  q, k, v, m, b1, b2 = args
  with pytest.raises(ValueError, match="only run in interpret mode on the CPU backend"):
    mediator_attention_pallas(*args, interpret=False)
  with pytest.raises(ValueError, match=r"bias2 has shape \(1, 64, 5\), expected \(1, 64, 4\)"):
    mediator_attention_pallas(q, k, v, m, b1, jnp.zeros((1, 64, 5)))
  with pytest.raises(ValueError, match="q must have rank 4"):
    mediator_attention_pallas(q[0], k, v, m, b1, b2)
  with pytest.raises(ValueError, match="k.dtype=bfloat16 differs from q.dtype=float32"):
    mediator_attention_pallas(q, k.astype(jnp.bfloat16), v, m, b1, b2)
  with pytest.raises(ValueError, match="unknown Pallas backend 'rocm'"):
    mediator_attention_pallas(*args, backend="rocm")
  with pytest.raises(ValueError, match="block_q=96: must be a power of two"):
    BlockSizes(block_q=96)
  with pytest.raises(ValueError, match="block_k_major=64 must be >= block_k=128"):
    BlockSizes(block_k_major=64)
  with pytest.raises(ValueError, match="block_b=0: must be a positive int or None"):
    BlockSizes(block_b=0)
  with pytest.raises(TypeError, match="block_sizes must be a BlockSizes"):
    mediator_attention_pallas(*args, block_sizes={"block_q": 64})


@pytest.mark.parametrize("platform,target", [("tpu", "tpu_custom_call"),
                                             ("cuda", "__gpu$xla.gpu.triton")])
def test_gpu_tpu_plans_lower(platform, target):
  """Forward and gradient lower to Mosaic TPU / Triton IR (cross-platform export). This checks
  the Pallas lowering rules and IR construction only; the Mosaic and Triton compilers run on the
  device and are not exercised here."""
  from jax import export  # noqa: PLC0415
  backend = "tpu" if platform == "tpu" else "gpu"
  B, N, h, hd, n = 2, 1024, 2, 72, 49
  sds = jax.ShapeDtypeStruct
  specs = ([sds((B, N, h, hd), jnp.bfloat16)] * 3 + [sds((B, n, h, hd), jnp.bfloat16)]
           + [sds((h, n, N), jnp.float32), sds((h, N, n), jnp.float32)])

  def fwd(*a):
    return mp._pallas_forward(*a, scale=None, block_sizes=None, interpret=False, plan=backend)

  def grad(*a):
    return jax.grad(lambda *x: jnp.sum(fwd(*x).astype(jnp.float32)), argnums=range(6))(*a)

  checks = [export.DisabledSafetyCheck.custom_call(target)]
  for fn, n_kernels in ((fwd, 2), (grad, 3)):   # grad: fwd stage 1 + both backward kernels
    lower = lambda fn=fn: export.export(jax.jit(fn), platforms=[platform],  # noqa: E731
                                        disabled_checks=checks)(*specs)
    try:
      exported = lower()
    except RuntimeError as e:
      # jax >= 0.11 asks which GPU it targets (0.10 assumed sm90): name an abstract H100.
      if "No supported GPU devices found" not in str(e):
        raise
      from jax._src import mesh as mesh_lib  # noqa: PLC0415
      h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                     platform="gpu")
      with jax.sharding.use_abstract_mesh(
          jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = lower()
    assert exported.mlir_module().count(f"@{target}(") == n_kernels
