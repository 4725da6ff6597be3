"""Transport: paths, conversions, intervals, epsilons and the training loss against closed forms."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.diffusion import transport as T

TS = np.array([0.1, 0.35, 0.6, 0.9], np.float32)


def _x(seed=0, shape=(4, 2, 2, 3)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", T.PATHS)
def test_path_closed_forms(name):
  p = T.Path(name)
  t = jnp.asarray(TS)
  a, da = p.alpha(t)
  s, ds = p.sigma(t)
  if name == "Linear":
    ea, eda, es, eds = TS, np.ones(4), 1 - TS, -np.ones(4)
  elif name == "GVP":
    ea, eda = np.sin(np.pi * TS / 2), np.pi / 2 * np.cos(np.pi * TS / 2)
    es, eds = np.cos(np.pi * TS / 2), -np.pi / 2 * np.sin(np.pi * TS / 2)
  else:
    t64 = TS.astype(np.float64)
    log_a = -0.25 * (1 - t64) ** 2 * 19.9 - 0.5 * (1 - t64) * 0.1
    ea = np.exp(log_a)
    eda = ea * (0.5 * (1 - t64) * 19.9 + 0.05)
    es = np.sqrt(1 - ea ** 2)
    eds = -ea * eda / es  # d/dt sqrt(1 - a^2)
  np.testing.assert_allclose(a, ea, rtol=1e-5)
  np.testing.assert_allclose(da, eda, rtol=1e-5)
  np.testing.assert_allclose(s, es, rtol=1e-5)
  np.testing.assert_allclose(ds, eds, rtol=1e-4)
  # alpha_dot / alpha
  np.testing.assert_allclose(p.d_alpha_alpha_ratio(t), eda / ea, rtol=1e-4)


@pytest.mark.parametrize("name", T.PATHS)
def test_drift_and_velocity_score_round_trip(name):
  p = T.Path(name)
  x, v = _x(0), _x(1)
  t = T._expand(jnp.asarray(TS), x)
  mean, var = p.compute_drift(x, t)
  a, da = p.alpha(t)
  s, ds = p.sigma(t)
  if name == "VP":
    beta = 0.1 + (1 - t) * 19.9
    np.testing.assert_allclose(mean, -0.5 * beta * x, rtol=1e-5)
    np.testing.assert_allclose(var + 0 * x, beta / 2 + 0 * x, rtol=1e-5)
  else:
    np.testing.assert_allclose(mean, -(da / a) * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var + 0 * x, (da / a) * s ** 2 - s * ds + 0 * x, rtol=1e-5)
  score = p.score_from_velocity(v, x, t)
  np.testing.assert_allclose(p.velocity_from_score(score, x, t), v, rtol=2e-4, atol=2e-4)
  eps = p.noise_from_velocity(v, x, t)
  # x = alpha x1 + sigma eps and v = alpha_dot x1 + sigma_dot eps must be consistent with eps:
  x1 = (x - s * eps) / a
  np.testing.assert_allclose(da * x1 + ds * eps, v, rtol=2e-4, atol=2e-4)


def test_linear_closed_forms():
  p = T.Path("Linear")
  x, v = _x(0), _x(1)
  t = T._expand(jnp.asarray(TS), x)
  np.testing.assert_allclose(p.compute_drift(x, t)[1] + 0 * x, (1 - t) / t + 0 * x, rtol=1e-5)
  np.testing.assert_allclose(p.score_from_velocity(v, x, t), (t * v - x) / (1 - t), rtol=1e-4,
                             atol=1e-5)
  xt, ut = p.plan(t, x, v)  # x0 = x, x1 = v
  np.testing.assert_allclose(xt, t * v + (1 - t) * x, rtol=1e-6)
  np.testing.assert_allclose(ut, v - x, rtol=1e-6)


def test_diffusion_forms():
  p = T.Path("Linear")
  x = _x(0)
  t = T._expand(jnp.asarray(TS), x)
  tt = TS.reshape(-1, 1, 1, 1)
  want = {
      "constant": 2.0 + 0 * tt,
      "SBDM": 2.0 * (1 - tt) / tt,
      "sigma": 2.0 * (1 - tt),
      "linear": 2.0 * (1 - tt),
      "decreasing": 0.25 * (2.0 * np.cos(np.pi * tt) + 1) ** 2,
      "increasing-decreasing": 2.0 * np.sin(np.pi * tt) ** 2,
  }
  for form, w in want.items():
    np.testing.assert_allclose(np.broadcast_to(p.diffusion(x, t, form, 2.0), tt.shape), w,
                               rtol=1e-5, err_msg=form)
  with pytest.raises(ValueError, match="unknown diffusion form 'inccreasing-decreasing'"):
    p.diffusion(x, t, "inccreasing-decreasing")


def test_create_transport_eps_defaults():
  assert (T.create_transport().train_eps, T.create_transport().sample_eps) == (0.0, 0.0)
  vp = T.create_transport("VP")
  assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
  noise = T.create_transport("GVP", "noise")
  assert (noise.train_eps, noise.sample_eps) == (1e-3, 1e-3)
  # SiT PR #32: sample_eps keeps its default when only train_eps is given
  assert T.create_transport("VP", train_eps=1e-4).sample_eps == 1e-3
  assert T.create_transport("Linear", "score", loss_weight="likelihood").loss_weight == "likelihood"


def test_check_interval():
  lin = T.create_transport()
  assert lin.check_interval(eval=True) == (0.0, 1.0)
  assert lin.check_interval(sde=True, eval=True, diffusion_form="sigma",
                            last_step_size=0.04) == (0.0, 0.96)
  assert lin.check_interval(sde=True, eval=True, diffusion_form="sigma") == (0.0, 1.0)
  vp = T.create_transport("VP")
  assert vp.check_interval(eval=True) == pytest.approx((0.0, 0.999))
  assert vp.check_interval() == pytest.approx((0.0, 1 - 1e-5))
  assert vp.check_interval(sde=True, eval=True, last_step_size=0.04) == pytest.approx((0.0, 0.96))
  noise = T.create_transport("Linear", "noise")
  assert noise.check_interval(eval=True) == pytest.approx((0.001, 0.999))
  sb = T.create_transport("Linear", "velocity", sample_eps=1e-3)
  assert sb.check_interval(sde=True, eval=True, diffusion_form="SBDM",
                           last_step_size=0.04) == pytest.approx((0.001, 0.96))
  assert lin.check_interval(eval=True, reverse=True) == (1.0, 0.0)


@pytest.mark.parametrize("kind,value,match", [
    ("path", "Cosine", "unknown path 'Cosine'"),
    ("prediction", "eps", "unknown prediction 'eps'"),
    ("loss_weight", "snr", "unknown loss weight 'snr'"),
])
def test_bad_names(kind, value, match):
  kwargs = {kind if kind != "path" else "path_type": value}
  with pytest.raises(ValueError, match=match):
    T.create_transport(**kwargs)


def test_sample_t_range():
  t = T.create_transport("Linear", "noise").sample_t(jax.random.key(0), 4096)
  assert float(t.min()) >= 1e-3 and float(t.max()) <= 1 - 1e-3
  t = T.create_transport().sample_t(jax.random.key(0), 4096)
  assert 0 <= float(t.min()) < 0.01 and 0.99 < float(t.max()) <= 1


@pytest.mark.parametrize("prediction,weight", [
    ("velocity", None), ("noise", None), ("noise", "velocity"), ("score", "likelihood"),
    ("score", None)])
def test_per_sample_loss_closed_form(prediction, weight):
  tr = T.create_transport("GVP", prediction, loss_weight=weight)
  x0, x1, out = _x(0), _x(1), _x(2)
  t = jnp.asarray(TS)
  got = tr.per_sample_loss(out, x0, x1, t)
  tt = TS.astype(np.float64).reshape(-1, 1, 1, 1)
  a, da = np.sin(np.pi * tt / 2), np.pi / 2 * np.cos(np.pi * tt / 2)
  s, ds = np.cos(np.pi * tt / 2), -np.pi / 2 * np.sin(np.pi * tt / 2)
  g = (da / a) * s ** 2 - s * ds
  w = {None: 1.0, "velocity": (g / s) ** 2, "likelihood": g / s ** 2}[weight]
  o, z0, z1 = (np.asarray(v, np.float64) for v in (out, x0, x1))
  if prediction == "velocity":
    err = (o - (da * z1 + ds * z0)) ** 2
  elif prediction == "noise":
    err = w * (o - z0) ** 2
  else:
    err = w * (o * s + z0) ** 2
  np.testing.assert_allclose(got, err.reshape(4, -1).mean(1), rtol=1e-4)


class _Affine(nn.Module):
  """Toy 'model': out = c * x + t + y, with label dropout like SiT (rng stream 'label_dropout')."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, t, y, train=False):
    c = self.param("c", nn.initializers.constant(0.5), ())
    if train:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < 0.5
      y = jnp.where(drop, self.num_classes, y)
    return c * x + t[:, None, None, None] + y[:, None, None, None].astype(jnp.float32)


