"""Sparse DyDiT sampling: equals the dense-masked sampler, compiles once per signature (nothing
inside the loop), capacity-bounded token skipping with its dense fallback, CFG and mediators."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import models
from edit_jax.diffusion import dydit as ddy
from edit_jax.diffusion import gaussian, samplers, transport as tr
from edit_jax.models import dydit
from test_dydit import noisy

B = 3
T = tr.create_transport()


def make_model(mediator_num=0, depth=2, seed=0, learn_sigma=False, t_max=1.0):
  """A tiny DyDiT whose routers vary with t on [0, 1] (mixed head / group / token masks): a noisy
  timestep MLP, router biases centred on the grid's mean logit, token router bias -0.3."""
  m = models.build_model(None, arch="dydit", input_size=8, patch_size=2, in_channels=3,
                         hidden_size=32, depth=depth, num_heads=4, num_classes=5,
                         learn_sigma=learn_sigma, mediator_num=mediator_num, token_router_ratio=8)
  p = models.init_params(m, jax.random.key(seed))

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    k = jax.random.key(zlib.crc32(name.encode()) % 10007 + seed)  # not hash(): salted per process
    if "t_embedder" in name:
      return a + 0.5 * jax.random.normal(k, a.shape) / (t_max if "mlp_0" in name else 1.0)
    if "router" in name:
      return 3.0 * a if "kernel" in name else 0.0 * a
    if "mlp_head_2" in name and "bias" in name:
      return a * 0 - 0.3
    if "adaLN" in name or "final_layer" in name:
      return a + 0.1 * jax.random.normal(k, a.shape)
    return a

  p = jax.tree_util.tree_map_with_path(perturb, p)
  _, _, la, lm = jax.jit(lambda v, t: m.apply(v, t, method=dydit.DyDiT.route))(
      {"params": p}, jnp.linspace(0, t_max, 64))  # jitted: one program, not one per op
  for i in range(depth):
    for r, lg in (("attn_rate", la), ("mlp_rate", lm)):
      centre = np.asarray(lg[:, i]).mean(0)
      noise = 0.2 * np.asarray(jax.random.normal(jax.random.key(seed + 11 * i), centre.shape))
      p[f"blocks_{i}"][r]["router"]["bias"] = jnp.asarray(-centre + noise)
  return m, p


def inputs(m):
  x0 = np.asarray(jax.random.normal(jax.random.key(1), (B, m.input_size, m.input_size,
                                                        m.in_channels)))
  return x0, np.arange(B, dtype=np.int32) % m.num_classes


def dense(m, p, cfg, x0, y, rng=None, **kw):
  return np.asarray(jax.jit(samplers.make_sample_fn(m, T, cfg, **kw))(p, x0, y, rng).x)


def first_sample_events(sp, x0, y):
  """Compilation / tracing / lowering events seen while a sampler's first sample() call runs, and
  (the control) while an uncompiled jitted function runs in the same listening window."""
  events, control = [], []
  log = events

  def listener(event, *args, **kwargs):
    if "compil" in event or "trace" in event or "lower" in event:
      log.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(listener)
  try:
    r = sp.sample(x0, y)
    jax.block_until_ready(r.x)
    log = control
    jax.jit(lambda a: a * 3.0 + 1.0)(jnp.ones(7))
  finally:
    jax.monitoring.clear_event_listeners()
  return events, control


@pytest.fixture(scope="module")
def euler_cfg():
  """The full pipeline on Euler ODE + CFG: sparse sampler, calibration, capacities, reference.
  6 steps: 4 width signatures, one run of 2 steps. The sampler's FIRST sample() call, right after
  its construction, is watched for compilation (test_no_compilation_inside_the_sampling_loop)."""
  m, p = make_model()
  x0, y = inputs(m)
  cfg = samplers.ODEConfig(method="euler", num_steps=6)
  sp = ddy.SparseSampler(m, p, T, cfg, batch_size=B, cfg_scale=2.0)
  events = first_sample_events(sp, x0, y)
  want = dense(m, p, cfg, x0, y, cfg_scale=2.0)
  return m, p, x0, y, cfg, sp, want, events


