"""Every advertised model/training option does what it says: the Pallas mediator kernel inside the
model, the cuDNN full-attention selection, remat, bf16 compute, LR schedules, EMA warm-up and
cluster auto-detection for jax.distributed."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from edit_jax import data, models, sharding, train
from edit_jax.diffusion import transport
from random_params import random_params as _random  # tests/random_params.py


# ----------------------------------------------------------------------------- attention options
def _tiny_model(**kw):
  base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
              num_classes=10, mediator_num=4)
  base.update(kw)
  return models.build_model(None, **base)


def _perturbed_params(model, seed=0, scale=0.05):
  """Random weights so that every block gets gradients."""
  return _random(model, seed, scale)


def test_pallas_mediator_kernel_in_model_matches_xla():
  """attention_impl="pallas" (the fused kernel, Pallas interpreter on CPU) gives the same loss and
  parameter gradients as "xla" for a whole SiT (mediator layer, 16 tokens, n = 4)."""
  xla = _tiny_model()
  pallas = _tiny_model(attention_impl="pallas")
  params = _perturbed_params(xla)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
  t, y = jnp.array([0.3, 0.8]), jnp.array([1, 7])

  def traced_loss(model):  # traced once: its jaxpr is inspected, then it is compiled and run
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2))).trace(params)

  tr_x, tr_p = traced_loss(xla), traced_loss(pallas)
  assert "pallas_call" in str(tr_p.jaxpr) and "pallas_call" not in str(tr_x.jaxpr)
  (l_x, g_x), (l_p, g_p) = (tr.lower().compile()(params) for tr in (tr_x, tr_p))
  assert l_x > 1e-3
  # Achieved on CPU: loss to ~1e-7 relative, gradients to 1.2e-6 of each tensor's largest entry.
  np.testing.assert_allclose(float(l_p), float(l_x), rtol=1e-6)
  worst = 0.0
  for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
    scale = float(jnp.abs(b).max())
    if scale > 0:
      worst = max(worst, float(jnp.abs(a - b).max()) / scale)
  assert worst < 1e-5, worst
  # The mediator biases get gradients through the kernel (its custom VJP), not zeros.
  assert np.abs(np.asarray(g_p["blocks_0"]["attn"]["an_bias"])).max() > 1e-6


def test_full_attention_impl_reaches_dot_product_attention(monkeypatch):
  """config.model.full_attention_impl picks the core in every block: "cudnn"/"xla" reach
  jax.nn.dot_product_attention; empty (automatic) runs the head-major core on this CPU."""
  from edit_jax.models import attention_core  # noqa: PLC0415
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=4, num_classes=10, patch_size=2,
                      hidden_size=32, depth=2, num_heads=2, full_attention_impl="cudnn"))
  seen = []
  real = jax.nn.dot_product_attention
  real_hm = attention_core.head_major_attention

  def spy(*a, implementation=None, **k):
    seen.append(implementation)
    return real(*a, **k)  # run the XLA path: no cuDNN on the CPU

  def spy_hm(*a, **k):
    seen.append("head_major")
    return real_hm(*a, **k)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  monkeypatch.setattr(attention_core, "head_major_attention", spy_hm)
  x = y = t = params = None
  for impl, expect in (("cudnn", "cudnn"), ("xla", "xla"), ("head_major", "head_major"),
                       ("", "head_major")):
    c.model.full_attention_impl = impl
    model = train.get_model(c)
    if params is None:
      params = models.abstract_params(model)
      x, t, y = models.dummy_inputs(model, 1)
    seen.clear()
    jax.eval_shape(lambda p, m=model: m.apply({"params": p}, x, t, y), params)
    assert seen == [expect, expect], impl


def test_full_attention_impl_errors(tmp_path):
  with pytest.raises(ValueError, match=r"full_attention_impl='flash': expected one of None "
                                       r"\(automatic\), 'xla', 'cudnn'.* or 'head_major'"):
    _tiny_model(mediator_num=0, full_attention_impl="flash").validate()
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, full_attention_impl="cudnn"))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4))
  c.global_batch_size = 8
  with pytest.raises(train.ConfigError, match=r"full_attention_impl='cudnn' needs an NVIDIA GPU "
                                             r"with cuDNN.*backend is cpu.*full_attention_impl="):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd" / "checkpoints").exists()


# ----------------------------------------------------------------------------- training options
def _tiny_config(**model_kw):
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.model.update(model_kw)
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  return c


def _one_step(config, init_params):
  """(state before, state after, metrics, step fn) of one train step on a single device, from the
  fresh train state (step 0, EMA = params, new optimizer state) of `init_params` (perturbed
  weights: every block gets gradients at step 1; no init compile)."""
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  model = train.get_model(config)
  tx, schedule = train.make_optimizer(config)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = train.state_shardings(model, tx, mesh, rules)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=init_params,
                             opt_state=tx.init(init_params), ema_params=init_params)
    step = train.make_train_step(transport.make_loss_fn(model, train.get_transport(config)), tx,
                                 schedule, mesh, shardings, donate=False)
    batch = data.make_pipeline(config.data, seed=0, global_batch_size=8).batch(0)
    new, m = step(state, data.to_global(batch, sharding.batch_sharding(mesh)), jax.random.key(1))
  return state, new, {k: float(v) for k, v in m.compute().items()}, step


@pytest.fixture(scope="module")
def fp32_run():
  c = _tiny_config()
  params = _perturbed_params(train.get_model(c))
  return params, _one_step(c, params)


def _has_checkpoint(jaxpr) -> bool:
  for e in jaxpr.eqns:
    if e.primitive.name in ("checkpoint", "remat", "remat2"):
      return True
    for v in e.params.values():
      for item in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(item, "jaxpr", item)
        if hasattr(sub, "eqns") and _has_checkpoint(sub):
          return True
  return False


def test_remat_is_applied_and_changes_nothing_numerically(fp32_run):
  params, (_, ref, m_ref, _) = fp32_run
  c = _tiny_config(remat=True)
  model = train.get_model(c)
  assert model.remat
  x = jnp.zeros((2, 8, 8, 1))
  t, y = jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32)
  grad_jaxpr = lambda m: jax.make_jaxpr(jax.grad(  # noqa: E731
      lambda p: jnp.sum(m.apply({"params": p}, x, t, y))))(params).jaxpr
  assert _has_checkpoint(grad_jaxpr(model))                     # the blocks are rematerialized
  assert not _has_checkpoint(grad_jaxpr(train.get_model(_tiny_config())))
  _, new, m, _ = _one_step(c, params)
  assert m["grad_norm"] > 1e-3
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], m_ref["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bf16_training_keeps_fp32_master_weights(fp32_run):
  params, (_, ref, m_ref, _) = fp32_run
  _, new, m, _ = _one_step(_tiny_config(dtype="bfloat16"), params)
  # bf16 compute: the loss agrees to bf16 precision (~3 significant digits), not exactly.
  assert m["loss"] != m_ref["loss"]
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=2e-2)
  np.testing.assert_allclose(m["grad_norm"], m_ref["grad_norm"], rtol=5e-2)
  for tree in (new.params, new.ema_params, new.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, leaf.dtype


def _closed_form_lr(step, lr, warm, total, kind, end):
  """The schedules written out (independent of optax)."""
  if step < warm:
    return lr * step / warm
  s, n = step - warm, max(total - warm, 1)
  if kind == "constant":
    return lr
  if kind == "linear":
    return lr + (lr * end - lr) * min(s, n) / n
  frac = min(s, n) / n
  return lr * (end + (1 - end) * 0.5 * (1 + np.cos(np.pi * frac)))


@pytest.mark.parametrize("kind,warm,end", [("constant", 0, 0.0), ("constant", 10, 0.0),
                                           ("cosine", 10, 0.05), ("cosine", 0, 0.0),
                                           ("linear", 10, 0.1)])
def test_lr_schedules(kind, warm, end):
  c = train.default_config()
  c.num_train_steps = 110
  c.optim.update(dict(learning_rate=3e-3, schedule=kind, warmup_steps=warm, end_lr_factor=end))
  _, schedule = train.make_optimizer(c)
  for s in (0, 1, 5, 9, 10, 11, 35, 60, 100, 109, 110):
    want = _closed_form_lr(s, 3e-3, warm, 110, kind, end)
    np.testing.assert_allclose(float(schedule(s)), want, rtol=1e-5, atol=1e-9, err_msg=str(s))


def test_optimizer_steps_with_the_schedule():
  """make_optimizer's AdamW moves by the schedule's value: with a constant gradient Adam's
  normalized step is 1, so after t updates the (t+1)-th moves each weight by exactly lr(t)."""
  import optax  # noqa: PLC0415
  c = train.default_config()
  c.num_train_steps = 50
  c.optim.update(dict(learning_rate=1e-2, schedule="cosine", warmup_steps=5, end_lr_factor=0.1,
                      eps=1e-12))
  tx, schedule = train.make_optimizer(c)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  for t in range(12):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -_closed_form_lr(t, 1e-2, 5, 50, "cosine",
                                                                          0.1), rtol=1e-5,
                               atol=1e-9, err_msg=str(t))
    params = optax.apply_updates(params, updates)


def test_ema_warmup_decay():
  """ema_warmup: decay_t = min(decay, (1 + t) / (10 + t)) at step t (0: 0.1, 90: 0.91)."""
  for t, want in ((0, 0.1), (5, 6 / 15), (90, 0.91), (10 ** 6, 0.9999)):
    np.testing.assert_allclose(float(train.ema_decay_at(t, 0.9999, True)), want, rtol=1e-6)
    assert float(train.ema_decay_at(t, 0.9999, False)) == pytest.approx(0.9999)


def test_ema_warmup_in_the_train_loop(tmp_path):
  """Two steps of train_and_evaluate with ema_warmup: ema_2 = ema_1 + (1 - 2/11) (params_2 - ema_1),
  the warm-up decay at t = 1 (without warm-up it would be 0.9999), ema_1 from the step-1 checkpoint."""
  c = _tiny_config()
  c.ema_warmup, c.ema_decay = True, 0.9999
  c.num_train_steps, c.log_every, c.checkpoint_every, c.sample.every = 2, 1, 1, 0
  c.mesh_shape = (-1, 1)
  wd = tmp_path / "ema"
  first = train.train_and_evaluate(c, str(wd))
  from edit_jax import checkpoint  # noqa: PLC0415
  _, e1 = checkpoint.load_params_for_sampling(str(wd), ema=True, step=1)
  p2, e2 = first["state"].params, first["state"].ema_params
  k = ("final_layer", "linear", "kernel")
  get = lambda tr: np.asarray(tr[k[0]][k[1]][k[2]])  # noqa: E731
  np.testing.assert_allclose(get(e2), get(e1) + (1 - 2 / 11) * (get(p2) - get(e1)), rtol=1e-5,
                             atol=1e-8)
  assert np.abs(get(p2) - get(e1)).max() > 1e-5


# ----------------------------------------------------------------------------- distributed
class _Recorder:
  def __init__(self):
    self.calls = []

  def __call__(self, **kw):
    self.calls.append(kw)


@pytest.mark.parametrize("env,enabled,expect", [
    ({}, "auto", False),                                               # one machine
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, "auto", False),             # single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "auto", True),     # multi-host slice
    ({"SLURM_NTASKS": "1"}, "auto", False),
    ({"SLURM_NTASKS": "4"}, "auto", True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "auto", True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "auto", True),
    ({"SLURM_NTASKS": "4", "EDIT_JAX_DISTRIBUTED": "0"}, "auto", False),  # env overrides
    ({"EDIT_JAX_DISTRIBUTED": "1"}, "false", True),
    ({}, "true", True),
    ({"SLURM_NTASKS": "4"}, "false", False),
])
def test_cluster_auto_detection(monkeypatch, env, enabled, expect):
  for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
            "JAX_COORDINATOR_ADDRESS", "EDIT_JAX_DISTRIBUTED"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  rec = _Recorder()
  monkeypatch.setattr(jax.distributed, "initialize", rec)
  monkeypatch.setattr(train, "_is_distributed_initialized", lambda: False)
  c = train.default_config()
  c.distributed.enabled = enabled
  assert train.maybe_initialize_distributed(c) is expect
  assert rec.calls == ([{}] if expect else [])


def test_explicit_coordinator_is_passed_on(monkeypatch):
  monkeypatch.delenv("EDIT_JAX_DISTRIBUTED", raising=False)
  rec = _Recorder()
  monkeypatch.setattr(jax.distributed, "initialize", rec)
  monkeypatch.setattr(train, "_is_distributed_initialized", lambda: False)
  c = train.default_config()
  c.distributed.update(dict(enabled="true", coordinator_address="10.0.0.2:1234", num_processes=4,
                            process_id=3))
  assert train.maybe_initialize_distributed(c)
  assert rec.calls == [{"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                        "process_id": 3}]