def test_make_loss_fn_matches_manual_rng_split():
  model = _Affine()
  tr = T.create_transport()
  x1 = _x(3, (8, 2, 2, 3))
  y = jnp.arange(8) % 10
  params = {"c": jnp.float32(0.5)}
  loss_fn = jax.jit(T.make_loss_fn(model, tr))
  rng = jax.random.key(7)
  loss, aux = loss_fn(params, x1, y, rng)
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = jax.random.uniform(k_t, (8,))
  x0 = jax.random.normal(k_noise, x1.shape)
  tt = np.asarray(t).reshape(-1, 1, 1, 1)
  xt = tt * x1 + (1 - tt) * x0
  # k_drop is the model's "label_dropout" stream (flax derives the module's draw from it)
  out = model.apply({"params": params}, xt, t, y, train=True, rngs={"label_dropout": k_drop})
  no_drop = 0.5 * xt + tt + np.asarray(y, np.float32).reshape(-1, 1, 1, 1)
  dropped = np.asarray(out != no_drop).reshape(8, -1).all(1)
  per = ((out - (x1 - x0)) ** 2).reshape(8, -1).mean(1)
  np.testing.assert_allclose(aux["t"], t, rtol=1e-6)
  np.testing.assert_allclose(aux["loss_per_sample"], per, rtol=1e-5)
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
  assert 0 < dropped.sum() < 8  # the dropout path was exercised
  # differentiable
  g = jax.grad(lambda p: loss_fn(p, x1, y, rng)[0])(params)
  assert np.isfinite(g["c"]) and g["c"] != 0