def test_sparse_equals_dense_masked_sampler(euler_cfg):
  m, p, x0, y, cfg, sp, want, _ = euler_cfg
  assert sp.plan.logit_margin > 1e-5  # no mask is decided by float rounding
  assert len(sp.plan.runs) >= 2 and sp.compile_count == sp.plan.num_signatures >= 2
  head = sp.plan.head
  assert 0.3 < head.mean() < 0.95 and len({h.tobytes() for h in head}) >= 2
  r = sp.sample(x0, y)
  np.testing.assert_allclose(np.asarray(r.x), want, atol=2e-5, rtol=0)
  assert r.gflops_executed == pytest.approx(r.gflops_masked) and r.gflops_masked < r.gflops_dense


def test_token_capacity_from_calibration(euler_cfg):
  m, p, x0, y, cfg, sp, want, _ = euler_cfg
  frac = sp.token_activity(x0, y)
  assert frac.shape == sp.plan.head.shape[:3] and 0.2 < frac.mean() < 0.9
  sdt = sp.with_token_capacity(frac)
  caps = [c[2] for key in sdt.plan.signatures for ev in key[1] for c in ev]
  assert any(caps) and all(c % 8 == 0 for c in caps)
  r = sdt.sample(x0, y)
  np.testing.assert_allclose(np.asarray(r.x), want, atol=2e-5, rtol=0)
  assert r.gflops_executed < sp.gflops()[2]
  # capacities at half the calibrated activity: every sparse step overflows -> dense fallback
  tight = sp.with_token_capacity(frac, capacity_margin=-0.5, capacity_multiple=1)
  np.testing.assert_allclose(np.asarray(tight.sample(x0, y).x), want, atol=2e-5, rtol=0)


def test_per_step_token_capacities(euler_cfg):
  """capacity_levels > 0: each step gets the capacity of its own calibrated fraction (rounded up
  to rows / L), never below it, so no calibrated step overflows; tighter than one capacity per
  width signature (fewer executed FLOPs), and the samples stay the dense-masked ones."""
  m, p, x0, y, cfg, sp, want, _ = euler_cfg
  frac = sp.token_activity(x0, y)
  # a width run whose first step is busy and the others quiet: one capacity per signature must
  # cover the busy step (here: stays dense), per-step capacities shrink the quiet ones
  run = max(sp.plan.runs, key=lambda r: r.stop - r.start)
  assert run.stop - run.start >= 2
  frac = frac.copy()
  frac[run.start:run.stop] = 0.3
  frac[run.start] = 0.95
  per_sig = sp.with_token_capacity(frac)
  per_step = sp.with_token_capacity(frac, capacity_levels=4)
  def caps(sp):  # (steps, evals, layers) capacity in rows (rows = dense)
    out = np.full(frac.shape, sp.rows)
    for run in sp.plan.runs:
      for e, ev in enumerate(sp.plan.signatures[run.sig][1]):
        for l, (_, _, cap) in enumerate(ev):
          out[run.start:run.stop, e, l] = cap or sp.rows
    return out

  c_step, c_sig = caps(per_step), caps(per_sig)
  assert (c_step >= frac * per_step.rows).all()   # no calibrated step overflows
  assert (c_step <= c_sig).all() and (c_step < c_sig).any()
  assert len(per_step.plan.runs) > len(per_sig.plan.runs)
  assert per_step.gflops()[2] < per_sig.gflops()[2]
  np.testing.assert_allclose(np.asarray(per_step.sample(x0, y).x), want, atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match="capacity_levels"):
    sp.with_token_capacity(frac, capacity_levels=-1)


def test_no_compilation_inside_the_sampling_loop(euler_cfg):
  """Everything compiles in the constructor: the FIRST sample() call traces and compiles nothing
  (the fixture's sampler, watched on the first call after its construction, before any other use,
  so no earlier call warmed anything up)."""
  sp, (events, control) = euler_cfg[5], euler_cfg[7]
  assert sp.compile_count == sp.plan.num_signatures == len({r.sig for r in sp.plan.runs}) >= 2
  assert events == []
  # a control: an uncompiled jitted call in the same window is seen by the listener
  assert control


# (mediator layers in the sampler: test_dydit.py slices them, incl. the cached biases). Step counts:
# the fewest with >= 2 width signatures (every signature is one more compiled program); the SDE
# keeps 5 steps for a 2-step run (the per-step noise index inside a run) besides its last step.
CASES = [
    ("ode-heun", False, samplers.ODEConfig(method="heun2", num_steps=3), {}),
    ("sde-euler-cfg", False, samplers.SDEConfig(method="Euler", num_steps=5),
     dict(cfg_scale=3.0, guide_channels=None)),
    ("ddpm-learned-sigma-cfg", True, gaussian.GaussianSamplerConfig("ddpm", num_steps=2),
     dict(cfg_scale=2.0)),
    ("ddim", False, gaussian.GaussianSamplerConfig("ddim", respacing="ddim2"), {}),
]


