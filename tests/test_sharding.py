"""Meshes and sharded training on 8 fake CPU devices: parity with one device, param shardings,
and the mesh/batch error messages."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from edit_jax import data, sharding, train, transport


def tiny_config():
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4))
  c.global_batch_size = 8
  c.fsdp_min_size = 0
  return c


def run_steps(config, mesh, seed=0, steps=2):
  model = train.get_model(config)
  tx, schedule = train.make_optimizer(config)
  rules = sharding.rules_from_config(config)
  pipe = data.make_pipeline(config.data, seed=seed, global_batch_size=config.global_batch_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(seed), rules,
                                                config.fsdp_min_size)
    loss_fn = transport.make_loss_fn(model, train.get_transport(config))
    step = train.make_train_step(loss_fn, tx, schedule, mesh, shardings,
                                 grad_accum_steps=config.grad_accum_steps)
    for i in range(steps):
      batch = data.to_global(pipe.batch(i), sharding.batch_sharding(mesh))
      state, m = step(state, batch, jax.random.key(1))
  return state, shardings, float(m.compute()["loss"])


@pytest.fixture(scope="module")
def runs():
  c = tiny_config()
  sharded = run_steps(c, sharding.make_mesh((4, 2)))
  single = run_steps(c, sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
  return sharded, single


def test_sharded_step_matches_single_device(runs):
  (s8, _, loss8), (s1, _, loss1) = runs
  assert np.isfinite(loss8) and loss8 > 0.1
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s8.ema_params), jax.tree.leaves(s1.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(s8.step) == int(s1.step) == 2
  # The steps really changed the params: with adaLN-Zero only the final layer gets gradients at
  # step 1; at step 2 Adam moves the block modulation weights by ~lr (1e-4).
  init, _ = train.create_train_state(train.get_model(tiny_config()), train.make_optimizer(
      tiny_config())[0], sharding.make_mesh((1, 1), devices=jax.devices()[:1]), jax.random.key(0))
  delta = np.abs(np.asarray(s1.params["blocks_0"]["adaLN_modulation_1"]["kernel"])
                 - np.asarray(init.params["blocks_0"]["adaLN_modulation_1"]["kernel"]))
  assert 0.5e-4 < delta.max() < 3e-4


def test_params_carry_fsdp_shardings(runs):
  (state, shardings, _), _ = runs
  p = state.params
  blk = p["blocks_0"]
  expect = {
      ("blocks_0", "attn", "qkv", "kernel"): P("fsdp"),            # ("embed", "qkv")
      ("blocks_0", "attn", "proj", "kernel"): P(None, "fsdp"),     # ("heads_merged", "embed")
      ("blocks_0", "mlp", "fc1", "kernel"): P("fsdp"),
      ("blocks_0", "mlp", "fc2", "kernel"): P(None, "fsdp"),
      ("blocks_0", "attn", "dwc", "kernel"): P(None, None, None, "fsdp"),
      ("blocks_0", "attn", "an_bias"): P(),                        # mediator tables: replicated
      ("y_embedder", "embedding_table"): P(None, "fsdp"),
  }
  for path, spec in expect.items():
    leaf = p
    for k in path:
      leaf = leaf[k]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    assert leaf.sharding.mesh.shape == {"data": 4, "fsdp": 2}
  # Each device holds half of an FSDP-sharded kernel (fsdp axis = 2).
  k = blk["mlp"]["fc1"]["kernel"]
  assert k.addressable_shards[0].data.shape == (16, 128)
  # Optimizer moments and EMA follow the params.
  mu = state.opt_state[0].mu
  assert mu["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp")
  assert state.ema_params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp")
  assert state.step.sharding.spec == P()


def test_small_tensors_and_indivisible_dims_replicate():
  mesh = sharding.make_mesh((2, 4))
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8), jnp.float32), ("embed", None)),
           "v": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 8), jnp.float32), ("embed", None))}
  sh = sharding.logical_shardings(boxed, mesh)
  assert sh["w"].spec == P()                  # 6 rows do not split over fsdp=4
  assert sh["v"].spec == P("fsdp")
  sh = sharding.logical_shardings(boxed, mesh, fsdp_min_size=1024)
  assert sh["v"].spec == P()                  # 512 elements < fsdp_min_size


def test_grad_accumulation_matches_big_batch_shapes():
  c = tiny_config()
  c.grad_accum_steps = 2
  state, _, loss = run_steps(c, sharding.make_mesh((4, 1), devices=jax.devices()[:4]))
  assert np.isfinite(loss) and int(state.step) == 2


@pytest.mark.parametrize("shape,msg", [
    ((3, 1), "needs 3 devices but 8 are available"),
    ((-1, -1), "more than one -1"),
    ((-1, 3), "not divisible by the fixed axes' product 3"),
    ((8,), "has 1 axes but the mesh axes are"),
    ((0, 8), "0 or negative"),
])
def test_bad_mesh_messages(shape, msg):
  with pytest.raises(sharding.MeshError, match=msg):
    sharding.make_mesh(shape)


def test_batch_not_divisible_message():
  mesh = sharding.make_mesh((4, 2))
  with pytest.raises(sharding.MeshError, match="not divisible by the 8 devices.*multiple of 8"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(sharding.MeshError, match="x 4 accumulation steps.*multiple of 32"):
    sharding.check_batch_size(16, mesh, grad_accum_steps=4)
  sharding.check_batch_size(16, mesh)
  sharding.check_batch_size(64, mesh, grad_accum_steps=4)