def test_make_loss_fn_shape_mismatch():
  class Bad(nn.Module):
    @nn.compact
    def __call__(self, x, t, y, train=False):
      return x[..., :1]

  loss_fn = T.make_loss_fn(Bad(), T.create_transport())
  with pytest.raises(ValueError, match="does not match the input"):
    loss_fn({}, _x(0), jnp.zeros(4, jnp.int32), jax.random.key(0))


def test_ode_drift_and_score_from_outputs():
  x, out = _x(0), _x(1)
  t = jnp.asarray(TS)
  tt = T._expand(t, x)
  for pred in T.PREDICTIONS:
    tr = T.create_transport("Linear", pred)
    drift, score = tr.drift_and_score(out, x, t)
    if pred == "velocity":
      np.testing.assert_allclose(drift, out)
      np.testing.assert_allclose(score, (tt * out - x) / (1 - tt), rtol=1e-4, atol=1e-5)
    else:
      want_score = out if pred == "score" else out / -(1 - tt)
      np.testing.assert_allclose(score, want_score, rtol=1e-5)
      # drift = x / t + (1 - t) / t * score  (= velocity_from_score)
      np.testing.assert_allclose(drift, x / tt + (1 - tt) / tt * want_score, rtol=1e-4,
                                 atol=1e-5)
  assert math.isclose(float(T.Path("GVP").d_alpha_alpha_ratio(jnp.float32(0.5))),
                      math.pi / 2, rel_tol=1e-5)