@pytest.mark.parametrize("name,sigma,cfg,kw", CASES, ids=[c[0] for c in CASES])
def test_sparse_equals_dense_other_samplers(name, sigma, cfg, kw):
  g = cfg.kind == "gaussian"
  m, p = make_model(learn_sigma=sigma, t_max=1000.0 if g else 1.0)
  x0, y = inputs(m)
  rng = jax.random.key(7) if cfg.kind == "sde" or cfg.method == "ddpm" else None
  obj = gaussian.create_diffusion("", learn_sigma=sigma) if g else T
  sp = ddy.SparseSampler(m, p, obj, cfg, batch_size=B, **kw)
  assert sp.plan.logit_margin > 1e-5 and len(sp.plan.runs) >= 2
  if cfg.method == "heun2":  # the two evaluations of a step have different widths somewhere
    assert any(not np.array_equal(h[0], h[1]) for h in sp.plan.head)
  r = sp.sample(x0, y, rng)
  if g:
    want = np.asarray(jax.jit(gaussian.make_sample_fn(m, obj, cfg, **kw))(p, x0, y, rng).x)
  else:
    want = dense(m, p, cfg, x0, y, rng, **kw)
  np.testing.assert_allclose(np.asarray(r.x), want, atol=2e-5 * max(1.0, np.abs(want).max()),
                             rtol=0)
  if rng is not None:
    assert g or sp.plan.runs[-1].kind == "last"
    with pytest.raises(ValueError, match="needs rng"):
      sp.sample(x0, y)


def test_bucketing_reduces_signatures_and_keeps_results(euler_cfg):
  m, p, x0, y, cfg, exact, _, _ = euler_cfg
  coarse = ddy.SparseSampler(m, p, T, cfg, batch_size=B, cfg_scale=2.0, bucket=2)
  assert coarse.plan.num_signatures <= exact.plan.num_signatures
  widths = [w for key in coarse.plan.signatures for ev in key[1] for w in ev]
  assert all(h % 2 == 0 and g % 2 == 0 for h, g, _ in widths)
  a, b = exact.sample(x0, y), coarse.sample(x0, y)
  np.testing.assert_allclose(np.asarray(b.x), np.asarray(a.x), atol=2e-5, rtol=0)
  assert b.gflops_executed >= a.gflops_executed and b.gflops_masked == a.gflops_masked


def test_all_gates_on_sparse_sampler_equals_base_sampler():
  base = models.build_model(None, input_size=8, patch_size=2, in_channels=3, hidden_size=32,
                            depth=2, num_heads=4, num_classes=5, learn_sigma=False)
  bp = noisy(models.init_params(base, jax.random.key(0)), 0.1, seed=3)
  m = dydit.from_sit(base)
  p = dydit.init_from_base(m, bp, jax.random.key(4))
  x0, y = inputs(m)
  cfg = samplers.ODEConfig(method="euler", num_steps=5)
  sp = ddy.SparseSampler(m, p, T, cfg, batch_size=B, cfg_scale=2.0)
  assert sp.plan.num_signatures == 1 and np.all(sp.plan.head == 1)
  want = dense(base, bp, cfg, x0, y, cfg_scale=2.0)
  r = sp.sample(x0, y)
  np.testing.assert_allclose(np.asarray(r.x), want, atol=1e-6, rtol=0)
  assert r.gflops_masked == pytest.approx(r.gflops_dense + sum(
      2 * m.router_flops() / 1e9 for _ in range(4)), rel=1e-9)


def test_sampler_errors(euler_cfg):
  m, p, x0, y, cfg, sp, _, _ = euler_cfg
  with pytest.raises(ValueError, match="fixed-step"):
    ddy.SparseSampler(m, p, T, samplers.ODEConfig(method="dopri5"), batch_size=B)
  with pytest.raises(ValueError, match="dense DyDiT"):
    ddy.SparseSampler(m.clone(segment=((1, 1, 0),) * 2), p, T, cfg, batch_size=B)
  with pytest.raises(ValueError, match="batch size is fixed"):
    sp.sample(x0[:2], y[:2])
  with pytest.raises(ValueError, match="token_fraction has shape"):
    sp.with_token_capacity(np.zeros((2, 1, 2)))
