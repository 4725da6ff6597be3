"""DyDiT model behaviour on configurations other than the golden's: all gates on = the base model
bit for bit, the FLOPs ratio, Gumbel-sigmoid gates, magnitude reordering, weight slicing and
capacity-bounded token skipping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import flops, models
from edit_jax.models import dydit

KEY = jax.random.key(0)


def base_model(mediator_num=0, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4,
             num_classes=5, learn_sigma=True, mediator_num=mediator_num)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def noisy(params, scale=0.1, seed=1):
  """Perturb every tensor (adaLN-Zero init alone makes the blocks identities). The noise is
  numpy's (seeded): jax.random compiles a threefry program per tensor shape, ~10 s of XLA:CPU
  compilation for each new model."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(
      np.asarray(a) + np.float32(scale) * rng.standard_normal(np.shape(a), np.float32), a.dtype)
      for a in leaves])


@functools.lru_cache(maxsize=None)
def init(model, seed=0):
  """models.init_params(model, key(seed)), computed once per model and seed in this module (each
  call of init_params traces and compiles the init again)."""
  return models.init_params(model, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def dydit64(mediator_num):
  """The DyDiT of base_model (D = 64, 4 heads, depth 2) shared by most tests (one init program per
  mediator setting), and its perturbed parameters (noise 0.1)."""
  dy = dydit.from_sit(base_model(mediator_num))
  return dy, noisy(init(dy), 0.1)


def inputs(model, batch=3, seed=2):
  x = jax.random.normal(jax.random.key(seed), (batch, model.input_size, model.input_size,
                                               model.in_channels))
  return x, jnp.linspace(0.05, 0.95, batch), jnp.arange(batch) % model.num_classes


_JITTED = {}


def jitted(key, make):
  """One jitted function per key, reused across calls and tests (a fresh `jax.jit(lambda ...)`
  per call traces and compiles again)."""
  if key not in _JITTED:
    _JITTED[key] = jax.jit(make())
  return _JITTED[key]


def apply(model, variables, x, t, y, unit_gates=None, **kw):
  """Jitted model.apply (eager flax is slow on a loaded CPU); one program per model and options.
  unit_gates (segment models) is a traced argument."""
  def make():
    def f(v, x, t, y, g):
      return model.apply(v, x, t, y, **kw, **({} if g is None else {"unit_gates": g}))
    return f
  return jitted(("apply", model, tuple(sorted(kw.items()))), make)(variables, x, t, y, unit_gates)


def with_gates(model, variables, x, t, y):
  f = jitted(("with_gates", model),
             lambda: lambda v, x, t, y: dydit.forward_with_gates(model, v, x, t, y))
  return f(variables, x, t, y)


def slice_vars(model, variables, hidx, gidx):
  """Jitted dydit.slice_variables (the index arrays are traced: one program per shape)."""
  f = jitted(("slice", model), lambda: lambda v, h, g: dydit.slice_variables(model, v, h, g))
  return f(variables, [jnp.asarray(i, jnp.int32) for i in hidx],
           [jnp.asarray(i, jnp.int32) for i in gidx])


def set_routers(params, depth, heads_on, groups_on, forced=True, token_bias=None):
  """Router params forcing the given unit masks (lists of (H,) 0/1 per block) at every t."""
  p = jax.tree_util.tree_map(lambda a: a, params)
  for i in range(depth):
    for r, on in (("attn_rate", heads_on[i]), ("mlp_rate", groups_on[i])):
      on = np.asarray(on, np.float32)[1:] if forced else np.asarray(on, np.float32)
      k = p[f"blocks_{i}"][r]["router"]["kernel"]
      p[f"blocks_{i}"][r]["router"] = {"kernel": jnp.zeros_like(k),
                                       "bias": jnp.asarray(np.where(on > 0, 8.0, -8.0))}
    if token_bias is not None:
      p[f"blocks_{i}"]["token_selection"]["mlp_head_2"]["bias"] = jnp.full((1,), token_bias)
  return p


@pytest.mark.parametrize("mediator_num", [0, 4])
def test_all_gates_on_equals_base_bit_for_bit(mediator_num):
  base = base_model(mediator_num)
  bp = noisy(init(base))
  dy = dydit.from_sit(base)
  dp = dydit.init_from_base(dy, bp, jax.random.key(5))
  x, t, y = inputs(base)
  # op by op (no XLA fusion choices differing between two programs): identical values
  ref = base.apply({"params": bp}, x, t, y)
  out, gates = dydit.forward_with_gates(dy, {"params": dp}, x, t, y)
  assert all(bool(jnp.all(g == 1)) for g in gates.values())
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # compiled: two different XLA programs may order float sums differently (last-bit changes)
  v = models.precompute_mediator_biases(dy, dp)
  np.testing.assert_allclose(np.asarray(apply(dy, v, x, t, y)), np.asarray(ref), rtol=0,
                             atol=2e-6 * float(jnp.abs(ref).max()))
  ratio = dydit.flops_ratio(dy, gates)
  assert np.all(np.asarray(ratio) == 1.0)
  assert float(dydit.flops_loss(ratio, 1.0)) == 0.0


def test_fresh_routers_start_on():
  dy, _ = dydit64(0)
  p = init(dy)
  blk = p["blocks_1"]
  assert blk["attn_rate"]["router"]["kernel"].shape == (64, 3)
  np.testing.assert_array_equal(blk["attn_rate"]["router"]["bias"], np.full(3, 15.0))
  np.testing.assert_array_equal(blk["mlp_rate"]["router"]["bias"], np.full(3, 15.0))
  np.testing.assert_array_equal(blk["token_selection"]["mlp_head_2"]["bias"], [35.0])
  assert blk["token_selection"]["mlp_head_0"]["kernel"].shape == (64, 4)
  # the first release's format: H outputs (shapes only)
  p_all = models.abstract_params(dydit.from_sit(base_model(), router_format="all"))
  assert p_all["blocks_0"]["mlp_rate"]["router"]["kernel"].shape == (64, 4)


@pytest.mark.parametrize("name,attn,mlp", [("SiT-S/2", 0.201326592, 0.301989888),
                                           ("SiT-B/2", 0.704643072, 1.207959552),
                                           ("SiT-XL/2", 1.50994944, 2.717908992)])
def test_block_costs_are_dydit_constants(name, attn, mlp):
  """The package's one FLOPs model gives the official DyDiT per-block constants (GMACs, 256 px)."""
  a, m = flops.block_costs(flops.model_at(name, 256))
  assert np.all(a == attn * 1e9) and np.all(m == mlp * 1e9)


def test_flops_ratio_matches_official_formula():
  """Against the official DynamicLoss arithmetic (mask sums over units, token means, constants)."""
  dy = dydit.from_sit(base_model(depth=3, mediator_num=4, mediator_layers=(1,)))
  rng = np.random.default_rng(0)
  b, l, h, n = 5, dy.depth, dy.num_heads, dy.num_tokens
  gates = {"head": (rng.random((b, l, h)) > 0.4).astype(np.float32),
           "group": (rng.random((b, l, h)) > 0.5).astype(np.float32),
           "token": (rng.random((b, l, n, 1)) > 0.3).astype(np.float32)}
  attn, mlp = flops.block_costs(dy)
  assert attn[1] < attn[0]  # the mediator block's attention is cheaper: per-block costs matter
  mlp_f = ((gates["group"].sum(2) / h) * (gates["token"][..., 0].sum(2) / n) * mlp).sum(1)
  attn_f = ((gates["head"].sum(2) / h) * attn).sum(1)
  want = (mlp_f + attn_f) / (attn + mlp).sum()
  got = np.asarray(dydit.flops_ratio(dy, {k: jnp.asarray(v) for k, v in gates.items()}))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(float(dydit.flops_loss(got, 0.5, 2.0)),
                             2.0 * (want.mean() - 0.5) ** 2, rtol=1e-5)


def test_gumbel_sigmoid_gates():
  logits = jnp.asarray([-3.0, -0.5, 0.0, 0.7, 4.0])
  ev = dydit.gumbel_sigmoid_gate(logits)
  np.testing.assert_array_equal(np.asarray(ev), [0, 0, 0, 1, 1])  # sigmoid(0) = 0.5 is off
  with pytest.raises(ValueError, match="rng"):
    dydit.gumbel_sigmoid_gate(logits, train=True)
  # training: hard values, P(on) = sigmoid(logit) (the logistic noise), independent of tau
  big = jnp.broadcast_to(logits, (40000, 5))
  tr = np.asarray(dydit.gumbel_sigmoid_gate(big, tau=5.0, train=True, rng=jax.random.key(1)))
  assert set(np.unique(tr)) <= {0.0, 1.0}
  np.testing.assert_allclose(tr.mean(0), jax.nn.sigmoid(logits), atol=0.01)
  other = np.asarray(dydit.gumbel_sigmoid_gate(big, train=True, rng=jax.random.key(2)))
  assert (other != tr).mean() > 0.1
  # straight-through: d gate / d logit = d sigmoid((logit + noise) / tau) / d logit
  noise = jax.random.logistic(jax.random.key(3), (5,))
  g = jax.grad(lambda z: dydit.gumbel_sigmoid_gate(z, tau=5.0, train=True,
                                                   rng=jax.random.key(3)).sum())(logits)
  s = jax.nn.sigmoid((logits + noise) / 5.0)
  np.testing.assert_allclose(np.asarray(g), np.asarray(s * (1 - s) / 5.0), rtol=1e-5)


def test_training_gates_use_the_gumbel_stream():
  dy = dydit.from_sit(base_model())
  p = noisy(init(dy), 0.05)
  p = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 0 if "bias" in jax.tree_util.keystr(path) and (
          "router" in jax.tree_util.keystr(path) or "mlp_head_2" in jax.tree_util.keystr(path))
      else a, p)
  x, t, y = inputs(dy)

  # one program, the Gumbel key an argument
  fwd = jax.jit(lambda v, k: dydit.forward_with_gates(
      dy, v, x, t, y, train=True, rngs={"gumbel": k, "label_dropout": jax.random.key(0)})[1])

  def run(seed):
    return fwd({"params": p}, jax.random.key(seed))

  a, b = run(1), run(2)
  assert any(bool(jnp.any(a[k] != b[k])) for k in ("head", "group", "token"))
  assert all(bool(jnp.all(a[k] == run(1)[k])) for k in a)
  np.testing.assert_array_equal(np.asarray(a["head"][..., 0]), 1.0)  # unit 0 forced on


