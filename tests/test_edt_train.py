"""EDT through the trainer: config dispatch, masked training (L_full + L_masked, same t, fresh
noise, one compilation, sharded), Adan, presets, and the sample CLI with AMM options."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edit_jax import convert, models, optim, sample, sharding, train
from edit_jax.diffusion import masked, transport
from edit_jax.models import edt
from random_params import random_params as _random  # tests/random_params.py

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**over):
  c = train.default_config()
  c.model.update(dict(arch="edt", name="", input_size=8, in_channels=1, num_classes=4,
                      patch_size=2, stage_depths=(1, 1, 1), stage_dims=(16, 24, 16),
                      stage_heads=(2, 2, 2), learn_sigma=False))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.masked_training.enabled = True
  c.amm.update(dict(enabled=True, layers="1,2"))
  c.global_batch_size = 8
  c.num_train_steps = 3
  c.log_every = 1
  c.checkpoint_every = 3
  c.sample.every = 0
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  c.mesh_shape = (4, 2)
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _params(model, seed=0):
  """Every leaf N(0, 0.1) (nonzero adaLN gates)."""
  return _random(model, seed, 0.1)


def load_config(path, preset):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(preset)


# ----------------------------------------------------------------------------- config -> model
def test_get_model_dispatch_and_fields():
  m = train.get_model(tiny_config())
  assert isinstance(m, edt.EDT) and m.amm_blocks == (1, 2) and m.stage_dims == (16, 24, 16)
  assert m.mask_ratio_pairs == ((0.4, 0.5),) and not m.uses_mid_mask
  m = train.get_model(tiny_config(**{"amm.enabled": False, "masked_training.mid_mask": "on",
                                     "masked_training.mid_mask_block": 0,
                                     "masked_training.ratios": ((0.3, 0.35),)}))
  assert m.amm_blocks == () and m.uses_mid_mask and m.mask_ratio_pairs == ((0.3, 0.35),)
  s = load_config("edt.py", "XL2")
  xl = train.get_model(s)
  assert xl.stage_depths == (6, 4, 4, 7, 7) and xl.amm_blocks == (23, 25) and xl.uses_mid_mask
  assert s.optim.name == "adan" and s.optim.learning_rate == 5e-4
  assert s.optim.learning_rate * s.optim.end_lr_factor == pytest.approx(5e-5)
  for preset, amm_blocks, masked_on, objective in [
      ("S2", (7, 10), True, "gaussian"), ("B2-nomask", (7, 10), False, "gaussian"),
      ("S2-noamm", (), True, "gaussian"), ("S2-transport", (7, 10), True, "transport")]:
    c = load_config("edt.py", preset)
    assert train.get_model(c).amm_blocks == amm_blocks and c.masked_training.enabled == masked_on
    assert c.objective == objective and c.model.learn_sigma
    assert c.sample.method == ("ddpm" if objective == "gaussian" else "heun2")
  with pytest.raises(ValueError, match="unknown preset"):
    load_config("edt.py", "M2")
  for preset in ("plain", "masked", "masked-adan"):
    c = load_config("edt_digits.py", preset)
    assert train.get_model(c).amm_blocks == (7, 10)
    assert c.masked_training.enabled == preset.startswith("masked")


@pytest.mark.parametrize("over,msg", [
    ({"model.mediator_num": 16}, "mediator_num is a SiT option"),
    ({"model.arch": "sit", "model.name": "SiT-S/2", "model.stage_depths": (),
      "model.stage_dims": (), "model.stage_heads": ()}, "masked_training.enabled needs"),
    ({"model.arch": "sit", "model.name": "SiT-S/2", "masked_training.enabled": False},
     "stage_depths is an EDT field"),
    ({"model.name": "SiT-S/2"}, "with model.arch='edt'"),
    ({"model.arch": "dit"}, "expected 'sit', 'edt' or 'dydit'"),
    ({"masked_training.mid_mask": "maybe"}, "mid_mask"),
    ({"model.stage_dims": (16, 24, 20)}, "width of encoder stage"),
    ({"masked_training.ratios": ((0.4, 0.5), (0.1, 0.2))}, "one \\(lo, hi\\) pair"),
    ({"amm.layers": "9"}, "outside"),
    ({"optim.name": "sgd"}, "adamw' or 'adan"),
    ({"optim.name": "adan", "optim.b3": 1.5}, "b3=1.5"),
])
def test_config_errors(over, msg):
  c = tiny_config(**over)
  with pytest.raises(train.ConfigError, match=msg):
    train.get_model(c)
    train.make_optimizer(c)


# ----------------------------------------------------------------------------- masked loss
def test_masked_loss_is_full_plus_masked_with_same_t():
  c = tiny_config()
  model = train.get_model(c)
  tr = train.get_transport(c)
  params = _params(model)
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  calls = []

  def spy(apply_fn):
    inner = transport.make_loss_fn(model, tr, apply_fn=apply_fn)

    def fn(p, x1, yy, rng, t=None):
      loss, aux = inner(p, x1, yy, rng, t=t)
      calls.append(dict(t=aux["t"], loss=loss, rng=rng, given_t=t))
      return loss, aux
    return fn

  loss_fn = masked.make_masked_loss_fn(model, spy)
  rng = jax.random.key(7)
  r_full, r_masked, k_mask = jax.random.split(rng, 3)

  def apply_masked(p, xx, t, yy, train_, rngs):
    return model.apply({"params": p}, xx, t, yy, train=train_, masked=True,
                       rngs={**rngs, "mask": k_mask})

  @jax.jit
  def everything(p):
    total, aux = loss_fn(p, x, y, rng)
    full, msk = calls
    # the full term is exactly the plain objective's loss at that rng
    plain, _ = transport.make_loss_fn(model, tr)(p, x, y, r_full)
    # the masked term: the objective's loss of the masked forward (same t, the masked key's noise)
    want, _ = transport.make_loss_fn(model, tr, apply_fn=apply_masked)(p, x, y, r_masked,
                                                                         t=full["t"])
    # ... which differs from an unmasked forward with the same noise
    unmasked, _ = transport.make_loss_fn(model, tr)(p, x, y, r_masked, t=full["t"])
    return dict(total=total, loss_full=aux["loss_full"], t_full=full["t"], t_msk=msk["t"],
                l_full=full["loss"], l_msk=msk["loss"], plain=plain, want=want,
                unmasked=unmasked, given=msk["given_t"], k_full=jax.random.key_data(full["rng"]),
                k_msk=jax.random.key_data(msk["rng"])), full["given_t"] is None

  r = jax.tree.map(np.asarray, everything(params)[0])
  np.testing.assert_array_equal(r["t_full"], r["t_msk"])                 # same t
  np.testing.assert_array_equal(r["given"], r["t_full"])                 # passed to the 2nd pass
  assert not np.array_equal(r["k_full"], r["k_msk"])                     # fresh noise key
  np.testing.assert_allclose(r["total"], r["l_full"] + r["l_msk"], rtol=1e-6)
  assert float(r["loss_full"]) == pytest.approx(float(r["l_full"]))
  assert float(r["plain"]) == pytest.approx(float(r["l_full"]), rel=1e-6)
  assert float(r["want"]) == pytest.approx(float(r["l_msk"]), rel=1e-6)
  assert abs(float(r["unmasked"]) - float(r["l_msk"])) > 1e-6
  with pytest.raises(ValueError, match="masked forward"):
    masked.make_masked_loss_fn(models.build_model("SiT-S/2", input_size=8), spy)


def test_trainer_masked_adan_sharded_compiles_once(tmp_path, monkeypatch):
  """The whole trainer (what `python -m edit_jax.main` runs) with EDT, masked training and Adan
  on a 4 x 2 data/FSDP mesh: the step compiles once, parameters and optimizer state are sharded,
  the run finishes, and the sampler restores the EDT from the workdir with its AMM blocks."""
  steps = []
  real = train.make_train_step

  def spy(*a, **kw):
    steps.append(real(*a, **kw))
    return steps[-1]

  monkeypatch.setattr(train, "make_train_step", spy)
  losses = []
  real_masked = masked.make_masked_loss_fn
  monkeypatch.setattr(masked, "make_masked_loss_fn",
                      lambda *a, **kw: losses.append(real_masked(*a, **kw)) or losses[-1])
  c = tiny_config(**{"optim.name": "adan", "optim.b1": 0.98, "optim.b2": 0.92,
                     "objective": "gaussian", "model.learn_sigma": True})  # as published
  r = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert r["step"] == 3 and r["stopped"] == "done" and np.isfinite(r["loss"])
  assert len(losses) == 1  # the trainer trains on L_full + L_masked
  (step,) = steps
  assert step._cache_size() == 1
  state = r["state"]
  for leaf in (state.params["blocks_0"]["attn"]["qkv"]["kernel"],        # FSDP over "embed"
               state.params["down_blocks_0"]["reduction"]["kernel"],
               state.opt_state[0].m["blocks_1"]["mlp"]["fc1"]["kernel"]):
    assert not leaf.sharding.is_fully_replicated, leaf.sharding
  cfg = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert cfg["model"]["arch"] == "edt" and cfg["masked_training"]["enabled"]
  assert cfg["objective"] == "gaussian"
  res = sample.sample_images(str(tmp_path / "wd"), str(tmp_path / "s"), num_samples=8,
                             batch_size=8, num_steps=3, progress=False)  # DDPM: from the workdir
  s = json.loads((tmp_path / "s" / "summary.json").read_text())
  assert s["model_arch"] == "edt" and s["amm_blocks"] == [1, 2]
  assert s["objective"] == "gaussian" and s["sampler"]["method"] == "ddpm"
  assert res["images"].shape == (8, 8, 8, 3)


# ----------------------------------------------------------------------------- sample CLI + AMM
@pytest.fixture(scope="module")
def edt_ckpt(tmp_path_factory):
  m = models.build_model("", arch="edt", input_size=8, patch_size=2, in_channels=3,
                         stage_depths=(1, 1, 1), stage_dims=(16, 24, 16), stage_heads=(2, 2, 2),
                         num_classes=10)
  params = _random(m, 0, 0.2, as_jax=True)
  d = tmp_path_factory.mktemp("edt") / "c"
  convert.save_converted(d, m, params)
  return str(d)


def test_sample_cli_amm_options(edt_ckpt, tmp_path):
  base = ["--ckpt", edt_ckpt, "--num_samples", "8", "--batch_size", "8", "--mode", "ode",
          "--method", "euler", "--num_steps", "4", "--labels", "1,2", "--no_progress"]
  runs = {}
  for name, extra in [("keep", []), ("on", ["--amm", "1,2"]),
                      ("log", ["--amm", "1,2", "--amm_mode", "log_bias"])]:
    runs[name] = sample.main(base + ["--out", str(tmp_path / name)] + extra)
  assert runs["keep"]["summary"]["amm_blocks"] == []          # custom layout: no official list
  assert runs["on"]["summary"]["amm_blocks"] == [1, 2]
  assert runs["log"]["summary"]["amm_mode"] == "log_bias"
  a, b, lb = (runs[k]["images"].astype(int) for k in ("keep", "on", "log"))
  assert np.abs(a - b).max() > 2                                # AMM changes the samples
  assert np.abs(b - lb).max() <= 1                              # the two forms agree
  with pytest.raises(ValueError, match="official stage layouts"):
    sample.main(base + ["--out", str(tmp_path / "bad"), "--amm", "official"])
  assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- Adan
def _adan_reference(grads, lr, b1, b2, b3, eps, wd, theta):
  """Transcription of the official sail-sg Adan step loop (torch convention) in float64."""
  m = v = n = np.zeros_like(theta)
  prev = None
  for k, g in enumerate(grads, start=1):
    d = np.zeros_like(g) if prev is None else g - prev
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * d
    upd = g + b2 * d
    n = b3 * n + (1 - b3) * upd * upd
    denom = np.sqrt(n) / np.sqrt(1 - b3 ** k) + eps
    u = (m / (1 - b1 ** k) + b2 * v / (1 - b2 ** k)) / denom
    theta = (theta - lr * u) / (1 + lr * wd)
    prev = g
  return theta


def test_adan_matches_official_update():
  rng = np.random.default_rng(0)
  theta0 = rng.normal(size=(5, 3))
  grads = [rng.normal(size=(5, 3)) for _ in range(4)]
  for wd in (0.0, 0.02):
    tx = optim.adan(1e-2, weight_decay=wd)
    p = jnp.asarray(theta0, jnp.float32)
    st = tx.init(p)
    for g in grads:
      u, st = tx.update(jnp.asarray(g, jnp.float32), st, p)
      p = optax.apply_updates(p, u)
    want = _adan_reference(grads, 1e-2, 0.98, 0.92, 0.99, 1e-8, wd, theta0)
    np.testing.assert_allclose(np.asarray(p), want, rtol=2e-5, atol=1e-6)


def test_adan_vs_optax():
  """optax.adan agrees where its (1 - b2) coefficient equals b2 (b2 = 0.5) and, in optax 0.2.8,
  not at EDT's b2 = 0.92 (google-deepmind/optax#1715). If this last check fails, optax fixed it:
  edit_jax.optim can then defer to optax.adan."""
  rng = np.random.default_rng(1)
  theta0 = jnp.asarray(rng.normal(size=(7,)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(7,)), jnp.float32) for _ in range(4)]

  def run(tx):
    p, st = theta0, tx.init(theta0)
    for g in grads:
      u, st = tx.update(g, st, p)
      p = optax.apply_updates(p, u)
    return np.asarray(p)

  np.testing.assert_allclose(run(optim.adan(1e-2, b2=0.5)),
                             run(optax.adan(1e-2, b2=0.5, eps_root=0.0)), rtol=1e-5, atol=1e-7)
  assert np.abs(run(optim.adan(1e-2)) - run(optax.adan(1e-2, eps_root=0.0))).max() > 1e-4


# ----------------------------------------------------------------------------- Gaussian objective
def test_edt_with_gaussian_objective():
  """EDT as published: DDPM epsilon + learned sigma. The masked loss reuses the chain index t
  (integers), both passes use the variance channels (vb term), and DDPM sampling runs."""
  from edit_jax.diffusion import gaussian
  c = tiny_config(**{"model.learn_sigma": True})
  model = train.get_model(c)
  diffusion = gaussian.create_diffusion("", learn_sigma=True)
  params = _params(model)
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  ts = []

  def make(apply_fn):
    inner = gaussian.make_loss_fn(model, diffusion, apply_fn=apply_fn)

    def fn(p, x0, yy, rng, t=None):
      loss, aux = inner(p, x0, yy, rng, t=t)
      ts.append(aux["t"])
      return loss, aux
    return fn

  loss_fn = masked.make_masked_loss_fn(model, make, full_output=True)

  @jax.jit
  def run(p):
    total, aux = loss_fn(p, x, y, jax.random.key(3))
    return total, aux, ts[0], ts[1]

  total, aux, t0, t1 = run(params)
  np.testing.assert_array_equal(np.asarray(t0), np.asarray(t1))
  assert np.asarray(t0).dtype == np.int32 and np.isfinite(float(total))
  assert float(total) == pytest.approx(float(aux["loss_full"] + aux["loss_masked"]), rel=1e-6)
  assert "vb" in aux and np.all(np.isfinite(np.asarray(aux["vb"])))
  with pytest.raises(ValueError, match="model output"):  # without full_output: 1 channel, not 2
    jax.jit(lambda p: masked.make_masked_loss_fn(model, make)(p, x, y, jax.random.key(3)))(params)
  fn = gaussian.make_sample_fn(model, diffusion, gaussian.GaussianSamplerConfig("ddpm", 4),
                               cfg_scale=2.0)
  out = jax.jit(fn)(params, x, y, jax.random.key(4)).x
  assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("objective", ["transport", "gaussian"])
def test_trainer_loss_follows_the_objective(objective):
  """train.make_loss_fn (what the trainer runs): config.objective picks the loss, and masked
  training wraps that objective's loss (Gaussian: every output channel from both passes)."""
  from edit_jax.diffusion import gaussian
  lib = gaussian if objective == "gaussian" else transport
  c = tiny_config(**{"objective": objective, "model.learn_sigma": objective == "gaussian"})
  model = train.get_model(c)
  obj = train.get_objective(c, model)
  assert isinstance(obj, gaussian.GaussianDiffusion if objective == "gaussian"
                    else transport.Transport)
  params = _params(model)
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  rng = jax.random.key(5)
  kw = {"full_output": True} if objective == "gaussian" else {}
  by_hand = masked.make_masked_loss_fn(
      model, lambda apply_fn: lib.make_loss_fn(model, obj, apply_fn=apply_fn), **kw)
  c_plain = tiny_config(**{"objective": objective, "model.learn_sigma": objective == "gaussian",
                           "masked_training.enabled": False})

  @jax.jit
  def run(p):
    return (train.make_loss_fn(c, model, obj)(p, x, y, rng), by_hand(p, x, y, rng),
            train.make_loss_fn(c_plain, model, obj)(p, x, y, rng),
            lib.make_loss_fn(model, obj)(p, x, y, rng))

  (got, aux), (want, _), (plain, plain_aux), (plain_want, _) = run(params)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert "loss_masked" in aux and "loss_masked" not in plain_aux
  assert float(plain) == pytest.approx(float(plain_want), rel=1e-6)
  if objective == "gaussian":
    assert "vb" in aux and np.asarray(aux["t"]).dtype == np.int32
