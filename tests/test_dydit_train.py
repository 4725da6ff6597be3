"""DyDiT fine-tuning: target warm-up, stratified t, the loss terms, and an end-to-end run of
`python -m edit_jax.main` from a converted SiT checkpoint (init_from, reordering, logging, resume
as a DyDiT)."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import checkpoint, convert, models, train
from edit_jax.diffusion import dydit as ddy
from edit_jax.diffusion import gaussian, transport as tr
from edit_jax.models import dydit
from test_dydit import noisy


def test_flops_target_schedule_is_the_official_one():
  cfg = ddy.LossConfig(target_ratio=0.5, target_hold_steps=100, target_warmup_steps=1000)
  steps = np.array([0, 50, 99, 100, 500, 1000, 1001, 5000])
  got = np.asarray(jax.vmap(lambda s: ddy.flops_target(s, cfg))(steps))
  want = [1.0 if s < 100 else (1 - 0.5 * s / 1000 if s <= 1000 else 0.5) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(ddy.flops_target(7, ddy.LossConfig(target_ratio=0.7, target_hold_steps=0,
                                                  target_warmup_steps=0))) == \
      pytest.approx(0.7)


def test_gate_noise_decay_schedule():
  off = ddy.LossConfig()
  assert float(ddy.gate_noise_scale(10**6, off)) == 1.0  # official: the noise never decays
  cfg = ddy.LossConfig(gate_noise_decay_start=100, gate_noise_decay_steps=200)
  steps = np.array([0, 100, 150, 200, 300, 301, 1000])
  got = np.asarray(jax.vmap(lambda s: ddy.gate_noise_scale(s, cfg))(steps))
  np.testing.assert_allclose(got, [1, 1, 0.75, 0.5, 0, 0, 0], atol=1e-7)
  with pytest.raises(ValueError, match="gate_noise_decay_steps"):
    ddy.LossConfig(gate_noise_decay_steps=-1).validate()


def test_stratified_t_bins():
  t = np.asarray(ddy.stratified_t(jax.random.key(0), 4000, 0.0, 1.0, 4))
  bins = np.arange(4000) % 4
  assert np.all(np.floor(t * 4) == bins)
  assert abs(t[bins == 2].mean() - 0.625) < 0.01
  u = np.asarray(ddy.stratified_t(jax.random.key(0), 4000, 0.1, 0.9, 1))
  assert 0.1 <= u.min() and u.max() <= 0.9 and abs(u.mean() - 0.5) < 0.02


def test_stratified_chain_t_bins():
  """Official: randint(0, 250) + 250 (b mod 4): bin b holds exactly {250 b, ..., 250 b + 249}."""
  t = np.asarray(ddy.stratified_chain_t(jax.random.key(0), 80000, 1000, 4))
  assert t.dtype == np.int32
  for b in range(4):
    np.testing.assert_array_equal(np.unique(t[b::4]), np.arange(250 * b, 250 * b + 250))


@functools.lru_cache(maxsize=None)
def tiny():
  """A small SiT (learned sigma: both objectives), its perturbed params, the DyDiT on it and that
  DyDiT's params (the base's plus fresh routers); built once for the tests that share them."""
  base = models.build_model(None, input_size=8, patch_size=2, in_channels=1, hidden_size=32,
                            depth=2, num_heads=4, num_classes=4, learn_sigma=True)
  bp = noisy(models.init_params(base, jax.random.key(0)), 0.05)
  m = dydit.from_sit(base)
  return base, bp, m, dydit.init_from_base(m, bp, jax.random.key(2))


def test_gaussian_loss_is_dits_loss_of_the_same_draws():
  """All gates on, lambda = 1: the DyDiT loss on the Gaussian objective equals DiT's training loss
  ("loss" = mse + vb, learned sigma) of the base model at the same t, noise and dropped labels."""
  base, bp, m, p = tiny()
  diff = gaussian.create_diffusion("", learn_sigma=True)
  x = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  rng = jax.random.key(4)
  f = ddy.make_gaussian_loss_fn(m, diff, ddy.LossConfig(target_ratio=1.0, complete_model_steps=5))
  loss, aux = jax.jit(lambda q: f(q, x, y, rng, 2))(p)

  def reference(q):
    k_t, k_noise, k_drop, _ = jax.random.split(rng, 4)
    t = ddy.stratified_chain_t(k_t, 8, 1000, 4)
    noise = jax.random.normal(k_noise, x.shape)
    xt = diff.q_sample(x, t, noise)
    out = base.apply({"params": q}, xt, diff.model_timesteps(t), y, train=True, full_output=True,
                     rngs={"label_dropout": k_drop})
    return diff.training_losses_from_output(out, x, xt, t, noise)["loss"].mean(), t

  want, t = jax.jit(reference)(bp)
  np.testing.assert_array_equal(np.asarray(aux["t"]), np.asarray(t))
  assert float(aux["log"]["flops_loss"]) == 0.0
  assert float(aux["log"]["diffusion_loss"]) == pytest.approx(float(want), rel=1e-5)
  assert float(aux["log"]["complete_loss"]) == pytest.approx(float(want), rel=1e-5)
  assert float(loss) == pytest.approx(2 * float(want), rel=1e-5)


def test_loss_terms():
  _, _, m, p = tiny()
  transport = tr.create_transport()
  x = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  rng = jax.random.key(4)

  def make(cfg):
    f = ddy.make_transport_loss_fn(m, transport, cfg)
    return jax.jit(jax.value_and_grad(lambda q, step: f(q, x, y, rng, step), has_aux=True))

  # all gates on, lambda = 1: zero FLOPs loss, ratio exactly 1, the base model's diffusion loss
  # (values only: a forward program, no gradient to compile)
  f1 = ddy.make_transport_loss_fn(m, transport, ddy.LossConfig(target_ratio=1.0))
  loss, aux = jax.jit(lambda q, step: f1(q, x, y, rng, step))(p, 500)
  assert float(aux["log"]["flops_loss"]) == 0.0 and np.all(np.asarray(aux["flops_ratio"]) == 1)
  assert float(loss) == pytest.approx(float(aux["log"]["diffusion_loss"]), rel=1e-6)
  # lambda = 0.5 after the warm-up: the FLOPs loss pushes every router bias down
  run = make(ddy.LossConfig(target_ratio=0.5, target_warmup_steps=100, complete_model_steps=10))
  (loss, aux), g = run(p, 500)
  assert float(aux["log"]["flops_loss"]) == pytest.approx(2.0 * 0.25, rel=1e-6)
  for i in range(2):
    for r in ("attn_rate", "mlp_rate"):
      assert np.all(np.asarray(g[f"blocks_{i}"][r]["router"]["bias"]) > 0)
    assert float(g[f"blocks_{i}"]["token_selection"]["mlp_head_2"]["bias"][0]) > 0
  # the complete-model phase (steps < 10) adds the full-width loss on the same x_t, t, labels
  (with_c, a1), _ = run(p, 3)
  (without, a2), _ = run(p, 10)
  assert float(a2["log"]["complete_loss"]) == 0.0
  comp = float(a1["log"]["complete_loss"])
  assert comp > 0 and float(with_c) - float(without) == pytest.approx(comp, rel=1e-5)
  assert comp == pytest.approx(float(a1["log"]["diffusion_loss"]), rel=1e-5)  # all gates on


CONFIG = dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
              hidden_size=32, depth=1, num_heads=4, mediator_num=4, learn_sigma=False)


def dydit_config(init_from, steps=3):
  c = train.default_config()
  c.model.update(dict(CONFIG, arch="dydit"))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.num_train_steps = steps
  c.log_every = 1
  c.checkpoint_every = steps
  c.sample.every = 0
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  c.mesh_shape = (1, 8)  # FSDP over all 8 devices (replicas make Orbax slice every shard)
  c.init_from = str(init_from)
  c.dydit.update(dict(target_ratio=0.6, target_hold_steps=0, target_warmup_steps=2, reorder=True))
  return c


def test_finetune_from_converted_sit_checkpoint(tmp_path, caplog):
  """train_and_evaluate fine-tunes a converted SiT checkpoint (with mediators) as a DyDiT: it loads
  the source, reorders units, keeps fresh routers, logs the FLOPs terms, and saves a DyDiT whose
  routers the FLOPs loss pushed down. Depth 1 (everything checked is per run or in block 0); the
  source's weights are noise around zero (no init program to compile for them)."""
  base = models.build_model(None, **{k: v for k, v in CONFIG.items() if k != "name"})
  bp = noisy(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                    models.abstract_params(base)), 0.05)
  src = convert.save_converted(tmp_path / "base", base, bp)
  wd = tmp_path / "run"
  with caplog.at_level(logging.INFO):
    r = train.train_and_evaluate(dydit_config(src), str(wd))
  assert r["step"] == 3
  text = caplog.text
  assert "dydit.reorder" in text and "flops_ratio" in text and "flops_target 0.6000" in text
  assert "tensors missing from the source keep their fresh init" in text  # the routers
  model, params = checkpoint.load_params_for_sampling(str(wd), ema=False)
  assert isinstance(model, dydit.DyDiT) and model.mediator_num == 4
  assert params["blocks_0"]["attn_rate"]["router"]["kernel"].shape == (32, 3)
  # the routers started at +15 and were pushed down by the FLOPs loss (target 0.6 < ratio 1)
  b = np.asarray(params["blocks_0"]["attn_rate"]["router"]["bias"])
  assert np.all(b < 15.0) and np.all(b > 14.0)