def test_gate_noise_zero_gives_the_evaluation_masks():
  """gate_noise = 0 (the end of `gate_noise_decay_*`): the training gates are the evaluation
  masks (whatever the Gumbel key) and keep the straight-through gradient; noise 1 differs."""
  dy = dydit.from_sit(base_model())
  p = noisy(init(dy), 0.05)
  p = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 0 + 0.3 if "bias" in jax.tree_util.keystr(path) and (
          "router" in jax.tree_util.keystr(path) or "mlp_head_2" in jax.tree_util.keystr(path))
      else a, p)
  x, t, y = inputs(dy)
  ev = dydit.forward_with_gates(dy, {"params": p}, x, t, y)[1]

  # one program: the Gumbel key and the noise scale (traced) are arguments
  fwd = jax.jit(lambda v, k, noise: dydit.forward_with_gates(
      dy, v, x, t, y, train=True, rngs={"gumbel": k, "label_dropout": jax.random.key(0)},
      gate_noise=noise)[1])

  def run(seed, noise):
    return fwd({"params": p}, jax.random.key(seed), jnp.float32(noise))

  for seed in (1, 2):
    g = run(seed, jnp.float32(0.0))
    for k in ("head", "group", "token"):
      np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(ev[k]))
  noisy_gates = run(1, 1.0)
  assert any(bool(jnp.any(noisy_gates[k] != ev[k])) for k in ("head", "group", "token"))
  lg = jnp.array([-2.0, 0.5, 3.0])
  grad = jax.grad(lambda z: dydit.gumbel_sigmoid_gate(z, train=True, rng=KEY,
                                                      noise_scale=0.0).sum())(lg)
  s = jax.nn.sigmoid(lg / 5.0)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(s * (1 - s) / 5.0), rtol=1e-5)


