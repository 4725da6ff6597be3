"""ODE/SDE samplers and guidance: golden parity with the official SiT transport, closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import convert

from edit_jax.diffusion import guidance, samplers
from edit_jax.diffusion import transport as T


@pytest.fixture(scope="module")
def tiny(golden_dir):
  model, params = convert.load_torch_checkpoint(str(golden_dir / "vanilla_tiny_state_dict.npz"),
                                                num_heads=4)
  g = dict(np.load(golden_dir / "vanilla_tiny_ode.npz"))
  io = dict(np.load(golden_dir / "vanilla_tiny_io.npz"))
  return model, params, g, io


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


# Achieved on CPU float32 (|x| ~ 4): 4.8e-7 (euler, heun2), 9.5e-7 (cfg), 1.3e-6 (dopri5, whose
# adaptive steps matched torchdiffeq's here).
@pytest.mark.parametrize("key,cfg,cfg_scale,tol,nfe", [
    ("Linear_velocity_euler_11", samplers.ODEConfig("euler", 11), 1.0, 5e-6, 10),
    ("Linear_velocity_heun2_6", samplers.ODEConfig("heun2", 6), 1.0, 5e-6, 10),
    ("Linear_velocity_dopri5_5", samplers.ODEConfig("dopri5", 5), 1.0, 1e-5, None),
    ("Linear_velocity_euler_11_cfg4", samplers.ODEConfig("euler", 11), 4.0, 5e-6, 10),
])
def test_golden_ode_parity(tiny, key, cfg, cfg_scale, tol, nfe):
  model, params, g, _ = tiny
  fn = jax.jit(samplers.make_sample_fn(model, T.create_transport(), cfg, cfg_scale=cfg_scale))
  out = fn(params, nhwc(g["z"]), jnp.asarray(g["y"], jnp.int32))
  np.testing.assert_allclose(np.asarray(out.x), np.asarray(nhwc(g[key])), atol=tol, rtol=0)
  if nfe is not None:
    assert int(out.nfe) == nfe
  else:  # dopri5: 2 (initial step) + 1 + 6 per attempted step
    assert int(out.nfe) > 3 and (int(out.nfe) - 3) % 6 == 0


def test_guidance_matches_official_forward_with_cfg(tiny):
  model, params, _, io = tiny
  b = io["cfg_x"].shape[0] // 2
  x, t, y = nhwc(io["cfg_x"])[:b], jnp.asarray(io["cfg_t"][:b]), jnp.asarray(io["cfg_y"][:b])
  raw = jax.jit(samplers.flax_model_fn(model, {"params": params}))

  def guided(**kw):
    return jax.jit(guidance.guided_model_fn(raw, 4.0, 10, **kw))

  np.testing.assert_allclose(guided()(x, t, y), nhwc(io["cfg_out"])[:b], atol=1e-5)
  assert float(io["cfg_scale"]) == 4.0
  # all channels: guided everywhere
  cond, unc = raw(x, t, y), raw(x, t, jnp.full_like(y, 10))
  np.testing.assert_allclose(guided(guide_channels=None)(x, t, y), unc + 4.0 * (cond - unc),
                             atol=1e-5)
  # interval: guidance only for t in [lo, hi]; the rest gets the conditional output
  tt = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  iv = np.asarray(guided(interval=(0.4, 0.6))(x, tt, y))
  full = np.asarray(guided()(x, tt, y))
  plain = np.asarray(raw(x, tt, y))
  np.testing.assert_allclose(iv[1], full[1], atol=1e-5)
  np.testing.assert_allclose(iv[[0, 2]], plain[[0, 2]], atol=1e-5)
  assert np.abs(full[0] - plain[0]).max() > 1e-3  # guidance does change the output
  np.testing.assert_allclose(guided(interval="0.95,1.0")(x, tt, y), plain, atol=1e-6)
  np.testing.assert_array_equal(guidance.guidance_forwards([0.2, 0.5], 4.0, (0.4, 0.6)), [1, 2])
  np.testing.assert_array_equal(guidance.guidance_forwards([0.2, 0.5], 1.0), [1, 1])


# ----------------------------------------------------------------------- Gaussian closed forms
MU, SD = 1.5, 0.5


def gaussian_model(tr: T.Transport):
  """Exact network output for data N(MU, SD^2) under `tr` (x_t = a x1 + s x0)."""
  p = tr.path

  def fn(x, t, y):
    tt = T._expand(t, x)
    a, da = p.alpha(tt)
    s, ds = p.sigma(tt)
    var = a ** 2 * SD ** 2 + s ** 2
    c = x - a * MU
    if tr.prediction == "velocity":
      return da * MU + (a * da * SD ** 2 + s * ds) / var * c
    if tr.prediction == "score":
      return -c / var
    return s / var * c  # E[x0 | x_t]
  return fn


def flow_map(tr, x, t0, t1):
  """Exact probability-flow ODE solution from t0 to t1 for Gaussian data."""
  p = tr.path
  a0, a1 = p.alpha(jnp.float32(t0))[0], p.alpha(jnp.float32(t1))[0]
  s0, s1 = p.sigma(jnp.float32(t0))[0], p.sigma(jnp.float32(t1))[0]
  r0, r1 = jnp.sqrt(a0 ** 2 * SD ** 2 + s0 ** 2), jnp.sqrt(a1 ** 2 * SD ** 2 + s1 ** 2)
  return a1 * MU + r1 * (x - a0 * MU) / r0


@pytest.mark.parametrize("path", T.PATHS)
@pytest.mark.parametrize("prediction", T.PREDICTIONS)
def test_ode_matches_exact_flow(path, prediction):
  tr = T.create_transport(path, prediction)
  x0 = jax.random.normal(jax.random.key(0), (8, 2, 2, 1))
  t0, t1 = tr.check_interval(eval=True)
  want = flow_map(tr, x0, t0, t1)
  got = jax.jit(lambda x: samplers.sample_ode(gaussian_model(tr), tr, x, jnp.zeros(8, jnp.int32),
                                               samplers.ODEConfig("heun2", 60)).x)(x0)
  np.testing.assert_allclose(got, want, atol=3e-3)


def test_dopri5_exact_flow_clip_and_interpolate():
  tr = T.create_transport("GVP")
  x0 = jax.random.normal(jax.random.key(1), (8, 2, 2, 1))
  want = flow_map(tr, x0, 0.0, 1.0)
  for end in ("interpolate", "clip"):
    cfg = samplers.ODEConfig("dopri5", atol=1e-6, rtol=1e-5, end=end)
    got = samplers.sample_ode(gaussian_model(tr), tr, x0, jnp.zeros(8, jnp.int32), cfg)
    np.testing.assert_allclose(got.x, want, atol=1e-3)


@pytest.mark.parametrize("method,form", [("Euler", f) for f in T.DIFFUSION_FORMS]
                         + [("Heun", "sigma"), ("Heun", "SBDM")])
def test_sde_reaches_data_distribution(form, method):
  """Any diffusion form keeps the marginals: samples follow N(MU, SD^2)."""
  tr = T.create_transport("Linear", sample_eps=1e-3)
  n = 4096
  x0 = jax.random.normal(jax.random.key(2), (n, 1, 1, 1))
  # The "Euler" last step is the probability-flow step; "Mean" adds w s h without noise, which
  # shrinks the variance by ~ w h / Var(x_t1) (17% for the constant form; 0.7% for "sigma").
  cfg = samplers.SDEConfig(method, num_steps=100, diffusion_form=form, last_step="Euler")
  got = jax.jit(lambda x, k: samplers.sample_sde(gaussian_model(tr), tr, x, jnp.zeros(n, jnp.int32),
                                                  k, cfg).x)(x0, jax.random.key(3))
  got = np.asarray(got).ravel()
  assert abs(got.mean() - MU) < 0.04, (got.mean(), got.std())
  assert abs(got.std() - SD) < 0.04, (got.mean(), got.std())


def test_sde_last_steps_closed_form():
  tr = T.create_transport("Linear")
  model = gaussian_model(tr)
  x = jax.random.normal(jax.random.key(4), (4, 2, 2, 1))
  y = jnp.zeros(4, jnp.int32)
  t1, h = 0.96, 0.04
  tb = jnp.full((4,), t1)
  v = model(x, tb, y)
  s = (t1 * v - x) / (1 - t1)
  a, sg = t1, 1 - t1
  w_sigma = 1 - t1
  for last, want in [
      ("Mean", x + (v + w_sigma * s) * h),
      ("Euler", x + v * h),
      ("Tweedie", MU + a * SD ** 2 / (a ** 2 * SD ** 2 + sg ** 2) * (x - a * MU)),  # E[x1 | x]
      (None, x)]:
    fn = samplers.make_last_step(tr, samplers.SDEConfig(last_step=last))
    np.testing.assert_allclose(fn(model, x, y, t1, h), want, rtol=1e-4, atol=1e-4,
                               err_msg=str(last))
  # a regular Euler-Maruyama step: x + (v + w s) dt + sqrt(2 w dt) eps
  step = samplers.make_step(tr, samplers.SDEConfig())
  eps = jax.random.normal(jax.random.key(5), x.shape)
  t, dt = 0.3, 0.01
  v = model(x, jnp.full((4,), t), y)
  s = (t * v - x) / (1 - t)
  want = x + (v + (1 - t) * s) * dt + jnp.sqrt(2 * (1 - t) * dt) * eps
  np.testing.assert_allclose(step(model, x, y, t, dt, eps), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,last,expect", [("Euler", "Mean", 10), ("Heun", "Mean", 19),
                                                ("Euler", None, 9)])
def test_sde_one_evaluation_per_step(method, last, expect):
  tr = T.create_transport()
  calls = []
  base = gaussian_model(tr)

  def counted(x, t, y):
    jax.debug.callback(lambda: calls.append(1))
    return base(x, t, y)

  cfg = samplers.SDEConfig(method, num_steps=10, last_step=last)
  out = jax.jit(lambda x, k: samplers.sample_sde(counted, tr, x, jnp.zeros(2, jnp.int32), k, cfg))(
      jnp.ones((2, 1, 1, 1)), jax.random.key(0))
  jax.block_until_ready(out.x)
  assert len(calls) == expect == int(out.nfe)
  # the fixed-step loop is one lax.scan
  jaxpr = str(jax.make_jaxpr(lambda x, k: samplers.sample_sde(base, tr, x, jnp.zeros(
      2, jnp.int32), k, cfg))(jnp.ones((2, 1, 1, 1)), jax.random.key(0)))
  assert jaxpr.count("scan[") == 1


def test_sde_noise_is_per_sample():
  tr = T.create_transport()
  model = gaussian_model(tr)
  x0 = jax.random.normal(jax.random.key(6), (3, 2, 2, 1))
  keys = jax.random.split(jax.random.key(7), 3)
  cfg = samplers.SDEConfig(num_steps=20)
  y = jnp.zeros(3, jnp.int32)
  run = jax.jit(lambda x, yy, k: samplers.sample_sde(model, tr, x, yy, k, cfg).x)
  batch = run(x0, y, keys)
  alone = run(x0[1:2], y[1:2], keys[1:2])
  np.testing.assert_allclose(batch[1:2], alone, atol=1e-6)
  # a single key is split into per-sample keys
  np.testing.assert_allclose(run(x0, y, jax.random.key(7)), batch, atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: samplers.ODEConfig("rk45").validate(), "unknown ODE method 'rk45'"),
    (lambda: samplers.SDEConfig("Milstein").validate(), "unknown SDE method 'Milstein'"),
    (lambda: samplers.SDEConfig(last_step="Median").validate(), "unknown last step 'Median'"),
    (lambda: samplers.SDEConfig(diffusion_form="cosine").validate(),
     "unknown diffusion form 'cosine'"),
    (lambda: samplers.SDEConfig(num_steps=1).validate(), "num_steps=1"),
    (lambda: samplers.ODEConfig("euler", 1).validate(), "num_steps=1"),
    (lambda: samplers.SDEConfig(last_step_size=1.5).validate(), "last_step_size=1.5"),
    (lambda: samplers.program(T.create_transport(), samplers.SDEConfig(diffusion_form="SBDM")),
     "sample_eps > 0"),
    (lambda: guidance.check_guidance(-1.0, 3, None), "cfg_scale=-1.0"),
    (lambda: guidance.check_guidance(4.0, 0, None), "guide_channels=0"),
    (lambda: guidance.check_guidance(4.0, 3, (0.8, 0.2)), "t_lo <= t_hi"),
    (lambda: guidance.parse_interval("0.5"), "expected 't_lo,t_hi'"),
    (lambda: samplers.sample_sde(lambda x, t, y: x, T.create_transport(), jnp.ones((1, 1, 1, 1)),
                                 jnp.zeros(1, jnp.int32), None), "needs rng"),
    (lambda: samplers.per_sample_keys(jax.random.split(jax.random.key(0), 3), 4),
     "one key or 4 per-sample keys"),
])
def test_bad_inputs(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_program_grids():
  tr = T.create_transport()
  p = samplers.program(tr, samplers.SDEConfig())  # official CLI defaults
  assert p.num_steps == 249 and p.nfe == 250
  np.testing.assert_allclose(p.dt, 0.96 / 249, rtol=1e-5)
  assert p.last_t == pytest.approx(0.96) and p.last_h == pytest.approx(0.04)
  q = samplers.program(tr, samplers.ODEConfig("heun2", 6))
  np.testing.assert_allclose(q.t, [0, 0.2, 0.4, 0.6, 0.8], atol=1e-7)
  assert q.nfe == 10 and len(q.eval_times()) == 10
  none = samplers.program(tr, samplers.SDEConfig(last_step="None", num_steps=5))
  assert none.last_t is None and none.t[-1] == pytest.approx(0.75)