def test_dydit_config_errors(tmp_path):
  c = dydit_config(tmp_path / "nothing")
  c.dydit.target_ratio = 1.5
  with pytest.raises(train.ConfigError, match="target_ratio"):
    train.make_loss(c, train.get_model(c), tr.create_transport())
  c = dydit_config(tmp_path / "nothing")
  c.dydit.router_format = "nus"
  with pytest.raises(train.ConfigError, match="router_format"):
    train.get_model(c)
  c = dydit_config(tmp_path / "nothing")
  c.amm.enabled = True  # DyDiT blocks have no AMM path: refused, not silently ignored
  with pytest.raises(train.ConfigError, match="amm.enabled"):
    train.get_model(c)



@pytest.mark.parametrize("objective", ["transport", "gaussian"])
def test_trainer_loss_follows_config_objective(tmp_path, objective):
  """config.objective (the one switch, train.get_objective) picks DyDiT's fine-tuning loss on that
  objective: the trainer's loss equals the matching edit_jax.diffusion.dydit loss of the same draws."""
  c = dydit_config(tmp_path / "nothing")
  c.objective = objective
  # tiny()'s DyDiT (learned sigma serves both objectives): its parameters are reused
  c.model.update(depth=2, mediator_num=0, learn_sigma=True)
  p = tiny()[3]
  model = train.get_model(c)
  assert jax.tree_util.tree_map(np.shape, models.abstract_params(model)) == \
      jax.tree_util.tree_map(np.shape, p)
  obj = train.get_objective(c, model)
  assert isinstance(obj, gaussian.GaussianDiffusion if objective == "gaussian" else tr.Transport)
  loss_fn, takes_step, keys = train.make_loss(c, model, obj)
  assert takes_step and "flops_ratio" in keys
  make = ddy.make_gaussian_loss_fn if objective == "gaussian" else ddy.make_transport_loss_fn
  want_fn = make(model, obj, train.dydit_loss_config(c))
  x, y, rng = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.arange(4) % 4, \
      jax.random.key(2)
  # two programs of the same computation (XLA:CPU is deterministic): bit-equal when the trainer
  # picked the same loss
  got, aux = jax.jit(loss_fn, static_argnums=4)(p, x, y, rng, 5)
  want, _ = jax.jit(want_fn, static_argnums=4)(p, x, y, rng, 5)
  assert float(got) == float(want) and "flops_loss" in aux["log"]


