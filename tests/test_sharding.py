"""Meshes and sharded training on 8 fake CPU devices: parity with one device, param shardings,
and the mesh/batch error messages."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from edit_jax import data, sharding, train

from edit_jax.diffusion import transport


def tiny_config():
  """The tiny experiment of test_train.py (same HLO: compilations are shared via the cache)."""
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  return c


def setup(config, mesh, init_state=None):
  """(model, tx, schedule, state on mesh, shardings). ``init_state``: a host copy to place on the
  mesh instead of initializing (the init values do not depend on the mesh)."""
  model = train.get_model(config)
  tx, schedule = train.make_optimizer(config)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if init_state is None:
      state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0), rules,
                                                  config.fsdp_min_size)
    else:
      _, shardings = train.state_shardings(model, tx, mesh, rules, config.fsdp_min_size)
      state = jax.device_put(init_state, shardings)
  return model, tx, schedule, state, shardings


def run_steps(config, mesh, init_state=None, steps=2):
  model, tx, schedule, state, shardings = setup(config, mesh, init_state)
  pipe = data.make_pipeline(config.data, seed=0, global_batch_size=config.global_batch_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    loss_fn = transport.make_loss_fn(model, train.get_transport(config))
    step = train.make_train_step(loss_fn, tx, schedule, mesh, shardings,
                                 grad_accum_steps=config.grad_accum_steps)
    norms = []
    for i in range(steps):
      batch = data.to_global(pipe.batch(i), sharding.batch_sharding(mesh))
      state, m = step(state, batch, jax.random.key(1))
      norms.append(float(m.compute()["grad_norm"]))
  return state, shardings, float(m.compute()["loss"]), norms


@pytest.fixture(scope="module")
def init_host():
  """The freshly initialized state (born sharded on a (4, 2) mesh), copied to the host."""
  *_, state, _ = setup(tiny_config(), sharding.make_mesh((4, 2)))
  # Born sharded: the jitted init wrote each device's shard directly.
  k = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec == P("fsdp") and k.addressable_shards[0].data.shape == (16, 128)
  return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(init_host):
  c = tiny_config()
  sharded = run_steps(c, sharding.make_mesh((4, 2)), init_host)
  single = run_steps(c, sharding.make_mesh((1, 1), devices=jax.devices()[:1]), init_host)
  return sharded, single


def test_sharded_step_matches_single_device(runs, init_host):
  (s8, _, loss8, gn8), (s1, _, loss1, gn1) = runs
  assert np.isfinite(loss8) and loss8 > 0.1
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # The gradient norm (before the update) of every step agrees too: a sharded gradient that is
  # summed over the data axis instead of averaged, or only one shard's, changes it.
  assert min(gn1) > 1e-3
  np.testing.assert_allclose(gn8, gn1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s8.ema_params), jax.tree.leaves(s1.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(s8.step) == int(s1.step) == 2
  # The steps really changed the params: with adaLN-Zero only the final layer gets gradients at
  # step 1; at step 2 Adam moves the block modulation weights by ~lr (1e-3).
  delta = np.abs(np.asarray(s1.params["blocks_0"]["adaLN_modulation_1"]["kernel"])
                 - np.asarray(init_host.params["blocks_0"]["adaLN_modulation_1"]["kernel"]))
  assert 0.5e-3 < delta.max() < 3e-3


def test_params_carry_fsdp_shardings(runs):
  (state, shardings, _, _), _ = runs
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


def test_grad_accumulation_averages_micro_batch_gradients(init_host):
  """k = 2: one update with the mean of the gradients of rows 0::2 and 1::2 (rng fold_in(., i)).

  Adam's first step hardly depends on the gradient scale, so the accumulated gradient itself is
  checked through the logged grad_norm (summed or scaled gradients change it)."""
  c = tiny_config()
  c.grad_accum_steps = 2
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  model, tx, schedule, state, shardings = setup(c, mesh, init_host)
  loss_fn = transport.make_loss_fn(model, train.get_transport(c))
  batch = data.make_pipeline(c.data, seed=0, global_batch_size=8).batch(0)
  p0, o0 = init_host.params, init_host.opt_state
  with jax.set_mesh(mesh):
    step = train.make_train_step(loss_fn, tx, schedule, mesh, shardings, grad_accum_steps=2)
    new, m = step(state, data.to_global(batch, sharding.batch_sharding(mesh)), jax.random.key(1))
  rng = jax.random.fold_in(jax.random.key(1), 0)
  grads, losses = [], []
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  for i in range(2):
    (li, _), gi = grad_fn(
        p0, batch["x"][i::2], batch["y"][i::2], jax.random.fold_in(rng, i))
    grads.append(gi)
    losses.append(li)
  g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  want = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))(g, o0, p0)
  np.testing.assert_allclose(float(m.compute()["loss"]), np.mean(losses), rtol=1e-5)
  norms = [float(optax.tree.norm(gi)) for gi in grads]
  assert abs(norms[0] - norms[1]) > 1e-3 * norms[0]  # two different micro-batch gradients
  np.testing.assert_allclose(float(m.compute()["grad_norm"]), float(optax.tree.norm(g)), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


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
