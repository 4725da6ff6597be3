"""Checkpoints: restore onto another mesh, init_from (official vanilla -> mediators, other
resolution), the 256 -> 512 mediator rule, load_params_for_sampling, error messages."""
import logging

import jax
import flax.linen as nn
import numpy as np
import pytest

from edit_jax import checkpoint, convert, models, sharding, train


def tiny_config(input_size=8, **model):
  c = train.default_config()
  c.model.update(dict(name="", input_size=input_size, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.model.update(model)
  c.data.update(dict(name="synthetic", image_size=input_size, channels=1, num_classes=4,
                     num_threads=1))
  c.global_batch_size = 8
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  return c


def make_state(config, mesh, seed=0):
  model = train.get_model(config)
  tx, _ = train.make_optimizer(config)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(seed), rules)
  return model, tx, state, shardings


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A training checkpoint at step 7 written from a (4, 2) mesh, EMA != params."""
  wd = tmp_path_factory.mktemp("wd")
  c = tiny_config()
  model, _, state, _ = make_state(c, sharding.make_mesh((4, 2)))
  state = state.replace(step=state.step + 7,
                        ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params))
  ck = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(wd)))
  ck.save(7, state, {"step": 7, "data_position": 7, "model_config": models.model_config(model)})
  ck.close()
  return wd, state


def test_restore_onto_a_different_mesh(saved):
  wd, state = saved
  c = tiny_config()
  mesh = sharding.make_mesh((1, 2), devices=jax.devices()[:2])
  model, (tx, _) = train.get_model(c), train.make_optimizer(c)
  abstract, shardings = train.state_shardings(model, tx, mesh, sharding.DEFAULT_RULES)
  ck = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(wd)), read_only=True)
  restored, meta = ck.restore(checkpoint.abstract_with_shardings(abstract, shardings))
  assert meta["step"] == 7 and int(restored.step) == 7
  a, b = flat(restored), flat(state)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  k = restored.params["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.mesh.shape == {"data": 1, "fsdp": 2} and len(k.sharding.device_set) == 2


def test_load_params_for_sampling_from_workdir(saved):
  wd, state = saved
  model, params = checkpoint.load_params_for_sampling(str(wd))
  assert isinstance(model, models.SiT) and model.mediator_num == 4 and model.input_size == 8
  for k, v in flat(params).items():
    np.testing.assert_array_equal(v, flat(state.ema_params)[k])
  _, raw = checkpoint.load_params_for_sampling(str(wd / "checkpoints" / "7"), ema=False)
  np.testing.assert_array_equal(flat(raw)["['final_layer']['linear']['kernel']"],
                                flat(state.params)["['final_layer']['linear']['kernel']"])
  x, t, y = models.dummy_inputs(model, 2)
  assert jax.jit(model.apply)({"params": params}, x, t, y).shape == (2, 8, 8, 1)


def test_load_params_for_sampling_official_and_converted(golden_dir, tmp_path):
  npz = golden_dir / "vanilla_tiny_state_dict.npz"
  model, params = checkpoint.load_params_for_sampling(str(npz), num_heads=4)
  assert model.hidden_size == 96 and model.mediator_num == 0
  convert.save_converted(tmp_path / "conv", model, params)
  m2, p2 = checkpoint.load_params_for_sampling(str(tmp_path / "conv"))
  assert m2 == model
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(p2)[k], v)


def test_load_errors(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_params_for_sampling(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
    checkpoint.load_params_for_sampling(str(tmp_path / "empty"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(checkpoint.CheckpointError, match="unknown file type"):
    checkpoint.load_init_params(str(tmp_path / "w.txt"))


def init_via_config(c, tmp_path):
  """train._restore_or_init on a (2, 4) mesh with an empty checkpoint dir -> fresh/init_from."""
  mesh = sharding.make_mesh((2, 4))
  model = train.get_model(c)
  tx, _ = train.make_optimizer(c)
  rules = sharding.rules_from_config(c)
  ck = checkpoint.Checkpointer(tmp_path / "checkpoints")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings, meta = train._restore_or_init(c, model, tx, mesh, rules, ck,
                                                    jax.random.key(0))
  ck.close()
  assert meta is None
  return state, shardings


MEDIATOR_KEYS = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "attn.dwc")


def test_init_mediators_from_vanilla_official_checkpoint(saved, tmp_path, caplog):
  """Fine-tune mediators from a vanilla checkpoint in the official PyTorch format (.npz of
  state_dict names, as SiT-XL-2-256x256.pt): shared tensors load, new ones keep their init."""
  wd, state = saved
  model = train.get_model(tiny_config())
  sd = convert.params_to_state_dict(jax.device_get(state.ema_params), model)
  sd = {k: v for k, v in sd.items() if not any(m in k for m in MEDIATOR_KEYS)}
  assert "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.an_bias" not in sd
  np.savez(tmp_path / "vanilla.npz", **sd)
  c = tiny_config(input_size=16)
  c.init_from = str(tmp_path / "vanilla.npz")
  caplog.set_level(logging.INFO)
  new, shardings = init_via_config(c, tmp_path)
  p = new.params
  np.testing.assert_array_equal(np.asarray(p["blocks_0"]["mlp"]["fc1"]["kernel"]),
                                sd["blocks.0.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(np.asarray(new.ema_params["blocks_0"]["attn"]["qkv"]["kernel"]),
                                sd["blocks.0.attn.qkv.weight"].T)
  assert np.abs(np.asarray(p["blocks_0"]["attn"]["an_bias"])).max() > 0   # fresh trunc-normal
  assert p["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == shardings.params[
      "blocks_0"]["mlp"]["fc1"]["kernel"].spec
  text = caplog.text
  assert "tensors missing from the source keep their fresh init" in text
  for name in ("blocks_0/attn/an_bias", "blocks_0/attn/wa_bias", "blocks_0/attn/dwc/kernel"):
    assert name in text
  assert int(np.asarray(new.opt_state[0].count)) == 0


def test_resize_mediator_params_official_rule():
  rng = np.random.default_rng(0)
  h, n, g = 2, 4, 4
  params = {"blocks_0": {"attn": {
      "ah_bias": rng.normal(size=(1, h, n, g, 1)).astype(np.float32),
      "aw_bias": rng.normal(size=(1, h, n, 1, g)).astype(np.float32),
      "ha_bias": rng.normal(size=(1, h, g, 1, n)).astype(np.float32),
      "wa_bias": rng.normal(size=(1, h, 1, g, n)).astype(np.float32),
      "an_bias": rng.normal(size=(h, n, 7, 7)).astype(np.float32),
      "qkv": {"kernel": rng.normal(size=(8, 24)).astype(np.float32)}}}}
  out = checkpoint.resize_mediator_params(params, g, 7)["blocks_0"]["attn"]
  assert out["ah_bias"].shape == (1, h, n, 7, 1) and out["aw_bias"].shape == (1, h, n, 1, 7)
  assert out["ha_bias"].shape == (1, h, 7, 1, n) and out["wa_bias"].shape == (1, h, 1, 7, n)
  np.testing.assert_array_equal(out["an_bias"], params["blocks_0"]["attn"]["an_bias"])
  np.testing.assert_array_equal(out["qkv"]["kernel"], params["blocks_0"]["attn"]["qkv"]["kernel"])
  # align_corners=True: new position i samples old position i * (g - 1) / (new - 1).
  src = params["blocks_0"]["attn"]["ah_bias"][0, 1, 2, :, 0]
  want = np.interp(np.arange(7) * 3 / 6, np.arange(4), src)
  np.testing.assert_allclose(out["ah_bias"][0, 1, 2, :, 0], want, rtol=1e-6)
  src = params["blocks_0"]["attn"]["ha_bias"][0, 0, :, 0, 3]
  np.testing.assert_allclose(out["ha_bias"][0, 0, :, 0, 3], np.interp(np.arange(7) * 0.5,
                                                                      np.arange(4), src), rtol=1e-6)
  # 16 -> 32 doubles the grid and keeps both end points.
  big = checkpoint.resize_mediator_params({"wa_bias": np.arange(16, dtype=np.float32).reshape(
      1, 1, 1, 16, 1)}, 16, 32)["wa_bias"]
  np.testing.assert_allclose(big[0, 0, 0, :, 0], np.linspace(0, 15, 32), rtol=1e-6)
  with pytest.raises(ValueError, match="expected grid size 5"):
    checkpoint.resize_mediator_params(params, 5, 10)


def test_init_from_lower_resolution_workdir(saved, tmp_path, caplog):
  """The 256 -> 512 path: a grid-4 checkpoint initializes a grid-8 mediator model."""
  wd, state = saved
  c = tiny_config(input_size=16)
  c.init_from = str(wd)
  caplog.set_level(logging.INFO)
  new, _ = init_via_config(c, tmp_path)
  assert "resized mediator biases 4->8" in caplog.text
  old_ema = jax.device_get(state.ema_params)
  got = np.asarray(new.params["blocks_0"]["attn"]["aw_bias"])
  assert got.shape == (1, 2, 4, 1, 8)
  want = checkpoint.resize_mediator_params(old_ema, 4, 8)["blocks_0"]["attn"]["aw_bias"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.params["blocks_0"]["attn"]["an_bias"]),
                                np.asarray(old_ema["blocks_0"]["attn"]["an_bias"]))
  np.testing.assert_array_equal(np.asarray(new.params["blocks_0"]["mlp"]["fc2"]["kernel"]),
                                np.asarray(old_ema["blocks_0"]["mlp"]["fc2"]["kernel"]))


def test_replica_parallel_saving_only_for_large_slices(tmp_path):
  """Replicated arrays: a small one is written by one replica without slicing it on device (no
  compilation: orbax's replica-parallel default compiles a slice program per shape and replica);
  one whose per-replica slice reaches REPLICA_PARALLEL_MIN_SLICE_BYTES is still split over the 8
  replicas. Both restore exactly."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  big_rows = 8 * checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES // (4 * 128)  # 1 slice = the minimum
  tree = {"small": np.arange(3 * 40, dtype=np.float32).reshape(3, 40),
          "big": np.arange(big_rows * 128, dtype=np.float32).reshape(big_rows, 128)}
  compiled = []

  class Log(logging.Handler):
    def emit(self, rec):
      if "Finished XLA compilation" in rec.getMessage():
        compiled.append(rec.getMessage())

  ck = checkpoint.Checkpointer(tmp_path / "ck", async_save=False)
  for name, want_slices in (("small", False), ("big", True)):
    arr = jax.device_put(tree[name], repl)
    handler, loggers = Log(), [logging.getLogger(n) for n in ("jax._src.interpreters.pxla",
                                                               "jax._src.dispatch")]
    compiled.clear()
    for lg in loggers:
      lg.addHandler(handler)
    try:
      with jax.log_compiles():
        ck.save(len(name), {name: arr}, {"step": len(name)})
        ck.wait()
    finally:
      for lg in loggers:
        lg.removeHandler(handler)
    assert any("slice" in m for m in compiled) == want_slices, (name, compiled)
    got = ck.manager.restore(len(name), args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore({name: arr})))["state"][name]
    np.testing.assert_array_equal(np.asarray(got), tree[name])
  ck.close()
