"""The full-attention core (edit_jax.models.attention_core): head-major == jax.nn.dot_product_attention.

The head-major form is the default on CPU, so it must give the values (forward and gradients) of
`jax.nn.dot_product_attention`'s XLA path to float32 rounding, with and without an additive bias
(EDT's relative-position bias), and in bfloat16 to bfloat16 rounding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.models import attention_core

B, N, H, HD = 2, 16, 3, 8


def _qkv(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, N, H, HD)).astype(np.float32) * 1.5 for _ in range(3))
  bias = rng.standard_normal((1, H, N, N)).astype(np.float32)
  return [jnp.asarray(a, dtype) for a in (q, k, v)], jnp.asarray(bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_head_major_matches_dot_product_attention_f32(with_bias):
  (q, k, v), bias = _qkv()
  b = bias if with_bias else jnp.zeros((1, H, N, N))
  outs = {}
  for impl in ("xla", "head_major"):
    def loss(q, k, v, b, impl=impl):
      o = attention_core.dot_product_attention(q, k, v, bias=b if with_bias else None,
                                               implementation=impl)
      w = jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) / o.size - 0.5
      return (o * w).sum(), o
    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, b)
    outs[impl] = (o, g)
  o_ref, g_ref = outs["xla"]
  o_hm, g_hm = outs["head_major"]
  assert o_hm.shape == (B, N, H, HD)
  np.testing.assert_allclose(o_hm, o_ref, rtol=0, atol=2e-6)
  for a, r in zip(g_hm[:3], g_ref[:3]):
    np.testing.assert_allclose(a, r, rtol=0, atol=2e-6 * float(np.abs(r).max()))
  if with_bias:  # the bias gradient is the softmax-backward of the logits
    np.testing.assert_allclose(g_hm[3], g_ref[3], rtol=0, atol=2e-6 * float(np.abs(g_ref[3]).max()))
  # Not trivially equal: each head attends differently (a head-mixing transpose would show here).
  assert float(jnp.abs(o_ref[:, :, 0] - o_ref[:, :, 1]).max()) > 0.1


def test_head_major_matches_dot_product_attention_bf16():
  (q, k, v), _ = _qkv(jnp.bfloat16, seed=1)
  o_ref = attention_core.dot_product_attention(q, k, v, implementation="xla")
  o_hm = attention_core.dot_product_attention(q, k, v, implementation="head_major")
  assert o_hm.dtype == jnp.bfloat16
  # bf16 outputs: equal up to one or two bf16 ulps (|o| <~ 3, ulp 2^-7 * 2).
  np.testing.assert_allclose(np.asarray(o_hm, np.float32), np.asarray(o_ref, np.float32),
                             rtol=0, atol=0.04)
  o32 = attention_core.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)),
                                             implementation="head_major")
  assert float(jnp.abs(o_hm.astype(jnp.float32) - o32).max()) > 0  # bf16 really computed in bf16


def test_head_major_is_softmax_attention():
  """Against a float64 numpy evaluation of softmax(q k^T / sqrt(hd) + bias) v (per head)."""
  (q, k, v), bias = _qkv(seed=2)
  q64, k64, v64, b64 = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(HD) + b64
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", p, v64)
  o = attention_core.head_major_attention(q, k, v, bias)
  np.testing.assert_allclose(np.asarray(o, np.float64), ref, rtol=0, atol=3e-6)


def test_resolve_and_errors():
  assert jax.default_backend() == "cpu"
  assert attention_core.resolve(None) == "head_major"  # automatic on CPU
  for impl in ("xla", "cudnn", "head_major"):
    assert attention_core.resolve(impl) == impl
  with pytest.raises(ValueError, match=r"full_attention_impl='flash': expected one of None"):
    attention_core.resolve("flash")


def test_models_reject_an_unknown_implementation():
  from edit_jax import models  # noqa: PLC0415
  for arch, kw in (("sit", dict(input_size=8, in_channels=4, num_classes=4, patch_size=2,
                                hidden_size=32, depth=1, num_heads=2)),
                   ("edt", dict(name="EDT-S/2", input_size=8, in_channels=4, num_classes=4))):
    name = kw.pop("name", "")
    with pytest.raises(ValueError, match=r"full_attention_impl='flash': expected one of None"):
      models.build_model(name, arch=arch, full_attention_impl="flash", **kw)