@pytest.mark.parametrize("mediator_num", [0, 4])
def test_magnitude_reordering_preserves_the_function(mediator_num):
  dy, p = dydit64(mediator_num)
  x, t, y = inputs(dy)
  ref = np.asarray(apply(dy, {"params": p}, x, t, y, complete_model=True))
  q, (hp, gp) = dydit.reorder_units(dy, p)
  assert any(not np.array_equal(row, np.arange(4)) for row in list(hp) + list(gp))
  out = np.asarray(apply(dy, {"params": q}, x, t, y, complete_model=True))
  # only the summation order of proj / fc2 changes: float32 rounding, amplified over blocks
  np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  hi, gi = dydit.unit_importance(dy, q)
  assert np.all(np.diff(hi, axis=1) <= 1e-12) and np.all(np.diff(gi, axis=1) <= 1e-12)
  for r in ("attn_rate", "mlp_rate", "token_selection"):  # routers left alone
    jax.tree_util.tree_map(np.testing.assert_array_equal, q["blocks_0"][r], p["blocks_0"][r])


@pytest.mark.parametrize("mediator_num", [0, 4])
def test_sliced_segment_model_equals_dense_masks(mediator_num):
  """A narrowed segment model on gathered weights computes the dense model with those masks."""
  dy, p = dydit64(mediator_num)
  heads = [[1, 0, 1, 1], [1, 1, 0, 0]]
  groups = [[1, 1, 0, 1], [1, 0, 0, 0]]
  p = set_routers(p, 2, heads, groups, token_bias=0.0)
  x, t, y = inputs(dy, batch=4)
  variables = models.precompute_mediator_biases(dy, p)
  want, gates = with_gates(dy, variables, x, t, y)
  np.testing.assert_array_equal(np.asarray(gates["head"][0]), heads)
  hidx = [np.nonzero(h)[0] for h in heads]
  gidx = [np.nonzero(g)[0] for g in groups]
  seg = dy.clone(segment=tuple((len(h), len(g), 0) for h, g in zip(hidx, gidx)))
  sv = slice_vars(dy, variables, hidx, gidx)
  assert sv["params"]["blocks_1"]["attn"]["qkv"]["kernel"].shape == (64, 3 * 2 * 16)
  assert sv["params"]["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (64, 64)
  assert "attn_rate" not in sv["params"]["blocks_0"]
  got = apply(seg, sv, x, t, y)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
  # from the raw parameters too (mediator position tables sliced, not the cached biases)
  sp = slice_vars(dy, {"params": p}, hidx, gidx)
  np.testing.assert_allclose(np.asarray(apply(seg, sp, x, t, y)), np.asarray(want), atol=2e-6,
                             rtol=1e-5)
  # padding units with gate 0 (bucketed signature) change nothing
  hpad = [np.concatenate([h, np.nonzero(np.asarray(hh) == 0)[0][:1]]) for h, hh in
          zip(hidx, heads)]
  seg2 = dy.clone(segment=tuple((len(h), len(g), 0) for h, g in zip(hpad, gidx)))
  sv2 = slice_vars(dy, variables, hpad, gidx)
  gates2 = [(np.r_[np.ones(len(h) - 1), 0.0], np.ones(len(g))) for h, g in zip(hpad, gidx)]
  got2 = apply(seg2, sv2, x, t, y, unit_gates=gates2)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(want), atol=2e-6, rtol=1e-5)


