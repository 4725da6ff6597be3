"""Step-wise dynamic mediators: the switching rule, per-sample switching, no recompilation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.diffusion import dynamic, guidance, samplers

from edit_jax import flops, models
from edit_jax.diffusion import transport as T
from random_params import random_params as _random  # tests/random_params.py

NAN = float("nan")


# ----------------------------------------------------------------------- the rule (pure)
def test_rule_basic_sequence():
  rule = dynamic.SwitchRule((0.8, 0.5), first_several=2)
  d = [NAN, 1.0, 1.0, 0.9, 0.7, 0.6, 0.4, 0.3]  # Delta0 = 1 (steps 1, 2)
  #        step: 0  1  2  3  4  5  6  7  last
  want = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(dynamic.switch_schedule(d, rule), want)


def test_rule_two_switches_in_one_step_and_no_revert():
  rule = dynamic.SwitchRule((0.8, 0.5), first_several=2)
  d = [NAN, 1.0, 1.0, 0.3, 5.0, 5.0]
  np.testing.assert_array_equal(dynamic.switch_schedule(d, rule), [0, 0, 0, 0, 2, 2, 2])
  d = [NAN, 1.0, 1.0, 0.7, 5.0, 0.1]  # 0 -> 1 at step 3, a large d_4 does not revert
  np.testing.assert_array_equal(dynamic.switch_schedule(d, rule), [0, 0, 0, 0, 1, 1, 2])


def test_rule_reference_steps_never_switch():
  rule = dynamic.SwitchRule((0.8,), first_several=3)
  # d_1..d_3 build Delta0 = (1 + 1 + 0.01) / 3; step 3 is not yet compared (k >= F + 1 = 4)
  d = [0.0, 1.0, 1.0, 0.01, 0.6, 0.5]
  np.testing.assert_array_equal(dynamic.switch_schedule(d, rule), [0, 0, 0, 0, 0, 0, 1])
  # d_0 (the change from the initial noise) is never used
  d2 = [1e-9] + d[1:]
  np.testing.assert_array_equal(dynamic.switch_schedule(d2, rule),
                                dynamic.switch_schedule(d, rule))


def test_rule_reproduces_official_trace_shape():
  """Spec §4 trace: 40 grid points, F = 3, rho = 0.8 / 0.6: model1 runs steps 0-16 (switch at
  k = 16, ratio 0.799), model2 17-27 (switch at k = 27, ratio 0.599), model3 28-38 + last step."""
  d = np.full(39, NAN)
  d[1:4] = 1.0
  d[4:16], d[16], d[17:27], d[27], d[28:] = 0.85, 0.799, 0.7, 0.599, 0.5
  got = dynamic.switch_schedule(d, dynamic.SwitchRule((0.8, 0.6), first_several=3))
  np.testing.assert_array_equal(got, [0] * 17 + [1] * 11 + [2] * 12)


def test_rule_per_sample_columns_and_state_machine():
  rule = dynamic.SwitchRule((0.8, 0.5), first_several=2, distance="mae")
  a = [NAN, 1.0, 1.0, 0.9, 0.7, 0.6, 0.4, 0.3]
  b = [NAN, 2.0, 2.0, 0.2, 9.0, 9.0, 9.0, 9.0]
  got = dynamic.switch_schedule(np.stack([a, b], 1), rule)
  np.testing.assert_array_equal(got[:, 0], dynamic.switch_schedule(a, rule))
  np.testing.assert_array_equal(got[:, 1], dynamic.switch_schedule(b, rule))
  assert rule.validate().distance == "l1"
  assert dynamic.SwitchRule((0.5,), distance="mse").validate().distance == "l2"


@pytest.mark.parametrize("rule,k,match", [
    (dynamic.SwitchRule((0.8, 1.0)), None, r"must each lie in \(0, 1\)"),
    (dynamic.SwitchRule((0.0,)), None, r"must each lie in \(0, 1\)"),
    (dynamic.SwitchRule((0.8,)), 3, "3 models need 2 switch ratios"),
    (dynamic.SwitchRule((0.8,), first_several=0), None, "first_several=0"),
    (dynamic.SwitchRule((0.8,), distance="cosine"), None, "unknown distance 'cosine'"),
])
def test_rule_bad_inputs(rule, k, match):
  with pytest.raises(ValueError, match=match):
    rule.validate(k)


# ----------------------------------------------------------------------- the sampler
def tiny(n, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
             num_classes=10, mediator_num=n)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def random_params(model, seed):
  return _random(model, seed, 0.1, as_jax=True)


B, STEPS = 4, 20
RULE = dynamic.SwitchRule((0.9, 0.7), first_several=3)


@pytest.fixture(scope="module")
def schedule():
  ms = [tiny(n) for n in (1, 4, 16)]
  ps = [random_params(m, i) for i, m in enumerate(ms)]
  return ms, ps


@pytest.fixture(scope="module")
def batch_sampler(schedule):
  ms, ps = schedule
  return dynamic.DynamicSampler(ms, ps, T.create_transport(), samplers.SDEConfig(num_steps=STEPS),
                                RULE, batch_size=B, bucket_sizes=(2, 4))


@pytest.fixture(scope="module")
def inputs():
  x0 = jax.random.normal(jax.random.key(1), (B, 8, 8, 4))
  y = jnp.array([1, 2, 3, 4], jnp.int32)
  keys = jax.random.split(jax.random.key(5), B)
  return x0, y, keys


def test_per_sample_switching_equals_sampling_alone(schedule, batch_sampler, inputs):
  ms, ps = schedule
  x0, y, keys = inputs
  res = batch_sampler.sample(x0, y, keys)
  first_switch = (res.stages >= 1).argmax(0)
  assert len(set(first_switch.tolist())) > 1, "test needs samples that switch at different steps"
  assert res.stages[-1].min() >= 1
  alone = dynamic.DynamicSampler(ms, ps, T.create_transport(), samplers.SDEConfig(num_steps=STEPS),
                                 RULE, batch_size=1)
  for i in range(B):
    r = alone.sample(x0[i:i + 1], y[i:i + 1], keys[i:i + 1])
    np.testing.assert_array_equal(r.stages[:, 0], res.stages[:, i])
    np.testing.assert_allclose(r.x[0], res.x[i], atol=2e-5)
  # the schedule is the pure rule applied to the recorded per-sample distances
  np.testing.assert_array_equal(dynamic.switch_schedule(res.distances, RULE), res.stages)
  # accounting: GFLOPs follow each sample's stages; the static baseline is the largest model
  g = np.array([flops.gflops(m) for m in ms])
  per_sample = g[res.stages[:-1]].sum(0) + g[res.stages[-1]]  # 1 eval per step + Mean last step
  np.testing.assert_allclose(res.gflops, per_sample, rtol=1e-9)
  assert res.gflops_static == pytest.approx(g[-1] * STEPS)
  assert (res.gflops < res.gflops_static).all()
  np.testing.assert_array_equal(res.nfe, STEPS)
  np.testing.assert_array_equal(res.mediator_nums, np.array([1, 4, 16])[res.stages])
  assert res.gflops_executed >= res.gflops.mean()


def test_no_switch_equals_static_sampler_and_no_recompilation(schedule, batch_sampler, inputs):
  from jax import monitoring
  ms, ps = schedule
  x0, y, keys = inputs
  events = []

  def listener(event, duration, **kw):
    if event.startswith("/jax/core/compile/"):
      events.append((event, kw.get("fun_name")))

  monitoring.register_event_duration_secs_listener(listener)
  try:
    never = batch_sampler.sample(x0, y, keys, rule=dynamic.SwitchRule((1e-9, 1e-10), 3))
    batch_sampler.sample(x0, y, keys, rule=dynamic.SwitchRule((0.95, 0.9), 2))
    assert events == [], f"sampling traced/compiled: {events}"
    jax.jit(lambda v: v * 3)(jnp.arange(3.0))  # the detector does see a compilation
    assert events
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert (never.stages == 0).all()
  cfg = samplers.SDEConfig(num_steps=STEPS)
  static = jax.jit(lambda p, x, yy, k: samplers.sample(
      samplers.flax_model_fn(ms[0], samplers.sampling_variables(ms[0], p)),
      T.create_transport(), cfg, x, yy, k).x)(ps[0], x0, y, keys)
  np.testing.assert_allclose(never.x, static, atol=2e-5)


def test_batch_level_rule_switches_together(batch_sampler, inputs):
  x0, y, keys = inputs
  res = batch_sampler.sample(x0, y, keys, per_sample=False)  # the official batch-level rule
  assert (res.stages == res.stages[:, :1]).all()
  assert res.stages[-1, 0] >= 1
  np.testing.assert_allclose(res.distances[1:], res.distances[1:, :1] + 0 * res.distances[1:])


def test_dynamic_ode_with_cfg(schedule):
  ms, ps = schedule
  ms, ps = ms[:2], ps[:2]
  cfg = samplers.ODEConfig("heun2", 12)
  tr = T.create_transport()
  x0 = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
  y = jnp.array([3, 7], jnp.int32)
  ds = dynamic.DynamicSampler(ms, ps, tr, cfg, dynamic.SwitchRule((1e-9,), 2), batch_size=2,
                              bucket_sizes=(2,), cfg_scale=4.0)
  res = ds.sample(x0, y)
  assert (res.stages == 0).all()
  guided = guidance.guided_model_fn(
      samplers.flax_model_fn(ms[0], {"params": ps[0]}), 4.0, 10)
  want = jax.jit(lambda x: samplers.sample(guided, tr, cfg, x, y).x)(x0)
  np.testing.assert_allclose(res.x, want, atol=2e-5)
  g0 = flops.gflops(ms[0])
  np.testing.assert_allclose(res.gflops, g0 * 2 * 2 * 11)  # heun2: 2 evals, CFG: 2 forwards
  # a switching run: stages follow the rule on the recorded distances
  res2 = ds.sample(x0, y, rule=dynamic.SwitchRule((0.97,), 2))
  np.testing.assert_array_equal(
      dynamic.switch_schedule(res2.distances, dynamic.SwitchRule((0.97,), 2)), res2.stages)


def _abstract(m):
  return models.abstract_params(m)


@pytest.mark.parametrize("make,match", [
    (lambda: ([tiny(4), tiny(1)], None), "strictly increasing"),
    (lambda: ([tiny(4), tiny(4)], None), "strictly increasing"),
    (lambda: ([tiny(0), tiny(4)], None), "positive and strictly increasing"),
    (lambda: ([tiny(1), tiny(4, num_classes=5)], None), "num_classes: 10 vs 5"),
    (lambda: ([tiny(1), tiny(4, input_size=16)], None), "input_size: 8 vs 16"),
    (lambda: ([tiny(1), tiny(4, hidden_size=64)], None), "hidden_size: 32 vs 64"),
    (lambda: ([tiny(1), tiny(4)], [_abstract(tiny(4)), _abstract(tiny(4))]),
     "parameters 0 do not fit model 0"),
    (lambda: ([tiny(1), tiny(4)], [_abstract(tiny(1))]), "2 models but 1 parameter sets"),
])
def test_bad_schedules_fail_before_work(make, match):
  ms, ps = make()
  ps = ps if ps is not None else [_abstract(m) for m in ms]
  with pytest.raises(ValueError, match=match):
    dynamic.DynamicSampler(ms, ps, T.create_transport(), samplers.SDEConfig(num_steps=20),
                           dynamic.SwitchRule((0.8,)), batch_size=2)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler=samplers.ODEConfig("dopri5")), "fixed-step sampler"),
    (dict(rule=dynamic.SwitchRule((0.8, 0.6))), "2 models need 1 switch ratios"),
    (dict(rule=dynamic.SwitchRule((1.5,))), r"\(0, 1\)"),
    (dict(sampler=samplers.SDEConfig(num_steps=4)), "leaves no step to switch"),
    (dict(bucket_sizes=(1, 3)), "include batch_size=4"),
    (dict(sampler=samplers.SDEConfig(method="Milstein")), "unknown SDE method"),
])
def test_bad_options_fail_before_work(kw, match):
  ms = [tiny(1), tiny(4)]
  args = dict(sampler=samplers.SDEConfig(num_steps=20), rule=dynamic.SwitchRule((0.8,)),
              batch_size=4)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    dynamic.DynamicSampler(ms, [_abstract(m) for m in ms], T.create_transport(),
                           args.pop("sampler"), args.pop("rule"), **args)
