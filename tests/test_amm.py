"""EDT's attention modulation matrix: values, the official matrices, log_bias == post_softmax,
and AMM as a sampling-time option of SiT (full-attention blocks only)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import models
from edit_jax.models import amm
from random_params import random_params as _random  # tests/random_params.py


def f_of(d, g):
  """Independent float64 transcription of F(d) = 0.5 exp(cos(2 pi d / (4 (g-1) sqrt 2)))."""
  return 0.5 * np.exp(np.cos(2 * np.pi * np.asarray(d, np.float64) / (4 * (g - 1) * math.sqrt(2))))


def test_official_matrices_match_golden(golden_dir):
  g = np.load(golden_dir / "edt" / "amm.npz")
  for n in (12, 6, 10):
    m, ref = amm.modulation_matrix(n), g[f"amm_{n}x{n}"]
    np.testing.assert_allclose(m, ref, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(m == 0, ref == 0)
  for b in (23, 25):
    np.testing.assert_allclose(amm.modulation_matrix(12), g[f"model.blocks.{b}.attn.modulation_matrix"][0, 0],
                               atol=1e-6, rtol=0)
  np.testing.assert_allclose(amm.grid_distances(12), g["euclid_12x12"], atol=1e-6)


@pytest.mark.parametrize("g", [3, 4, 5, 7, 8, 9, 16, 20, 32])
def test_values_at_known_distances(g):
  """M[0,0] = e/2, M = F(d) exactly where d <= R = sqrt((g-1)^2 + 4), 0 beyond; symmetric."""
  m = amm.modulation_matrix(g).astype(np.float64)
  d = np.sqrt(sum(np.subtract.outer(a, a) ** 2 for a in np.divmod(np.arange(g * g), g)))
  r = math.sqrt((g - 1) ** 2 + 4)
  assert abs(m[0, 0] - math.e / 2) < 1e-6
  inside = d <= r + 1e-9
  np.testing.assert_allclose(m[inside], f_of(d[inside], g), rtol=3e-7)
  assert np.all(m[~inside] == 0)
  np.testing.assert_array_equal(m, m.T)
  # the radius token (row 2, col g-1) is the smallest kept value of row 0
  assert m[0, 3 * g - 1] == m[0][m[0] > 0].min()


def test_spec_numbers_at_16():
  m = amm.modulation_matrix(16)
  assert abs(m[0, 0] - 1.3591) < 1e-4 and abs(m[0, 1] - 1.3554) < 1e-4
  assert abs(m[m > 0].min() - 0.7726) < 1e-4
  assert abs((m == 0).mean() - 0.0434) < 1e-3        # ~4.3% of token pairs zeroed
  assert abs(amm.modulation_matrix(8)[amm.modulation_matrix(8) > 0].min() - 0.749) < 1e-3


def test_small_grids_and_bad_args():
  assert np.all(amm.modulation_matrix(2) > 0)       # R > d_max: nothing zeroed
  assert amm.modulation_matrix(1).shape == (1, 1)
  with pytest.raises(ValueError, match="positive int"):
    amm.modulation_matrix(0)
  with pytest.raises(ValueError, match="mode"):
    amm.check_mode("pre_softmax")
  with pytest.raises(ValueError, match="block indices"):
    amm.parse_layers("7;10")


@pytest.mark.parametrize("g,heads,hd,with_bias", [(4, 2, 8, False), (6, 3, 4, True),
                                                  (8, 1, 16, True)])
def test_log_bias_equals_post_softmax(g, heads, hd, with_bias):
  n = g * g
  rng = np.random.default_rng(g)  # host inputs; the three attentions in one jitted program
  q, k, v = (3.0 * rng.normal(size=(2, n, heads, hd)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(1, heads, n, n)).astype(np.float32) if with_bias else None
  m = amm.modulation_matrix(g)
  post, logb, plain = (np.asarray(a) for a in jax.jit(lambda q, k, v, b: (
      amm.amm_attention(q, k, v, m, b, "post_softmax"), amm.amm_attention(q, k, v, m, b, "log_bias"),
      amm.amm_attention(q, k, v, None, b)))(q, k, v, bias))
  np.testing.assert_allclose(logb, post, atol=5e-6, rtol=2e-5)
  # and both equal an explicit float64 numpy computation of (softmax(S) * M) V
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / math.sqrt(hd)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True) * m
  ref = np.einsum("bhqk,bkhd->bqhd", p, np.asarray(v, np.float64))
  np.testing.assert_allclose(post, ref, atol=2e-5, rtol=1e-4)
  # AMM really changes the result (rows are not renormalised)
  assert np.abs(plain - ref).max() > 1e-2


def _sit(depth=4, **kw):
  return models.build_model("", input_size=8, in_channels=4, patch_size=2, hidden_size=32,
                            depth=depth, num_heads=2, num_classes=5, **kw)


@pytest.fixture(scope="module")
def sit_params():
  """Random parameters of the depth-2 `_sit`, every leaf N(0, 0.1) (nonzero adaLN gates)."""
  return _random(_sit(2), 3, 0.1)


def test_sit_amm_sampling_only_and_modes(sit_params):
  """Depth 2, AMM named on blocks 0 and 1 or on block 1 alone; all forwards in one program."""
  p = sit_params
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([0.3, 0.8]), jnp.array([1, 4])
  rngs = {"label_dropout": jax.random.key(0)}
  runs = {  # name: (model, train)
      "base": (_sit(2), False), "on": (_sit(2, amm_layers="0,1"), False),
      "lb": (_sit(2, amm_layers="0,1", amm_mode="log_bias"), False),
      "tr": (_sit(2, amm_layers="0,1"), True), "tr0": (_sit(2), True),
      "tr1": (_sit(2, amm_layers="0,1", amm_in_train=True), True),
      "one": (_sit(2, amm_layers=[1]), False)}
  r = jax.tree.map(np.asarray, jax.jit(lambda p: {
      k: m.apply({"params": p}, x, t, y, train=tr, rngs=rngs) for k, (m, tr) in runs.items()})(p))
  base, out = r["base"], r["on"]
  assert np.abs(out - base).max() > 1e-3                       # AMM acts at sampling
  np.testing.assert_allclose(r["lb"], out, atol=2e-5)
  np.testing.assert_array_equal(r["tr"], r["tr0"])             # and never in training
  assert np.abs(r["tr1"] - r["tr0"]).max() > 1e-3
  # the AMM blocks are the named ones: AMM on block 1 only differs from blocks 0,1
  one = r["one"]
  assert np.abs(one - out).max() > 1e-4 and np.abs(one - base).max() > 1e-4


def test_sit_amm_equals_manual_block(sit_params):
  """Block 0 with AMM = x + gate * proj((softmax(S) * M) V) computed by hand."""
  p = sit_params
  model = _sit(2, amm_layers="0")
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 4))
  t, y = jnp.array([0.5]), jnp.array([2])

  @jax.jit
  def run(p):
    _, inter = model.apply({"params": p}, x, t, y, capture_intermediates=True,
                           mutable=["intermediates"])
    return (inter["intermediates"]["blocks_0"]["attn"]["__call__"][0],
            model.apply({"params": p}, x, method=lambda m, xx: m.x_embedder(xx)),
            model.apply({"params": p}, t, y,
                        method=lambda m, tt, yy: m.t_embedder(tt) + m.y_embedder(yy)))

  got, h, c = (np.asarray(a) for a in run(p))
  # recompute the attention input: the block's modulated, normed input
  blk = p["blocks_0"]
  h = h + models.sincos_pos_embed(32, 4)[None]
  mod = (c * (1 / (1 + np.exp(-c)))) @ np.asarray(blk["adaLN_modulation_1"]["kernel"]) + np.asarray(blk["adaLN_modulation_1"]["bias"])
  shift, scale = mod[:, :32], mod[:, 32:64]
  hn = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  a_in = hn * (1 + scale[:, None]) + shift[:, None]
  qkv = a_in @ np.asarray(blk["attn"]["qkv"]["kernel"]) + np.asarray(blk["attn"]["qkv"]["bias"])
  q, k, v = np.split(qkv.reshape(1, 16, 3, 2, 16), 3, axis=2)
  q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  pr = np.exp(s - s.max(-1, keepdims=True))
  pr = pr / pr.sum(-1, keepdims=True) * amm.modulation_matrix(4)
  o = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(1, 16, 32)
  want = o @ np.asarray(blk["attn"]["proj"]["kernel"]) + np.asarray(blk["attn"]["proj"]["bias"])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_sit_amm_layer_resolution():
  assert _sit().amm_blocks == ()
  assert _sit(amm_layers="all").amm_blocks == (0, 1, 2, 3)
  assert models.build_model("SiT-XL/2", input_size=32, amm_layers="official").amm_blocks == (
      15, 17, 19, 22, 24)
  assert models.build_model("SiT-S/2", input_size=32, amm_layers="official").amm_blocks == (8, 10)
  with pytest.raises(ValueError, match="official plug-in"):
    _sit(amm_layers="official")
  with pytest.raises(ValueError, match="outside"):
    _sit(amm_layers="4")
  # mediator blocks are left alone: naming one is an error, "all" skips them
  med = dict(mediator_num=4, mediator_layers="0,1")
  assert _sit(amm_layers="all", **med).amm_blocks == (2, 3)
  with pytest.raises(ValueError, match="mediator attention"):
    _sit(amm_layers="1,2", **med)
  cfg = models.model_config(_sit(amm_layers="1,3", amm_mode="log_bias"))
  again = models.model_from_config(cfg)
  assert again.amm_blocks == (1, 3) and again.amm_mode == "log_bias"


def test_amm_settings_do_not_block_resuming_a_checkpoint():
  """AMM has no parameters: a run resumes across amm_layers/amm_mode/amm_in_train changes, while
  an architecture change (depth) still blocks."""
  from edit_jax import train  # noqa: PLC0415
  base = models.build_model("", input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=4,
                            num_heads=2, mediator_num=0, num_classes=3, learn_sigma=False)
  for arch in (base, models.build_model("EDT-S/2", input_size=8, amm_layers="none")):
    meta = {"model_config": models.model_config(arch), "config": {}}
    now = arch.clone(amm_layers="all", amm_mode="log_bias", amm_in_train=True)
    blocking, _ = train.compare_with_checkpoint(train.default_config(), now, meta)
    assert blocking == []
  meta = {"model_config": models.model_config(base), "config": {}}
  blocking, _ = train.compare_with_checkpoint(train.default_config(), base.clone(depth=2), meta)
  assert blocking == ["model.depth: 4 -> 2"]
