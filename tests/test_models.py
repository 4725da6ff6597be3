"""Shapes, initialization rule, parameter counts and bad-input errors of the SiT backbone."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import models
from edit_jax.models import attention
from random_params import random_params as _random  # tests/random_params.py

# (name, mediator_num) -> trainable params at 256 px (spec: "all" minus the 256*D frozen pos_embed).
PARAM_COUNTS = {
    ("SiT-S/2", 0): 32_963_360 - 256 * 384,
    ("SiT-XL/2", 0): 675_129_632 - 256 * 1152,
    ("SiT-S/2", 4): 33_056_096 - 256 * 384,
    ("SiT-S/2", 16): 33_196_064 - 256 * 384,
    ("SiT-S/2", 64): 33_755_936 - 256 * 384,
    ("SiT-XL/2", 4): 675_742_496 - 256 * 1152,
    ("SiT-XL/2", 16): 676_613_408 - 256 * 1152,
    ("SiT-XL/2", 64): 680_097_056 - 256 * 1152,
}


def _random_params(model, seed=0, scale=0.05):
  """Non-zero everywhere (adaLN gates and the final layer included, so the output depends on
  every weight)."""
  return _random(model, seed, scale)


@pytest.mark.parametrize("name,n", sorted(PARAM_COUNTS))
def test_param_counts_match_official(name, n):
  model = models.build_model(name, input_size=32, mediator_num=n)
  assert models.count_params(models.abstract_params(model)) == PARAM_COUNTS[(name, n)]


# The official DiT/SiT size table: name -> (depth, hidden_size, num_heads).
OFFICIAL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.mark.parametrize("name", [m for m in models.MODEL_NAMES if not m.startswith("EDT-")])
def test_every_named_size_shapes(name):
  """Every named SiT/DiT model has the official depth, width, heads and patch, and its abstract
  shapes (jax.eval_shape) are right with and without mediators (EDT sizes, which have no
  mediators: tests/test_edt.py). The shapes are traced at depth 1: none of the checked shapes
  depends on depth (the full-depth trees of SiT-S/2 and SiT-XL/2 are counted exactly above)."""
  size, patch = name[len("SiT-"):].split("/")
  named = models.build_model(name, input_size=32, num_classes=1000)
  assert (named.depth, named.hidden_size, named.num_heads) == OFFICIAL_SIZES[size]
  assert named.patch_size == int(patch)
  for n in (0, 4):
    model = models.build_model(name, input_size=32, mediator_num=n, num_classes=1000, depth=1)
    x, t, y = models.dummy_inputs(model, 2)
    params = models.abstract_params(model)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, y), params)
    assert out.shape == (2, 32, 32, 4) and out.dtype == jnp.float32
    d = model.hidden_size
    assert params["y_embedder"]["embedding_table"].shape == (1001, d)
    assert params["final_layer"]["linear"]["kernel"].shape == (d, model.patch_size ** 2 * 8)
    assert ("an_bias" in params["blocks_0"]["attn"]) == bool(n)


@functools.cache
def _fresh_params(model):
  """models.init_params(model, key 0), computed once per model in this file (the init compile
  is the expensive part: one S/2 model is shared by two tests)."""
  return models.init_params(model, jax.random.key(0))


# Every size and every patch once (the rule is the same code for all of them: 4 cases, not 12).
@pytest.mark.parametrize("size,patch", [("S", 2), ("B", 4), ("L", 8), ("XL", 2)])
def test_fresh_model_outputs_zero(size, patch):
  """adaLN-Zero: the final layer is zeroed, so a fresh model outputs exactly 0 (every size and
  every patch; depth reduced to 1 block to keep the test fast: the rule does not depend on depth)."""
  model = models.build_model(f"SiT-{size}/{patch}", input_size=16, depth=1, num_classes=10,
                             mediator_num=4)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  out = jax.jit(model.apply)({"params": _fresh_params(model)}, x, jnp.array([0.2, 0.9]),
                             jnp.array([3, 10]))
  assert out.shape == x.shape
  assert np.all(np.asarray(out) == 0)


def test_init_distributions():
  p = _fresh_params(models.build_model("SiT-S/2", input_size=16, depth=1, num_classes=10,
                                       mediator_num=4))
  d = 384
  qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"])
  bound = np.sqrt(6 / (d + 3 * d))
  assert qkv.shape == (d, 3 * d) and np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
  conv = np.asarray(p["x_embedder"]["proj"]["kernel"])  # fan_in = 4*2*2, fan_out = D
  bound = np.sqrt(6 / (16 + d))
  assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.95 * bound
  assert np.std(np.asarray(p["y_embedder"]["embedding_table"])) == pytest.approx(0.02, rel=0.05)
  assert np.std(np.asarray(p["t_embedder"]["mlp_0"]["kernel"])) == pytest.approx(0.02, rel=0.05)
  dwc = np.asarray(p["blocks_0"]["attn"]["dwc"]["kernel"])
  assert dwc.min() >= -1 / 3 and dwc.max() <= 1 / 3 and dwc.max() > 0.3 and dwc.min() < -0.3
  for k in ("adaLN_modulation_1",):
    assert not np.any(np.asarray(p["blocks_0"][k]["kernel"]))
  assert not np.any(np.asarray(p["final_layer"]["linear"]["kernel"]))
  an = np.asarray(p["blocks_0"]["attn"]["an_bias"])
  assert np.std(an) == pytest.approx(0.02, rel=0.2)
  for leaf in jax.tree_util.tree_leaves(p):
    assert leaf.dtype == jnp.float32


def test_label_dropout_in_training_only():
  model = models.build_model("SiT-S/2", input_size=8, depth=1, hidden_size=64, num_heads=2,
                             num_classes=10, class_dropout_prob=0.5)
  params = _random_params(model)  # non-zero everywhere: the output depends on y
  x = jnp.ones((64, 8, 8, 4))
  t = jnp.full((64,), 0.5)
  y = jnp.full((64,), 3)
  apply = jax.jit(model.apply, static_argnames="train")
  ev = apply({"params": params}, x, t, y)
  assert np.allclose(ev, ev[:1])  # eval: deterministic, no dropping
  tr = apply({"params": params}, x, t, y, train=True, rngs={"label_dropout": jax.random.key(2)})
  null = apply({"params": params}, x, t, jnp.full((64,), 10))
  assert not np.allclose(null[:1], ev[:1])  # the null class is a different output
  dropped = np.all(np.isclose(tr, null[:1]), axis=(1, 2, 3))
  kept = np.all(np.isclose(tr, ev[:1]), axis=(1, 2, 3))
  assert np.all(dropped | kept) and 10 < dropped.sum() < 54


def test_mediator_layers_option():
  m = models.build_model("SiT-XL/2", input_size=32, mediator_num=16, mediator_layers=4)
  assert m.mediator_blocks == (0, 1, 2, 3)
  p = models.abstract_params(m)
  assert "an_bias" in p["blocks_3"]["attn"] and "an_bias" not in p["blocks_4"]["attn"]
  assert models.build_model("SiT-S/2", mediator_num=4, mediator_layers="0,2").mediator_blocks == (0, 2)
  assert models.build_model("SiT-S/2", mediator_num=4).mediator_blocks == tuple(range(12))
  with pytest.raises(ValueError, match="outside"):
    models.build_model("SiT-S/2", mediator_num=4, mediator_layers=[0, 12])


def test_adaptive_pool_matches_torch_semantics():
  """Overlapping windows (n = 49 on a 16-grid): window i = [floor(i g/s), ceil((i+1) g/s))."""
  g, s = 16, 7
  x = np.random.default_rng(0).normal(size=(2, g, g, 3)).astype(np.float32)
  ref = np.zeros((2, s, s, 3), np.float32)
  for i in range(s):
    for j in range(s):
      r0, r1 = (i * g) // s, -(-((i + 1) * g) // s)
      c0, c1 = (j * g) // s, -(-((j + 1) * g) // s)
      ref[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(attention.adaptive_avg_pool_2d(jnp.asarray(x), s), ref, atol=1e-6)
  assert (attention.adaptive_pool_matrix(16, 7) > 0).sum() > 16  # windows overlap
  np.testing.assert_allclose(attention.adaptive_avg_pool_2d(jnp.asarray(x), 4),
                             x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)), atol=1e-6)


def _torch_bilinear(a, out):
  """torch F.interpolate(mode='bilinear', align_corners=False), no antialias, on the last 2 axes."""
  def weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
      src = max((o + 0.5) * scale - 0.5, 0.0)
      i0 = min(int(np.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      lam = src - i0
      w[o, i0] += 1 - lam
      w[o, i1] += lam
    return w
  w = weights(a.shape[-1], out)
  return np.einsum("ai,...ij,bj->...ab", w, a, w)


@pytest.mark.parametrize("size", [4, 8, 16, 32])
def test_bias_resize_matches_torch_bilinear(size):
  a = np.random.default_rng(0).normal(size=(2, 3, 7, 7)).astype(np.float32)
  np.testing.assert_allclose(attention.resize_bilinear(jnp.asarray(a), size), _torch_bilinear(a, size),
                             atol=2e-6)


def test_mediator_overlapping_windows_run_and_cached_biases_match():
  """n = 49 mediators on an 8 x 8 token grid: overlapping pooling windows (8 / 7 is not an
  integer) and position biases resized 7 -> 8; the forward runs, and the cached-bias forward
  (precompute_mediator_biases) equals it."""
  model = models.build_model("SiT-S/2", input_size=16, depth=1, hidden_size=64, num_heads=2,
                             num_classes=10, mediator_num=49)
  assert (attention.adaptive_pool_matrix(model.grid, 7) > 0).sum() > model.grid  # overlap
  params = _random_params(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  t, y = jnp.array([0.1, 0.7]), jnp.array([1, 2])
  out = jax.jit(model.apply)({"params": params}, x, t, y)
  cached = jax.jit(model.apply)(models.precompute_mediator_biases(model, params), x, t, y)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0
  np.testing.assert_allclose(out, cached, atol=1e-6)


def test_bf16_compute_close_to_fp32():
  model = models.build_model("SiT-S/2", input_size=16, depth=1, hidden_size=64, num_heads=2,
                             num_classes=10, mediator_num=16)
  params = _random_params(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  args = (x, jnp.array([0.1, 0.7]), jnp.array([1, 2]))
  ref = jax.jit(model.apply)({"params": params}, *args)
  out = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *args)
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert 0 < err < 0.05, err  # bf16 really used (not bit-equal), yet close


# ----------------------------------------------------------------------------- bad input
def test_bad_mediator_count():
  with pytest.raises(ValueError, match=r"mediator_num=10 is not a positive perfect square.*9 or 16"):
    models.build_model("SiT-S/2", mediator_num=10)
  with pytest.raises(ValueError, match=r"mediator_num=400 is larger than the number of tokens 256"):
    models.build_model("SiT-S/2", input_size=32, mediator_num=400)


def test_bad_input_size_and_names():
  with pytest.raises(ValueError, match=r"input_size=30 is not divisible by patch_size=4"):
    models.build_model("SiT-S/4", input_size=30)
  with pytest.raises(ValueError, match=r"unknown model name 'SiT-M/2'"):
    models.build_model("SiT-M/2")
  with pytest.raises(ValueError, match=r"unknown SiT options \['mediators'\]"):
    models.build_model("SiT-S/2", mediators=4)


def test_bad_call_inputs():
  model = models.build_model("SiT-S/2", input_size=8, depth=1, hidden_size=64, num_heads=2,
                             num_classes=10)
  params = _random_params(model)  # the inputs are checked before any computation
  t = jnp.zeros((1,))
  with pytest.raises(ValueError, match=r"built for inputs \(B, 8, 8, 4\).*got \(1, 16, 16, 4\)"):
    model.apply({"params": params}, jnp.zeros((1, 16, 16, 4)), t, jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r"looks NCHW"):
    model.apply({"params": params}, jnp.zeros((1, 4, 8, 8)), t, jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 10\].*got values in \[0, 11\]"):
    model.apply({"params": params}, jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,)), np.array([0, 11]))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), t, np.array([-1]))


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_attention_maps_collection():
  """Effective attention rows are sown on request and are really what the layer applies:
  full attention sows softmax(q k^T / sqrt(hd)); mediator attention sows A2 @ A1 with
  A1 = softmax_N(m k^T / sqrt(hd) + bias1), A2 = softmax_n(q m^T / sqrt(hd) + bias2), recomputed here
  in numpy from the layer's own q, k (its qkv output) and cached biases; and map @ v equals the
  attention core's output."""
  from edit_jax.kernels.reference import mediator_attention_reference  # noqa: PLC0415
  b, h, hd, g = 3, 2, 32, 4
  for n in (0, 4):
    model = models.build_model("SiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=h,
                               num_classes=10, mediator_num=n)
    params = _random_params(model, 5, scale=0.15)  # random weights: the maps depend on them
    x = jax.random.normal(jax.random.key(1), (b, 8, 8, 4))
    cache = models.precompute_mediator_biases(model, params).get("mediator_cache")
    _, state = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, jnp.full((b,), 0.5), jnp.arange(b),
        mutable=["attention_maps", "intermediates"], capture_intermediates=True))(params, x)
    maps = state["attention_maps"]
    assert sorted(maps) == ["blocks_0", "blocks_1"]
    for blk in ("blocks_0", "blocks_1"):
      probs = np.asarray(maps[blk]["attn"]["probs"][0], np.float64)
      assert probs.shape == (b, h, 16, 16)
      np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
      qkv = np.asarray(state["intermediates"][blk]["attn"]["qkv"]["__call__"][0], np.float64)
      qkv = qkv.reshape(b, 16, 3, h, hd) if n == 0 else qkv.reshape(b, 16, 3, h * hd)
      if n == 0:  # timm layout: (3, h, hd) per token
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        want = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd))
      else:  # official mediator layout: q | k | v, each (h, hd)
        q, k, v = (qkv[:, :, i].reshape(b, 16, h, hd) for i in range(3))
        m = q.reshape(b, 2, 2, 2, 2, h, hd).mean(axis=(2, 4)).reshape(b, 4, h, hd)  # 2x2 pools
        b1, b2 = (np.asarray(cache[blk]["attn"][k], np.float64) for k in ("bias1", "bias2"))
        a1 = _softmax(np.einsum("bmhd,bkhd->bhmk", m, k) / np.sqrt(hd) + b1)
        a2 = _softmax(np.einsum("bqhd,bmhd->bhqm", q, m) / np.sqrt(hd) + b2)
        want = a2 @ a1
        core = np.asarray(jax.jit(mediator_attention_reference)(*(
            np.asarray(a, np.float32) for a in (q, k, v, m, b1, b2))), np.float64)
        np.testing.assert_allclose(np.einsum("bhqk,bkhd->bqhd", probs, v), core, atol=1e-4)
      assert np.abs(want - 1 / 16).max() > 0.05  # far from uniform: a real test
      np.testing.assert_allclose(probs, want, atol=2e-5)