def test_token_capacity_gather_scatter_and_dense_fallback():
  dy, p = dydit64(0)
  full = [[1, 1, 1, 1]] * 2
  p = set_routers(p, 2, full, full, token_bias=0.0)
  x, t, y = inputs(dy, batch=4)
  want, gates = with_gates(dy, {"params": p}, x, t, y)
  active = np.asarray(gates["token"]).reshape(4, 2, -1).sum((0, 2))
  rows = 4 * dy.num_tokens
  assert 0.2 * rows < active.min() and active.max() < rows and active.min() < active.max() - 4
  idx = [np.arange(4)] * 2
  sv = slice_vars(dy, {"params": p}, idx, idx)
  # both layers sparse; one sparse and one overflowing (dense fallback); both overflowing
  for cap in (int(active.max()), int(active.min() + active.max()) // 2, int(active.min()) - 3):
    seg = dy.clone(segment=((4, 4, cap), (4, 4, cap)))
    got, st = jax.jit(lambda v: seg.apply(v, x, t, y, mutable=[dydit.GATES]))(sv)
    counts = dydit.stack_sown(st, 2)["token_count"]
    np.testing.assert_array_equal(np.asarray(counts), active)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


def test_model_config_round_trip_and_errors():
  dy = dydit.from_sit(base_model(mediator_num=4), router_format="all", tau=3.0)
  cfg = models.model_config(dy)
  assert cfg["arch"] == "dydit" and cfg["router_format"] == "all"
  assert models.model_from_config(cfg) == dy
  assert "arch" not in models.model_config(base_model())
  with pytest.raises(ValueError, match="router_format"):
    dydit.from_sit(base_model(), router_format="nus")
  with pytest.raises(ValueError, match="arch"):
    models.build_model("SiT-S/2", arch="dit-moe")
  with pytest.raises(ValueError, match="one \\(heads, groups, token_capacity\\) per block"):
    dydit.from_sit(base_model(), segment=((1, 1, 0),))
  with pytest.raises(ValueError, match="heads and groups must be in"):
    dydit.from_sit(base_model(), segment=((0, 1, 0), (1, 1, 0)))
  dy2, _ = dydit64(0)
  with pytest.raises(ValueError, match="base params do not fit"):  # shapes only: no init to run
    dydit.init_from_base(dy2, models.abstract_params(base_model(hidden_size=24)), KEY)