def test_router_lr_multiplier_scales_only_router_updates():
  _, _, _, p = tiny()
  c = train.default_config()
  c.model.arch = "dydit"
  c.optim.learning_rate = 1e-3
  grads = jax.tree_util.tree_map(jnp.ones_like, p)
  upd = {}
  for mult in (1.0, 7.0):
    c.dydit.router_lr_mult = mult
    tx, _ = train.make_optimizer(c)
    upd[mult] = jax.jit(lambda g, q, tx=tx: tx.update(g, tx.init(q), q)[0])(grads, p)
  r1, r7 = upd[1.0]["blocks_0"]["attn_rate"]["router"]["bias"], \
      upd[7.0]["blocks_0"]["attn_rate"]["router"]["bias"]
  np.testing.assert_allclose(np.asarray(r7), 7 * np.asarray(r1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(upd[7.0]["blocks_1"]["token_selection"]["mlp_head_0"]
                                        ["kernel"]),
                             7 * np.asarray(upd[1.0]["blocks_1"]["token_selection"]["mlp_head_0"]
                                            ["kernel"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(upd[7.0]["blocks_0"]["mlp"]["fc1"]["kernel"]),
                                np.asarray(upd[1.0]["blocks_0"]["mlp"]["fc1"]["kernel"]))



def test_blocks_materialize_the_residual_cotangent(monkeypatch):
  """Every DyDiT block passes its input through sit.materialize_cotangent, as SiT blocks do
  (issue 15: without it XLA duplicates the backward's residual-stream chain into every block)."""
  from edit_jax.models import sit  # noqa: PLC0415
  calls = []
  monkeypatch.setattr(sit, "materialize_cotangent", lambda h: calls.append(h.shape) or h)
  m = models.build_model(None, arch="dydit", input_size=8, patch_size=2, in_channels=1,
                         hidden_size=32, depth=3, num_heads=4, num_classes=4)
  p = jax.eval_shape(lambda: models.init_params(m, jax.random.key(0)))
  calls.clear()
  jax.eval_shape(lambda q: m.apply({"params": q}, jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 0.5),
                                   jnp.zeros((2,), jnp.int32)), p)
  assert calls == [(2, 16, 32)] * 3
