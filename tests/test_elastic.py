"""Elastic mediators (edit_jax.elastic): one parameter set for every mediator count n.

Tables over an R x R reference mediator grid resized like the official token tables; conversions
static <-> elastic (exact at the converted n, official layout on export); training with n sampled
per step (one compiled step per n-tuple, sharded, exact resume); one elastic checkpoint in the
dynamic sampler and the sampling CLI; FLOPs per n.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import checkpoint, convert, elastic, flops, models, sample, sharding, train
from edit_jax.diffusion import dynamic, samplers
from edit_jax.diffusion import transport as T
from random_params import random_params as _random  # tests/random_params.py


def tiny(n=4, grid=0, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
             num_classes=10, mediator_num=n, elastic_grid=grid)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def random_params(model, seed, scale=0.3):
  """Non-zero everywhere, so the output depends on every table."""
  return _random(model, seed, scale, as_jax=True)


def inputs(model, b=2, seed=1):
  x = jax.random.normal(jax.random.key(seed), (b, model.input_size, model.input_size,
                                              model.in_channels))
  return x, jnp.linspace(0.2, 0.8, b), jnp.arange(b, dtype=jnp.int32) % model.num_classes


@jax.jit(static_argnums=0)
def _forward(model, params, x, t, y):
  return model.apply({"params": params}, x, t, y)


def forward(model, params, x, t, y):
  """One jitted forward for the whole file: equal models (e.g. elastic.at(m, 4) twice, or a
  model and its reloaded copy) share one compilation."""
  return np.asarray(_forward(model, params, x, t, y))


def np_bilinear(table, size):
  """Independent NumPy bilinear resize of the last two axes (torch align_corners=False, no
  antialias: half-pixel centres, clamped at the borders)."""
  def axis_matrix(src, dst):
    m = np.zeros((dst, src))
    for i in range(dst):
      c = min(max((i + 0.5) * src / dst - 0.5, 0.0), src - 1.0)
      lo = int(np.floor(c))
      hi = min(lo + 1, src - 1)
      m[i, lo] += 1 - (c - lo)
      m[i, hi] += c - lo
    return m
  a = axis_matrix(table.shape[-2], size)
  b = axis_matrix(table.shape[-1], size)
  return np.einsum("ir,...rq,jq->...ij", a, np.asarray(table, np.float64), b)


# ----------------------------------------------------------------------------- parameterization
def test_elastic_shapes_do_not_depend_on_n_and_static_layer_is_unchanged():
  shapes = {n: jax.tree.map(lambda a: a.shape, models.abstract_params(tiny(n, grid=4)))
            for n in (1, 4, 16)}
  assert shapes[1] == shapes[4] == shapes[16]
  attn = shapes[4]["blocks_0"]["attn"]
  assert attn["an_bias"] == (2, 4, 4, 7, 7) and attn["ah_bias"] == (1, 2, 4, 4, 4, 1)
  assert attn["ha_bias"] == (1, 2, 4, 1, 4, 4) and attn["wa_bias"] == (1, 2, 1, 4, 4, 4)
  static = models.abstract_params(tiny(16))["blocks_0"]["attn"]  # official shapes, default
  assert static["an_bias"].shape == (2, 16, 7, 7) and static["wa_bias"].shape == (1, 2, 1, 4, 16)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_tables_are_the_reference_grid_resized_row_major(n):
  """At n the tables are the R x R mediator axes bilinearly resized to sqrt(n) (independent
  NumPy resize), flattened row-major; identity at n = R^2."""
  model = tiny(n, grid=4)
  p = random_params(model, 0)
  got = elastic.mediator_tables(model, p)["blocks_1"]
  src = jax.tree.map(np.asarray, p["blocks_1"]["attn"])
  s = int(np.sqrt(n))
  want_an = np_bilinear(np.moveaxis(src["an_bias"], (1, 2), (-2, -1)), s)  # (h, 7, 7, s, s)
  want_an = np.moveaxis(want_an, (-2, -1), (1, 2)).reshape(2, n, 7, 7)
  np.testing.assert_allclose(got["an_bias"], want_an, atol=1e-6)
  want_ha = np_bilinear(src["ha_bias"], s).reshape(1, 2, 4, 1, n)
  np.testing.assert_allclose(got["ha_bias"], want_ha, atol=1e-6)
  want_ah = np_bilinear(np.moveaxis(src["ah_bias"], (2, 3), (-2, -1)), s)
  np.testing.assert_allclose(got["ah_bias"], np.moveaxis(want_ah, (-2, -1), (2, 3)).reshape(
      1, 2, n, 4, 1), atol=1e-6)
  if n == 16:
    np.testing.assert_array_equal(got["na_bias"], src["na_bias"].reshape(2, 16, 7, 7))


def test_one_parameter_set_runs_at_every_n():
  model = tiny(4, grid=4)
  p = random_params(model, 1)
  x, t, y = inputs(model)
  outs = {n: forward(elastic.at(model, n), p, x, t, y) for n in (1, 4, 16)}
  assert all(np.isfinite(o).all() for o in outs.values())
  assert np.abs(outs[1] - outs[4]).max() > 1e-3 and np.abs(outs[4] - outs[16]).max() > 1e-3
  with pytest.raises(ValueError, match="not a positive perfect square"):
    elastic.at(model, 8)
  with pytest.raises(ValueError, match="static mediator model"):
    elastic.at(tiny(4), 16)
  with pytest.raises(ValueError, match="elastic_grid=2 needs mediators"):
    tiny(0, grid=2)


# ----------------------------------------------------------------------------- conversions
def test_elastic_state_dict_round_trip_keeps_elastic_layout():
  """PyTorch-named files of an elastic model (5-D tables) load back as the elastic model."""
  model = tiny(16, grid=4)
  p = random_params(model, 9)
  sd = convert.params_to_state_dict(p, model)
  assert sd["blocks.0.attn.an_bias"].shape == (2, 4, 4, 7, 7)
  m2, p2 = convert.load_torch_checkpoint(sd)
  assert m2.elastic_grid == 4 and m2.mediator_num == 16 and m2.input_size == 8
  x, t, y = inputs(model)
  np.testing.assert_array_equal(forward(elastic.at(m2, 4), p2, x, t, y),
                                forward(elastic.at(model, 4), p, x, t, y))


@pytest.mark.parametrize("n", [1, 4, 16])
def test_export_computes_exactly_what_elastic_computes(n, tmp_path):
  """elastic -> static export (params and official-layout file) computes the elastic model's
  output at n exactly; the file has the official shapes and loads with edit_jax.convert."""
  model = tiny(16, grid=4)
  p = random_params(model, 2)
  x, t, y = inputs(model)
  want = forward(elastic.at(model, n), p, x, t, y)
  static, sp = elastic.elastic_to_static(model, p, n)
  assert static.elastic_grid == 0 and static.mediator_num == n
  np.testing.assert_array_equal(forward(static, sp, x, t, y), want)
  sd = convert.params_to_state_dict(sp, static)
  assert sd["blocks.0.attn.an_bias"].shape == (2, n, 7, 7)
  assert sd["blocks.1.attn.ha_bias"].shape == (1, 2, 4, 1, n)
  m2, p2 = convert.load_torch_checkpoint(sd)
  assert m2.mediator_num == n and m2.elastic_grid == 0
  np.testing.assert_array_equal(forward(m2, p2, x, t, y), want)


def test_static_to_elastic_is_exact_at_the_source_n_and_round_trips():
  for n in (1, 4, 16):
    src = tiny(n)
    sp = random_params(src, 10 + n)
    x, t, y = inputs(src)
    want = forward(src, sp, x, t, y)
    el, ep = elastic.static_to_elastic(src, sp, grid=4)
    assert el.elastic_grid == 4 and el.mediator_num == n
    np.testing.assert_allclose(forward(el, ep, x, t, y), want, atol=2e-5, rtol=0)
    back_model, back = elastic.elastic_to_static(el, ep, n)
    for path, v in jax.tree_util.tree_flatten_with_path(sp)[0]:
      got = back
      for k in path:
        got = got[k.key]
      np.testing.assert_allclose(np.asarray(got), np.asarray(v), atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
    # the other counts run through the bilinear extension (finite, different)
    other = forward(elastic.at(el, 4 if n != 4 else 16), ep, x, t, y)
    assert np.isfinite(other).all() and np.abs(other - want).max() > 1e-4


def test_official_checkpoint_to_elastic_reproduces_the_official_output(golden_dir):
  """Official PyTorch state_dict (n = 16) -> elastic (R = 8) -> same output as the official code
  at n = 16 -> exported back to the same official tensors."""
  sd = dict(np.load(golden_dir / "mediator_tiny_state_dict.npz"))
  io = np.load(golden_dir / "mediator_tiny_io.npz")
  model, params = convert.load_torch_checkpoint(sd)
  el, ep = elastic.static_to_elastic(model, params, grid=8)
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
  out = forward(el, ep, nhwc(io["x"]), io["t"], io["y"])
  np.testing.assert_allclose(out, nhwc(io["out"]), atol=1e-5, rtol=0)
  static, sp = elastic.elastic_to_static(el, ep, 16)
  back = convert.params_to_state_dict(sp, static)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_allclose(back[k], sd[k], atol=2e-6, err_msg=k)


def test_adapt_init_params_all_directions():
  src = tiny(4)
  sp = random_params(src, 3)
  dst = tiny(16, grid=4)
  x, t, y = inputs(src)
  ep, g = elastic.adapt_init_params(src, sp, dst, src.grid)
  assert g == dst.grid
  np.testing.assert_allclose(forward(elastic.at(dst, 4), ep, x, t, y), forward(src, sp, x, t, y),
                             atol=2e-5)
  # elastic -> static at the destination's n: exact export
  sp2, _ = elastic.adapt_init_params(dst, ep, tiny(1), dst.grid)
  np.testing.assert_array_equal(forward(tiny(1), sp2, x, t, y),
                                forward(elastic.at(dst, 1), ep, x, t, y))
  # elastic R=4 -> elastic R=2: runs identically at n = 4 = R_dst^2 ... through the static n = 16
  dst2 = tiny(4, grid=2)
  ep2, _ = elastic.adapt_init_params(dst, ep, dst2, dst.grid)
  assert ep2["blocks_0"]["attn"]["an_bias"].shape == (2, 2, 2, 7, 7)
  # vanilla sources and identical layouts pass through untouched
  van = tiny(0)
  vp = random_params(van, 4)
  assert elastic.adapt_init_params(van, vp, dst, van.grid)[0] is vp
  assert elastic.adapt_init_params(dst, ep, tiny(16, grid=4), dst.grid)[0] is ep


# ----------------------------------------------------------------------------- schedule
def test_mediators_for_step_is_a_pure_function_of_seed_and_step():
  ms = (1, 4, 9, 16)
  seq = [elastic.mediators_for_step(ms, "uniform", 7, s) for s in range(400)]
  again = [elastic.mediators_for_step(ms, "uniform", 7, s) for s in reversed(range(400))][::-1]
  assert seq == again                                  # order of calls does not matter
  assert seq != [elastic.mediators_for_step(ms, "uniform", 8, s) for s in range(400)]
  counts = {n: sum(k == (n,) for k in seq) for n in ms}
  assert all(60 <= c <= 140 for c in counts.values()), counts   # ~100 each
  sw = [elastic.mediators_for_step(ms, "sandwich", 7, s) for s in range(200)]
  assert all(k[0] == 1 and k[-1] == 16 and len(k) == 3 for k in sw)
  assert {k for k in sw} == set(elastic.step_keys(ms, "sandwich")) == {(1, 4, 16), (1, 9, 16)}
  assert set(seq) == set(elastic.step_keys(ms, "uniform"))
  assert elastic.step_keys((4, 16, 64), "sandwich") == [(4, 16, 64)]
  assert elastic.step_keys((4, 64), "sandwich", 1) == [(4, 64)]
  with pytest.raises(ValueError, match="elastic mode 'random'"):
    elastic.mediators_for_step(ms, "random", 0, 0)
  with pytest.raises(ValueError, match="not a positive perfect square"):
    elastic.parse_mediators("4,8")
  assert elastic.parse_mediators("16, 4,4") == (4, 16)


def test_loss_averages_the_per_n_losses():
  model = tiny(4, grid=2, depth=1)
  p = random_params(model, 5, scale=0.3)
  tr = T.create_transport()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
  y = jnp.arange(4) % 10
  rng = jax.random.key(3)
  (loss, aux), single = jax.jit(lambda p: (
      elastic.make_loss_fn(model, tr, (1, 4))(p, x, y, rng),
      [T.make_loss_fn(elastic.at(model, n), tr)(p, x, y, rng)[0] for n in (1, 4)]))(p)
  np.testing.assert_allclose(aux["loss_by_n"], single, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(single), rtol=1e-6)
  assert abs(float(single[0]) - float(single[1])) > 1e-6


def test_one_compiled_train_step_per_n_tuple_sharded():
  """8 fake devices, mesh (4, 2): the steps compile during the first round of n-tuples only."""
  from jax import monitoring
  model = tiny(4, grid=2, depth=1)
  c = train.default_config()
  c.fsdp_min_size = 0
  mesh = sharding.make_mesh((4, 2))
  rules = sharding.rules_from_config(c)
  tx, schedule = train.make_optimizer(c)
  events = []

  def listener(event, duration, **kw):
    if event.startswith("/jax/core/compile/"):
      events.append(event)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0), rules, 0)
    sel = elastic.StepSelector(
        model, T.create_transport(),
        lambda lf: train.make_train_step(lf, tx, schedule, mesh, shardings, donate=False),
        mediators=(1, 4), mode="uniform", seed=0)
    bsh = sharding.batch_sharding(mesh)
    batch = {"x": jax.device_put(np.random.default_rng(0).normal(size=(8, 8, 8, 4)).astype(
        np.float32), bsh), "y": jax.device_put(np.arange(8, dtype=np.int32) % 10, bsh)}
    keys = [sel.mediators_at(s) for s in range(8)]
    first_round_end = max(keys.index(k) for k in set(keys)) + 1
    assert len(set(keys)) == 2
    monitoring.register_event_duration_secs_listener(listener)
    try:
      per_step = []
      for s in range(8):
        before = len(events)
        state, m = sel(s)(state, batch, jax.random.key(1))
        per_step.append(len(events) - before)
    finally:
      monitoring.unregister_event_duration_listener(listener)
    assert all(v > 0 for i, v in enumerate(per_step) if i == keys.index(keys[i])), per_step
    assert sum(per_step[first_round_end:]) == 0, per_step
    assert sorted(sel.steps) == [(1,), (4,)]
    assert all(f._cache_size() == 1 for f in sel.steps.values())
    assert np.isfinite(float(m.compute()["loss"]))
    leaf = state.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert len(leaf.sharding.device_set) == 8


ELASTIC_CONFIG = dict(model__elastic_grid=2, model__mediator_num=4, elastic__mediators="1,4")


def _tiny_train_config(steps, **over):
  """The tiny experiment of tests/test_train.py (8 devices, mesh (4, 2)), elastic n in {1, 4}."""
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.log_every = 1
  c.checkpoint_every = 2
  c.sample.every = 0
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  c.mesh_shape = (4, 2)
  c.num_train_steps = steps
  for k, v in {**ELASTIC_CONFIG, **over}.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_elastic_training_resumes_exactly(tmp_path):
  """4 steps straight == 2 steps, stop, resume to 4 (n drawn per step from (seed, step))."""
  seq = [elastic.mediators_for_step((1, 4), "uniform", 0, s) for s in range(4)]
  assert len(set(seq)) == 2 and seq[2:] != seq[:2]  # a restart of the n sequence would show
  straight = train.train_and_evaluate(_tiny_train_config(4), str(tmp_path / "a"))
  train.train_and_evaluate(_tiny_train_config(2), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(_tiny_train_config(4), str(tmp_path / "b"))
  assert resumed["step"] == 4
  a = jax.tree.map(np.asarray, jax.device_get(straight["state"].params))
  b = jax.tree.map(np.asarray, jax.device_get(resumed["state"].params))
  for (k, x), (_, z) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_flatten_with_path(b)[0]):
    np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(k))
  meta = checkpoint.Checkpointer(tmp_path / "a" / "checkpoints", read_only=True).restore_meta(4)
  assert meta["model_config"]["elastic_grid"] == 2
  assert meta["config"]["elastic"]["mediators"] == "1,4"


@pytest.mark.parametrize("over,match", [
    (dict(model__elastic_grid=0), "needs an elastic model: set --config.model.elastic_grid"),
    (dict(elastic__mode="random"), "elastic mode 'random'"),
    (dict(elastic__mediators="1,5"), "mediator_num=5 is not a positive perfect square"),
    (dict(elastic__mediators="4,64"), "larger than the number of tokens 16"),
])
def test_elastic_config_errors(tmp_path, over, match):
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(_tiny_train_config(2, **over), str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "checkpoints").exists() or not any(
      (tmp_path / "bad" / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- sampling
def test_dynamic_sampler_with_one_elastic_checkpoint_equals_exported_static_models():
  model = tiny(4, grid=4, depth=1)
  p = random_params(model, 6, scale=0.1)
  ms = (1, 4, 16)
  cfg, rule, tr = samplers.SDEConfig(num_steps=16), dynamic.SwitchRule((0.9, 0.7), 3), \
      T.create_transport()
  x0 = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
  y = jnp.array([1, 2, 3, 4], jnp.int32)
  keys = jax.random.split(jax.random.key(5), 4)
  ds = dynamic.DynamicSampler.elastic(model, p, ms, tr, cfg, rule, batch_size=4,
                                      bucket_sizes=(2, 4))
  first = ds._variables[0]["params"]
  assert all(v["params"] is first for v in ds._variables)  # one parameter set in memory
  res = ds.sample(x0, y, keys)
  assert res.stages.max() >= 1
  exported = [elastic.elastic_to_static(model, p, n) for n in ms]
  three = dynamic.DynamicSampler([m for m, _ in exported], [q for _, q in exported], tr, cfg,
                                 rule, batch_size=4, bucket_sizes=(2, 4))
  ref = three.sample(x0, y, keys)
  np.testing.assert_array_equal(res.stages, ref.stages)
  np.testing.assert_allclose(res.x, ref.x, atol=1e-5)
  g = np.array([flops.gflops(elastic.at(model, n)) for n in ms])
  np.testing.assert_allclose(res.gflops, g[res.stages[:-1]].sum(0) + g[res.stages[-1]],
                             rtol=1e-9)
  assert len(ds._compiled) == 3 and all(len(c) == 2 for c in ds._compiled)
  with pytest.raises(ValueError, match="strictly increasing"):
    dynamic.DynamicSampler.elastic(model, p, (4, 1), tr, cfg, dynamic.SwitchRule((0.8,)),
                                   batch_size=4)
  with pytest.raises(ValueError, match="needs an elastic checkpoint"):
    dynamic.DynamicSampler.elastic(tiny(4), random_params(tiny(4), 0), ms, tr, cfg, rule,
                                   batch_size=4)


@pytest.fixture(scope="module")
def elastic_ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("el")
  m = tiny(4, grid=2, depth=1, in_channels=3)
  p = random_params(m, 7, scale=0.1)
  convert.save_converted(root / "el", m, p)
  s = tiny(4, depth=1, in_channels=3)
  convert.save_converted(root / "static4", s, random_params(s, 8, scale=0.1))
  return {"el": str(root / "el"), "static4": str(root / "static4"), "model": m, "params": p}


def test_sample_cli_one_elastic_checkpoint(elastic_ckpt, tmp_path):
  common = ["--num_samples", "8", "--batch_size", "8", "--num_steps", "12", "--no_progress",
            "--labels", "1,2"]
  res = sample.main(["--ckpt", elastic_ckpt["el"], "--mediators", "1,4", "--switch_ratios", "0.9",
                     "--out", str(tmp_path / "dyn")] + common)
  s = json.loads((tmp_path / "dyn" / "summary.json").read_text())
  assert s["mediators"] == [1, 4] and s["elastic"] and s["dynamic"]["mediator_nums"] == [1, 4]
  assert res["images"].shape == (8, 8, 8, 3)
  # --mediators 1: static sampling of the elastic checkpoint at n = 1
  one = sample.main(["--ckpt", elastic_ckpt["el"], "--mediators", "1", "--out",
                     str(tmp_path / "n1")] + common)
  g1 = flops.gflops(elastic.at(elastic_ckpt["model"], 1))
  assert one["summary"]["gflops_per_forward"] == pytest.approx(g1)
  assert one["summary"]["mediators"] == [1]


@pytest.mark.parametrize("extra,match", [
    (["--mediators", "4,1", "--switch_ratios", "0.8"], "strictly increasing"),
    (["--mediators", "1,4"], "2 models need 1 switch ratios"),
    (["--mediators", "1,4", "--switch_ratios", "0.8", "--ckpt", "STATIC"], "ONE elastic"),
    (["--mediators", "x"], "comma-separated perfect squares"),
])
def test_sample_cli_mediators_bad_input(elastic_ckpt, tmp_path, extra, match):
  extra = [elastic_ckpt["static4"] if e == "STATIC" else e for e in extra]
  with pytest.raises(ValueError, match=match):
    sample.main(["--ckpt", elastic_ckpt["el"], "--out", str(tmp_path / "bad"), "--num_samples",
                 "8", "--batch_size", "8", "--num_steps", "12", "--no_progress"] + extra)
  assert not (tmp_path / "bad").exists()


def test_sample_cli_static_checkpoint_with_other_n(elastic_ckpt, tmp_path):
  with pytest.raises(ValueError, match="static model with n=4"):
    sample.main(["--ckpt", elastic_ckpt["static4"], "--mediators", "1", "--out",
                 str(tmp_path / "bad"), "--num_samples", "8", "--batch_size", "8",
                 "--no_progress"])


# ----------------------------------------------------------------------------- CLI, FLOPs
def test_elastic_cli_export_and_init(elastic_ckpt, tmp_path, capsys):
  m, p = elastic_ckpt["model"], elastic_ckpt["params"]
  x, t, y = inputs(m, seed=3)
  for suffix in (".npz", ".safetensors", ""):
    out = tmp_path / f"n1{suffix}"
    assert elastic.main(["export", elastic_ckpt["el"], "--mediators", "1", "--out", str(out)]) == 0
    sm, sp = checkpoint.load_params_for_sampling(str(out))
    assert sm.mediator_num == 1 and sm.elastic_grid == 0
    np.testing.assert_array_equal(forward(sm, sp, x, t, y), forward(elastic.at(m, 1), p, x, t, y))
  assert sorted(np.load(tmp_path / "n1.npz").files) == sorted(
      convert.params_to_state_dict(sp, sm))
  # static -> elastic directory, then back at the source n: the same model
  assert elastic.main(["init", str(tmp_path / "n1.npz"), "--grid", "2", "--out",
                       str(tmp_path / "el2")]) == 0
  em, ep = checkpoint.load_params_for_sampling(str(tmp_path / "el2"))
  assert em.elastic_grid == 2 and em.mediator_num == 1
  np.testing.assert_allclose(forward(em, ep, x, t, y), forward(sm, sp, x, t, y), atol=2e-5)
  capsys.readouterr()
  # errors: one line, exit code 2, nothing overwritten
  before = (tmp_path / "n1.npz").read_bytes()
  for argv, msg in [
      (["export", elastic_ckpt["el"], "--mediators", "4", "--out", str(tmp_path / "n1.npz")],
       "exists: choose another --out or pass --overwrite"),
      (["export", elastic_ckpt["static4"], "--mediators", "4", "--out", str(tmp_path / "x.npz")],
       "not elastic"),
      (["export", elastic_ckpt["el"], "--mediators", "8", "--out", str(tmp_path / "y.npz")],
       "mediator_num=8 is not a positive perfect square"),
      (["init", elastic_ckpt["el"], "--grid", "4", "--out", str(tmp_path / "z")],
       "already elastic"),
      (["init", str(tmp_path / "missing"), "--grid", "4", "--out", str(tmp_path / "z")],
       "does not exist"),
  ]:
    assert elastic.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err, err
  assert (tmp_path / "n1.npz").read_bytes() == before
  assert not (tmp_path / "x.npz").exists() and not (tmp_path / "z").exists()


def test_flops_per_n():
  el = tiny(4, grid=4, input_size=32, patch_size=2, depth=2, hidden_size=64, num_heads=4)
  for n in (1, 4, 16, 64):
    static = el.clone(mediator_num=n, elastic_grid=0)
    extra = 0 if n == 16 else el.depth * 4 * (2 * 4 * n * 49 + 4 * 4 * n * el.grid)
    assert flops.breakdown(elastic.at(el, n)).total == flops.breakdown(static).total + extra
  g = [flops.gflops(elastic.at(el, n)) for n in (1, 4, 16, 64)]
  assert g == sorted(g)
  # the StepSelector's expected forward cost: mean over n (uniform), sum per tuple (sandwich)
  tr = T.create_transport()
  u = elastic.StepSelector(el, tr, lambda f: f, mediators=(4, 16, 64), mode="uniform")
  s = elastic.StepSelector(el, tr, lambda f: f, mediators=(4, 16, 64), mode="sandwich")
  each = [flops.gflops(elastic.at(el, n)) for n in (4, 16, 64)]
  assert u.forward_gflops() == pytest.approx(np.mean(each))
  assert s.forward_gflops() == pytest.approx(sum(each))


# ----------------------------------------------------------------------------- configs, study
def _config_module(name):
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location(name, root / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("preset,blocks", [("XL2", 28), ("XL2-first4", 4), ("XL2-med64", 28),
                                           ("S2-med64", 12)])
def test_finetune_presets_build_and_published_compute_is_current(preset, blocks):
  import pathlib  # noqa: PLC0415
  c = _config_module("elastic_finetune").get_config(preset)
  model = train.get_model(c)
  assert model.elastic_grid == 8 and len(model.mediator_blocks) == blocks
  elastic.check_config(c, model)
  assert c.elastic.mediators == "4,16,64" and c.init_from == ""
  shapes = jax.tree.map(lambda a: a.shape, models.abstract_params(model))
  assert shapes["blocks_0"]["attn"]["an_bias"] == (model.num_heads, 8, 8, 7, 7)
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results/elastic_finetune_compute.json"
  rows = {r["preset"]: r for r in json.loads(path.read_text())["presets"]}
  if preset in rows:  # the figures in docs/elastic.md: regenerate the JSON if this fails
    for n, g in rows[preset]["forward_gmacs"].items():
      assert g == pytest.approx(flops.gflops(elastic.at(model, int(n))), rel=1e-12)
    assert rows[preset]["uniform"]["train_gflop_per_image"] == pytest.approx(
        6 * np.mean([flops.gflops(elastic.at(model, n)) for n in (4, 16, 64)]), rel=1e-12)
  with pytest.raises(ValueError, match="unknown preset 'XL3'"):
    _config_module("elastic_finetune").get_config("XL3")


def test_study_verdicts_follow_the_numbers(tmp_path):
  """benchmarks/elastic_study.summarize: 'within one std' and 'matches at equal GFLOPs'."""
  from benchmarks import elastic_study  # noqa: PLC0415
  study = _config_module("elastic_study").get_config("quick").to_dict()
  rows = []
  for seed, (s4, e4, s64, e64) in enumerate([(10, 11, 20, 30), (12, 12, 22, 31), (14, 13, 24, 29)]):
    for model, fdd, n in (("full", s4 - 1, 0), ("static n=4", s4, 4), ("elastic n=4", e4, 4),
                          ("static n=64", s64, 64), ("elastic n=64", e64, 64)):
      rows.append({"seed": seed, "kind": "static", "model": model, "mediator_num": n,
                   "fdd": fdd, "accuracy": 0.9, "gflops_per_image": n / 10})
    for rho, g3, f3, ge, fe in (((0.9, 0.8), 5.0, 20.0, 4.0, 18.0), ((0.6, 0.4), 1.0, 10.0, 2.0,
                                                                     40.0)):
      rows.append({"seed": seed, "kind": "dynamic", "model": "three static", "rho": list(rho),
                   "fdd": f3 + seed, "accuracy": 0.9, "gflops_per_image": g3,
                   "steps_per_stage": [1.0, 2.0]})
      rows.append({"seed": seed, "kind": "dynamic", "model": "one elastic", "rho": list(rho),
                   "fdd": fe + seed, "accuracy": 0.9, "gflops_per_image": ge,
                   "steps_per_stage": [1.0, 2.0]})
  study["mediators"] = [4, 64]
  study["seeds"] = [0, 1, 2]
  s = elastic_study.summarize({"study": study, "rows": rows})
  fdd = {t["n"]: t for t in s["target_elastic"] if t["metric"] == "fdd"}
  assert fdd[4]["within"] and fdd[4]["static"] == (12.0, 2.0)
  assert not fdd[64]["within"] and fdd[64]["diff"] == pytest.approx(8.0)
  dyn = {tuple(t["rho"]): t for t in s["target_dynamic"]}
  # elastic (0.9, 0.8) at 4 GFLOPs (FDD 19 +- 1) vs the three-static curve interpolated there
  # between (1, 11) and (5, 21): 18.5 (+- 1): a match; (0.6, 0.4): 41 vs 13.5, no match
  assert dyn[(0.9, 0.8)]["fdd_three"] == pytest.approx(18.5) and dyn[(0.9, 0.8)]["matches"]
  assert dyn[(0.6, 0.4)]["fdd_three"] == pytest.approx(13.5) and not dyn[(0.6, 0.4)]["matches"]
  payload = {"study": study, "rows": rows, "command": "python benchmarks/report.py --parts elastic",
             "model": {"depth": 4, "hidden_size": 128, "patch_size": 4, "tokens": 64},
             "classifier": {"held_out_accuracy": 0.98},
             "real_reference": {"num": 200, "fdd": 5.0, "accuracy": 0.97},
             "train": [{"seed": 0, "model": m, "train_gflops": g, "cpu_seconds": c,
                        "wall_seconds": 2 * c} for m, g, c in
                       (("static n=4", 10.0, 100.0), ("static n=64", 12.0, 110.0),
                        ("elastic", 11.0, 105.0), ("full", 13.0, 120.0))]}
  text = "\n".join(elastic_study.markdown(payload, "results/elastic.png", "HEADER"))
  assert "**Target 1 not met**" in text and "n=64 fdd (3 seeds): static 22.0 +- 2.0" in text
  assert "**Status: 3 of 3 planned training seeds complete**" in text
  assert elastic_study.RESUME_COMMAND not in text
  assert "**Target 2 not met** for quality (1 of 2 comparable rho points match)" in text
  assert "| one elastic (dynamic schedule, any n) | 1 | 0.01 | 105 | 210 |" in text
  assert "0.50 of the three-model option's training FLOPs" in text  # 11 / (10 + 12)
  assert elastic_study.plot(payload, tmp_path / "e.png").stat().st_size > 1000
  # one seed (of the three planned) plus a partly evaluated second: no seed std, so the targets
  # are undecided, single values are shown without "+- 0", and the resume command is printed
  one = {**payload, "rows": [r for r in rows if r["seed"] == 0] +
         [r for r in rows if r["seed"] == 1 and r["kind"] == "static"]}
  s1 = elastic_study.summarize(one)
  assert s1["complete_seeds"] == [0] and s1["target_dynamic"][0]["n_seeds"] == 1
  assert all(t["within"] is not None for t in s1["target_elastic"])  # 2 seeds have static rows
  only0 = {**payload, "rows": [r for r in rows if r["seed"] == 0]}
  text = "\n".join(elastic_study.markdown(only0, None, "HEADER"))
  assert "**Status: 1 of 3 planned training seeds complete**" in text
  assert "**Target 1 undecided**" in text and "**Target 2 undecided**" in text
  assert "n=64 fdd (1 seed): static 20.0, elastic 30.0, difference +10.0" in text
  assert elastic_study.RESUME_COMMAND in text and "+- 0.0" not in text


def test_one_model_schedule_is_plain_sampling_even_for_full_attention():
  """DynamicSampler with K = 1 (what the study uses for static points) accepts full attention
  and equals the fixed-step sampler."""
  m = tiny(0, depth=1)
  p = random_params(m, 11, scale=0.1)
  cfg, tr = samplers.ODEConfig("euler", 6), T.create_transport()
  x0 = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
  y = jnp.array([1, 2], jnp.int32)
  ds = dynamic.DynamicSampler([m], [p], tr, cfg, dynamic.SwitchRule(()), batch_size=2,
                              bucket_sizes=(2,))
  res = ds.sample(x0, y)
  want = jax.jit(lambda x: samplers.sample(samplers.flax_model_fn(m, {"params": p}), tr, cfg, x,
                                           y).x)(x0)
  np.testing.assert_allclose(res.x, want, atol=1e-5)
  assert res.gflops[0] == pytest.approx(flops.gflops(m) * 5)


def test_study_reuses_only_complete_seeds_of_the_same_settings(tmp_path):
  """A fresh clone (no runs/) resumes the study from the committed JSON: complete seeds of the
  same settings are reused, partial seeds and other settings are not."""
  from benchmarks import elastic_study  # noqa: PLC0415
  study = _config_module("elastic_study").get_config("quick")
  static = ["full"] + [f"{k} n={n}" for k in ("static", "elastic") for n in study.mediators]
  dyn = [(m, list(r)) for m in ("three static", "one elastic") for r in study.rho]

  def seed_rows(seed, drop=0):
    rs = [{"seed": seed, "kind": "static", "model": m} for m in static]
    rs += [{"seed": seed, "kind": "dynamic", "model": m, "rho": r} for m, r in dyn]
    return rs[:len(rs) - drop]

  payload = {"eval_key": elastic_study.eval_key(study), "study": study.to_dict(),
             "rows": seed_rows(0) + seed_rows(1, drop=1),
             "train": [{"seed": 0, "model": "full"}, {"seed": 1, "model": "full"}]}
  path = tmp_path / "report_elastic.json"
  path.write_text(json.dumps(payload))
  got = elastic_study.committed_seeds(study, path)
  assert list(got) == [0] and len(got[0]["rows"]) == elastic_study.expected_rows(study)
  assert got[0]["train"] == [{"seed": 0, "model": "full"}]
  study.eval.num_samples += 1          # other evaluation settings: nothing is reused
  assert elastic_study.committed_seeds(study, path) == {}
  study.eval.num_samples -= 1
  study.train_steps += 1               # other training budget: nothing is reused
  assert elastic_study.committed_seeds(study, path) == {}


def test_elastic_training_uses_the_runs_objective_loss():
  """The trainer's step selector builds each n's loss with the run's objective (here DiT's
  Gaussian diffusion): the elastic step's loss is that objective's loss of the model at n, not
  the transport loss."""
  from edit_jax.diffusion import gaussian  # noqa: PLC0415
  model = tiny(4, grid=2, depth=1, learn_sigma=False)
  p = random_params(model, 5, scale=0.1)
  diff = gaussian.create_diffusion("", learn_sigma=False)
  c = train.default_config()
  c.objective = "gaussian"
  c.elastic.mediators = "1,4"
  sel = elastic.step_selector(c, model, diff, jax.jit,  # one compiled loss per n-tuple
                              loss_for=lambda m: train.make_loss_fn(c, m, diff))
  want_fn = {n: jax.jit(gaussian.make_loss_fn(elastic.at(model, n), diff)) for n in (1, 4)}
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
  y = jnp.array([1, 2], jnp.int32)
  assert {sel.mediators_at(step) for step in range(4)} == {(1,), (4,)}  # both n are checked
  for step in range(4):
    (n,) = sel.mediators_at(step)
    got, aux = sel(step)(p, x, y, jax.random.key(step))
    want, _ = want_fn[n](p, x, y, jax.random.key(step))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert aux["t"].dtype == jnp.int32  # the Gaussian chain's integer timesteps
