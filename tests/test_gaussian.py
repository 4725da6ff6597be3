"""Properties of edit_jax.diffusion.gaussian on configurations the goldens do not cover: other
chain lengths, schedules and respacings, exact-score (oracle) models, gradients, guidance, errors.
The official-code parity lives in test_gaussian_parity.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import models
from edit_jax.diffusion import gaussian as G
from random_params import random_params as _random  # tests/random_params.py

CHAINS = [  # (base steps, schedule, respacing)
    (1000, "linear", "ddim25"),
    (1000, "linear", "250"),
    (500, "squaredcos_cap_v2", "37"),
    (200, "linear", "10,20"),
    (64, "squaredcos_cap_v2", ""),
]


def make(steps, schedule, respacing, **kw):
  return G.create_diffusion(respacing, noise_schedule=schedule, diffusion_steps=steps, **kw)


# --------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("steps,spec", [
    (1000, "25"), (1000, "250"), (4000, "33"), (100, "7,3,5"), (10, "10"), (333, "100,50,1"),
    (1001, "3,4"), (999, "998"), (17, "2"),
])
def test_space_timesteps_sections(steps, spec):
  counts = [int(c) for c in spec.split(",")]
  kept = sorted(G.space_timesteps(steps, spec))
  assert len(kept) == sum(counts) and kept == sorted(set(kept))
  start = 0
  for i, n in enumerate(counts):
    size = steps // len(counts) + (1 if i < steps % len(counts) else 0)
    sec = [k for k in kept if start <= k < start + size]
    assert len(sec) == n, (i, sec)
    assert sec[0] == start  # every section starts at its first step ...
    if n > 1:
      assert sec[-1] == start + size - 1  # ... and ends at its last one
      gaps = np.diff(sec)
      stride = (size - 1) / (n - 1)
      assert gaps.min() >= math.floor(stride) and gaps.max() <= math.ceil(stride)
    start += size
  d = make(steps, "squaredcos_cap_v2", spec)
  np.testing.assert_array_equal(d.timestep_map, kept)


@pytest.mark.parametrize("steps,n", [(1000, 25), (1000, 10), (500, 7), (4000, 3), (100, 100)])
def test_space_timesteps_ddim_integer_stride(steps, n):
  kept = sorted(G.space_timesteps(steps, f"ddim{n}"))
  stride = min(s for s in range(1, steps) if len(range(0, steps, s)) == n)
  assert kept == list(range(0, steps, stride)) and len(kept) == n


def test_empty_respacing_is_the_base_chain():
  base = make(300, "linear", "")
  assert base.num_timesteps == 300 and list(base.timestep_map) == list(range(300))
  np.testing.assert_array_equal(base.respace("").betas, base.betas)
  np.testing.assert_array_equal(base.respace([300]).betas, base.betas)
  again = base.respace("ddim30").respace("")  # respacing always starts from the original chain
  np.testing.assert_array_equal(again.betas, base.betas)


@pytest.mark.parametrize("steps,schedule,respacing", CHAINS)
def test_respaced_schedule_identities(steps, schedule, respacing):
  """Respacing keeps alpha_bar at the kept steps; posterior coefficients are Bayes' rule; the
  clipped posterior log-variance copies t = 1 into t = 0 (where the variance is 0)."""
  base = make(steps, schedule, "")
  d = make(steps, schedule, respacing)
  np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-10)
  assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
  ab, abp = d.alphas_cumprod, d.alphas_cumprod_prev
  alpha = ab / abp
  # q(x_{t-1}|x_0) = N(sqrt(abp) x0, 1 - abp), q(x_t|x_{t-1}) = N(sqrt(alpha) x_{t-1}, 1 - alpha)
  prec = 1 / (1 - abp[1:]) + alpha[1:] / (1 - alpha[1:])
  np.testing.assert_allclose(d.posterior_variance[1:], 1 / prec, rtol=1e-10)
  np.testing.assert_allclose(d.posterior_mean_coef1[1:], np.sqrt(abp[1:]) / (1 - abp[1:]) / prec,
                             rtol=1e-10)
  np.testing.assert_allclose(d.posterior_mean_coef2[1:], np.sqrt(alpha[1:]) / (1 - alpha[1:]) / prec,
                             rtol=1e-10)
  assert d.posterior_variance[0] == 0.0 and d.posterior_mean_coef1[0] == pytest.approx(1.0)
  np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]),
                             rtol=1e-12)
  assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])


def test_beta_schedules():
  lin = G.get_named_beta_schedule("linear", 250)  # scaled by 1000 / T
  assert lin[0] == pytest.approx(4e-4) and lin[-1] == pytest.approx(0.08)
  cos = G.get_named_beta_schedule("squaredcos_cap_v2", 1000)
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  np.testing.assert_allclose(np.cumprod(1 - cos)[[0, 499, 998]],
                             [f(1 / 1000) / f(0), f(0.5) / f(0), f(0.999) / f(0)], rtol=1e-9)
  assert cos.max() <= 0.999


# --------------------------------------------------------------------------- forward/reverse maths
@pytest.mark.parametrize("steps,schedule,respacing", CHAINS[:3])
def test_q_posterior_matches_float64_bayes(steps, schedule, respacing):
  d = make(steps, schedule, respacing)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(6, 4, 4, 2)).astype(np.float32)
  xt = rng.normal(size=(6, 4, 4, 2)).astype(np.float32)
  t = rng.integers(1, d.num_timesteps, 6)
  mean, var, logv = jax.jit(d.q_posterior_mean_variance)(x0, xt, t)
  e = lambda a: a[t][:, None, None, None]  # noqa: E731
  ab, abp = d.alphas_cumprod, d.alphas_cumprod_prev
  alpha = ab / abp
  prec = 1 / (1 - e(abp)) + e(alpha) / (1 - e(alpha))
  ref = (np.sqrt(e(abp)) / (1 - e(abp)) * x0 + np.sqrt(e(alpha)) / (1 - e(alpha)) * xt) / prec
  np.testing.assert_allclose(mean, ref, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(var, np.broadcast_to(1 / prec, x0.shape), rtol=1e-6)
  np.testing.assert_allclose(logv, np.log(np.broadcast_to(1 / prec, x0.shape)), rtol=1e-6)
  # q_sample: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
  np.testing.assert_allclose(d.q_sample(x0, t, xt), np.sqrt(e(ab)) * x0 + np.sqrt(1 - e(ab)) * xt,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps,schedule,respacing", CHAINS[:4])
def test_learned_range_interpolates_log_variance(steps, schedule, respacing):
  """v in [-1, 1] maps to frac = (v + 1) / 2 between log posterior_variance (clipped) and log beta."""
  d = make(steps, schedule, respacing)
  b, c = 5, 3
  rng = np.random.default_rng(1)
  x = rng.normal(size=(b, 2, 2, c)).astype(np.float32)
  t = np.array([0, 1, d.num_timesteps // 2, d.num_timesteps - 2, d.num_timesteps - 1])
  v = np.stack([np.full((2, 2, c), s, np.float32) for s in (-1.0, 1.0, 0.0, 0.5, -0.25)])
  out = np.concatenate([rng.normal(size=x.shape).astype(np.float32), v], axis=-1)
  o = d.p_mean_variance_from_output(out, x, t, clip_denoised=False)
  frac = (v + 1) / 2
  lo = d.posterior_log_variance_clipped[t][:, None, None, None]
  hi = np.log(d.betas)[t][:, None, None, None]
  np.testing.assert_allclose(o.log_variance, frac * hi + (1 - frac) * lo, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(o.variance, np.exp(frac * hi + (1 - frac) * lo), rtol=2e-6)
  fixed = make(steps, schedule, respacing, learn_sigma=False)
  o = fixed.p_mean_variance_from_output(out[..., :c], x, t, clip_denoised=False)
  large = np.append(fixed.posterior_variance[1], fixed.betas[1:])[t][:, None, None, None]
  np.testing.assert_allclose(o.variance, np.broadcast_to(large, x.shape), rtol=1e-6)


def test_decoder_nll_matches_float64():
  """The discretized Gaussian log-likelihood equals the official formula evaluated in float64
  (also in the tails, where the official float32 subtraction loses every digit)."""
  rng = np.random.default_rng(2)
  n = 20000
  x = np.round(rng.uniform(-1, 1, n) * 127.5) / 127.5
  x[:200], x[200:400] = -1.0, 1.0
  means = x + rng.normal(0, 0.02, n) * rng.choice([0.1, 1, 3], n)
  log_scales = rng.uniform(-6.0, -1.0, n)
  x32, m32, l32 = (a.astype(np.float32) for a in (x, means, log_scales))
  got = np.asarray(jax.jit(lambda a, b, c: G.discretized_gaussian_log_likelihood(
      a, means=b, log_scales=c))(x32, m32, l32), np.float64)
  xx, mm, ll = (a.astype(np.float64) for a in (x32, m32, l32))
  cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
  inv = np.exp(-ll)
  cp, cm = cdf(inv * (xx - mm + 1 / 255)), cdf(inv * (xx - mm - 1 / 255))
  with np.errstate(divide="ignore"):
    ref = np.where(xx < -0.999, np.log(np.maximum(cp, 1e-12)),
                   np.where(xx > 0.999, np.log(np.maximum(1 - cm, 1e-12)),
                            np.log(np.maximum(cp - cm, 1e-12))))
  ok = ref > np.log(1e-12) + 1  # the official clamp at 1e-12 (float64 reaches it in other places)
  np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=2e-6)
  assert abs(got.mean() - ref.mean()) <= 1e-5 * abs(ref.mean())


def test_loss_gradients_stay_finite_at_extremes():
  """Data on the bin edges (+-1), tiny and huge variances, far-off means: the t = 0 decoder term
  saturates but neither it nor its gradient overflows to inf / NaN."""
  d = make(100, "linear", "")
  x0 = jnp.asarray(np.tile([-1.0, 1.0, 0.0, 0.5], 4).reshape(4, 2, 2, 1), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(9).normal(size=x0.shape), jnp.float32)
  t = jnp.zeros(4, jnp.int32)
  xt = d.q_sample(x0, t, noise)
  eps = jnp.stack([noise[0], -40 * noise[1], 40 * noise[2], noise[3]])
  v = jnp.stack([jnp.full((2, 2, 1), s, jnp.float32) for s in (-1.0, 1.0, -3.0, 3.0)])
  f = lambda o: d.training_losses_from_output(o, x0, xt, t, noise)["loss"].sum()  # noqa: E731
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.concatenate([eps, v], -1))
  assert np.isfinite(loss) and np.all(np.isfinite(g)), (loss, g)


# --------------------------------------------------------------------------- oracle models
def point_mass_eps(base: G.GaussianDiffusion, x_star):
  """Exact epsilon for data = x_star, from the ORIGINAL timestep the network is called with."""
  ab = jnp.asarray(np.cumprod(1 - base.base_betas).astype(np.float32))

  def fn(x, t_model, y):
    a = ab[t_model.astype(jnp.int32)][:, None, None, None]
    return (x - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
  return fn


@pytest.mark.parametrize("steps,schedule,respacing,method,eta", [
    CHAINS[0] + ("ddim", 0.0), CHAINS[0] + ("ddpm", 0.0), CHAINS[2] + ("ddim", 0.6),
    CHAINS[2] + ("ddpm", 0.0), CHAINS[3] + ("ddim", 0.0), CHAINS[4] + ("ddpm", 0.0),
])
def test_exact_model_recovers_point_mass(steps, schedule, respacing, method, eta):
  """With the exact epsilon of a one-point data set, every step predicts the point and the chain
  ends on it; wrong model times (respaced instead of original) or a reversed chain break this."""
  base = make(steps, schedule, "", learn_sigma=False)
  x_star = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  cfg = G.GaussianSamplerConfig(method, respacing=respacing or str(steps), eta=eta)
  x_T = jax.random.normal(jax.random.key(0), x_star.shape)
  s, tr = jax.jit(lambda z: G.sample_loop(point_mass_eps(base, x_star), base, cfg, z,
                                          jnp.zeros(3, jnp.int32), jax.random.key(1),
                                          return_trajectory=True))(x_T)
  n = G.for_sampling(base, cfg).num_timesteps
  assert tr.pred_xstart.shape == (n,) + x_star.shape and int(s.nfe) == n
  np.testing.assert_allclose(tr.pred_xstart, np.broadcast_to(x_star, tr.pred_xstart.shape),
                             atol=2e-3)
  np.testing.assert_allclose(s.x, x_star, atol=2e-4)


@pytest.mark.parametrize("method,respacing,eta", [("ddim", "ddim200", 0.0), ("ddpm", "250", 0.0),
                                                  ("ddim", "200", 0.5)])
def test_exact_model_samples_gaussian_data(method, respacing, eta):
  """Data ~ N(mu, s^2) per pixel with the exact epsilon E[eps | x_t]: DDPM and DDIM produce that
  distribution (mean and std over 4096 samples x 4 pixels; sampling noise ~0.004; DDIM's own
  discretization error is 0.024 in the std at 50 steps, 0.003 at 200)."""
  base = make(1000, "linear", "", learn_sigma=False)
  mu, sd = 0.3, 0.5
  ab_all = jnp.asarray(np.cumprod(1 - base.base_betas).astype(np.float32))

  def fn(x, t_model, y):
    a = ab_all[t_model.astype(jnp.int32)][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sd ** 2 + 1 - a)

  cfg = G.GaussianSamplerConfig(method, respacing=respacing, eta=eta)
  x_T = jax.random.normal(jax.random.key(0), (4096, 2, 2, 1))
  x = jax.jit(lambda z: G.sample_loop(fn, base, cfg, z, jnp.zeros(4096, jnp.int32),
                                      jax.random.key(5)).x)(x_T)
  x = np.asarray(x)
  assert abs(x.mean() - mu) < 0.015 and abs(x.std() - sd) < 0.015, (x.mean(), x.std())


def test_ddim_reverse_step_follows_the_noise_direction():
  d = make(1000, "linear", "ddim20", learn_sigma=False)
  x_star = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  eps = jax.random.normal(jax.random.key(2), x_star.shape)
  t = jnp.array([3, 11])
  xt = d.q_sample(x_star, t, eps)
  nxt, pred = jax.jit(lambda x: d.ddim_reverse_sample(
      point_mass_eps(make(1000, "linear", ""), x_star), x, t, jnp.zeros(2, jnp.int32),
      clip_denoised=False))(xt)
  np.testing.assert_allclose(pred, x_star, atol=1e-4)
  np.testing.assert_allclose(nxt, d.q_sample(x_star, t + 1, eps), atol=1e-4)


def test_model_sees_original_timesteps():
  """Sampling and training on a respaced chain call the network with timestep_map[t]."""
  base = make(1000, "linear", "", learn_sigma=False)
  seen = []

  def fn(x, t_model, y):
    jax.debug.callback(lambda t: seen.append(np.asarray(t).copy()), t_model, ordered=True)
    return jnp.zeros_like(x)

  cfg = G.GaussianSamplerConfig("ddim", respacing="100,50")
  jax.jit(lambda z: G.sample_loop(fn, base, cfg, z, jnp.zeros(2, jnp.int32)).x)(
      jnp.ones((2, 2, 2, 1))).block_until_ready()
  d = G.for_sampling(base, cfg)
  assert d.num_timesteps == 150
  np.testing.assert_array_equal(np.stack(seen)[:, 0], d.timestep_map[::-1])
  seen.clear()
  t = np.array([0, 7, 149])
  d.training_losses(fn, jnp.ones((3, 2, 2, 1)), t, jnp.zeros(3, jnp.int32), jnp.ones((3, 2, 2, 1)))
  jax.effects_barrier()
  np.testing.assert_array_equal(seen[0], d.timestep_map[t])


def test_per_sample_noise_does_not_depend_on_the_batch():
  base = make(100, "linear", "")
  fn = lambda x, t, y: jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1)  # noqa: E731
  keys = jax.random.split(jax.random.key(7), 4)
  x_T = jax.random.normal(jax.random.key(8), (4, 2, 2, 1))
  for cfg in (G.GaussianSamplerConfig("ddpm", 20), G.GaussianSamplerConfig("ddim", 20, eta=1.0)):
    f = jax.jit(lambda z, k: G.sample_loop(fn, base, cfg, z, jnp.zeros(z.shape[0], jnp.int32), k).x)
    full, part = f(x_T, keys), f(x_T[2:], keys[2:])
    np.testing.assert_allclose(full[2:], part, rtol=1e-6)
    assert not np.allclose(full[:2], full[2:])


# --------------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss", ["mse", "rescaled_mse"])
def test_vb_trains_the_variance_only(loss):
  """The vb term sees a frozen (stop_gradient) mean; the mse term never sees the variance."""
  d = make(200, "linear", "", rescale_learned_sigmas=loss == "rescaled_mse")
  assert d.loss_type == loss
  rng = np.random.default_rng(5)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 2, 2, 2)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([0, 1, 50, 199])
  xt = d.q_sample(x0, t, noise)
  out = jnp.asarray(rng.normal(0, 0.5, (4, 2, 2, 4)), jnp.float32)

  @jax.jit
  def grads_and_terms(o):
    f = lambda o, k: d.training_losses_from_output(o, x0, xt, t, noise)[k].sum()  # noqa: E731
    return (jax.grad(f)(o, "vb"), jax.grad(f)(o, "mse"),
            d.training_losses_from_output(o, x0, xt, t, noise))

  g_vb, g_mse, terms = grads_and_terms(out)
  np.testing.assert_array_equal(g_vb[..., :2], 0.0)
  np.testing.assert_array_equal(g_mse[..., 2:], 0.0)
  assert np.abs(g_vb[..., 2:]).min() > 0 and np.abs(g_mse[..., :2]).max() > 0
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
  np.testing.assert_allclose(terms["mse"], ((noise - out[..., :2]) ** 2).mean((1, 2, 3)), rtol=1e-6)


def test_exact_mean_and_posterior_variance_give_zero_kl():
  """For t > 0, vb = KL(q || p) = 0 when p has the true posterior mean (exact eps) and v = -1
  (the posterior variance); start_x models are scored against x0."""
  d = make(300, "squaredcos_cap_v2", "")
  rng = np.random.default_rng(6)
  x0 = rng.uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([1, 150, 299])
  xt = d.q_sample(x0, t, noise)
  out = np.concatenate([noise, -np.ones_like(noise)], -1)
  terms = jax.jit(d.training_losses_from_output)(out, x0, xt, t, noise)
  np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-12)
  np.testing.assert_allclose(terms["vb"], 0.0, atol=2e-5)
  dx = make(300, "squaredcos_cap_v2", "", predict_xstart=True, learn_sigma=False)
  assert dx.model_mean_type == "start_x"
  np.testing.assert_allclose(jax.jit(dx.training_losses_from_output)(x0, x0, xt, t, noise)["loss"],
                             0.0)
  dk = make(300, "squaredcos_cap_v2", "", use_kl=True)
  kl = jax.jit(dk.training_losses_from_output)(out, x0, xt, t, noise)
  assert set(kl) == {"loss"}
  np.testing.assert_allclose(kl["loss"], 0.0, atol=2e-5 * 300)


def tiny_model(learn_sigma=True, **kw):
  cfg = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
             num_classes=3, learn_sigma=learn_sigma)
  cfg.update(kw)
  return models.build_model(None, **cfg)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_make_loss_fn_for_the_trainer(learn_sigma):
  model = tiny_model(learn_sigma)
  d = G.create_diffusion("", learn_sigma=learn_sigma, diffusion_steps=50)
  params = _random(model, 1, 0.05, as_jax=True)  # random weights (adaLN-Zero init outputs zeros)
  loss_fn = G.make_loss_fn(model, d)
  x = jax.random.uniform(jax.random.key(2), (16, 8, 8, 1), minval=-1, maxval=1)
  y = jnp.arange(16) % 3
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x, y,
                                                                          jax.random.key(3))
  assert set(aux) == ({"loss_per_sample", "t", "mse", "vb"} if learn_sigma
                      else {"loss_per_sample", "t", "mse"})
  assert aux["t"].min() >= 0 and aux["t"].max() < 50 and len(set(np.asarray(aux["t"]))) > 4
  np.testing.assert_allclose(loss, aux["loss_per_sample"].mean(), rtol=1e-6)
  assert np.isfinite(loss) and np.isfinite(float(optax_norm(grads)))
  assert float(optax_norm(grads)) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("channels,gc,guided", [(4, 3, 3), (4, None, 4), (1, 3, 1), (2, None, 2)])
def test_guidance_never_touches_the_variance_channels(channels, gc, guided):
  null = 5

  def fn(x, t, y):  # eps half = label, variance half = 10 * label (per row)
    lab = y.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([jnp.broadcast_to(lab, x.shape), jnp.broadcast_to(10 * lab, x.shape)], -1)

  g = G.guided_model_fn(fn, 3.0, null, channels, gc)
  x = jnp.zeros((2, 2, 2, channels))
  out = np.asarray(g(x, jnp.zeros(2), jnp.array([1, 2])))
  for i, lab in enumerate((1, 2)):
    want = np.array([null + 3.0 * (lab - null)] * guided + [lab] * (channels - guided)
                    + [10.0 * lab] * channels)
    np.testing.assert_allclose(out[i, 0, 0], want)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec,match", [
    ("abc", "expected '', 'N'"), ("ddimx", "integer N"), ("ddim999", "integer stride"),
    ("0", "needs >= 1 step"), ("1200", "cannot divide a section of 1000"), ("1", ">= 2"),
    ("ddim1", ">= 2 steps"), ("500,500,1", "cannot divide"),
])
def test_bad_respacings(spec, match):
  with pytest.raises(ValueError, match=match):
    G.create_diffusion(spec)


def test_bad_schedules():
  with pytest.raises(ValueError, match="beta = 20 / 20 >= 1"):
    G.create_diffusion("", diffusion_steps=20)
  with pytest.raises(ValueError, match="must be an int >= 2"):
    G.create_diffusion("", diffusion_steps=1, noise_schedule="squaredcos_cap_v2")


@pytest.mark.parametrize("kw,match", [
    (dict(method="euler"), "unknown Gaussian-diffusion sampler 'euler'"),
    (dict(method="ddpm", eta=0.5), "DDIM option"),
    (dict(method="ddim", eta=1.5), r"eta=1.5 must be in \[0, 1\]"),
    (dict(method="ddim", num_steps=1), ">= 2 steps"),
])
def test_bad_sampler_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    G.GaussianSamplerConfig(**kw).validate()


def test_bad_models_and_options():
  d = G.create_diffusion("10")
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="needs 6 channels .*learn_sigma=True"):
    d.p_mean_variance_from_output(jnp.zeros((2, 4, 4, 3)), x, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="does not fit a model with learn_sigma=False"):
    G.make_sample_fn(tiny_model(False), d, G.GaussianSamplerConfig("ddim", 10))
  with pytest.raises(ValueError, match="not available with the Gaussian objective"):
    G.make_sample_fn(tiny_model(True), d, G.GaussianSamplerConfig("ddim", 10), cfg_scale=2.0,
                     guidance_interval=(0.0, 0.5))
  with pytest.raises(ValueError, match="needs rng"):
    G.sample_loop(lambda x, t, y: jnp.zeros(x.shape[:-1] + (6,)), d,
                  G.GaussianSamplerConfig("ddpm", 10), x, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
    G.create_diffusion("", noise_schedule="cosine")
  with pytest.raises(ValueError, match="unknown diffusion settings"):
    G.diffusion_from_settings({"steps": 10}, True)
