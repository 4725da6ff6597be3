"""EDT: parity with the official code (tests/golden/edt), the converter, the layout helpers,
FLOPs/params of the official sizes, and properties on configurations other than the golden's."""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import checkpoint, convert, flops, models
from edit_jax.models import amm, edt
from random_params import random_params as _random  # tests/random_params.py


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def golden(golden_dir):
  d = golden_dir / "edt"
  model, params = convert.load_torch_checkpoint(d / "state_dict.npz")
  return dict(dir=d, model=model, params=params, io=dict(np.load(d / "io.npz")),
              cfg=json.loads((d / "config.json").read_text()))


def _record(model, params, x, t, y, **kw):
  """(output, {official torch module name + ".in"/".out": tensor}) of one forward (traceable)."""
  rec = {}

  def icpt(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    if ctx.method_name == "__call__":
      path = ".".join(re.sub(r"_(\d+)$", r".\1", s) for s in ctx.module.path)
      rec[path + ".out"] = out
      if args:
        rec[path + ".in"] = args[0]
    return out

  with nn.intercept_methods(icpt):
    out = model.apply({"params": params}, x, t, y, **kw)
  return out, rec


def _capture(model, params, x, t, y, names):
  """(output, inputs/outputs of the module calls named (official torch names)), jitted; only the
  named tensors leave the program (fewer outputs: less to compile)."""
  def f(p, x, t, y):
    out, rec = _record(model, p, x, t, y, full_output=True)
    return out, {k: rec[k] for k in names}
  return jax.jit(f)(params, x, t, y)


# ----------------------------------------------------------------------------- golden parity
def test_inferred_config(golden):
  m, kw = golden["model"], golden["cfg"]["model_kwargs"]
  assert m.stage_depths == tuple(kw["stages_depth"]) and m.stage_dims == tuple(kw["dims"])
  assert m.stage_heads == tuple(kw["num_heads"]) and m.input_size == kw["input_size"]
  assert m.num_classes == kw["num_classes"] and m.learn_sigma and m.hidden_size == 16
  assert m.amm_blocks == tuple(golden["cfg"]["amm_blocks_global_index"]) == (23, 25)
  assert m.block_grids == tuple(golden["cfg"]["block_input_resolution"])
  assert m.uses_mid_mask  # size="XL" switches the mid mask on in the official constructor
  assert models.count_params(golden["params"]) == golden["cfg"]["trainable_params"]


@pytest.mark.parametrize("tag", ["plain", "amm"])
def test_outputs_and_activations_match_official(golden, tag):
  """Outputs to 1e-5 and every hooked module's input/output (71 plain, 13 with AMM)."""
  io, params = golden["io"], golden["params"]
  acts = np.load(golden["dir"] / "activations.npz")
  model = golden["model"].clone(amm_layers="none") if tag == "plain" else golden["model"]
  keys = [k for k in acts.files if k.startswith(f"{tag}.act.")]
  assert len(keys) == (71 if tag == "plain" else 13)
  out, rec = _capture(model, params, nhwc(io["x"]), io["t"], io["y"],
                      [k[len(tag) + 5:] for k in keys])
  np.testing.assert_allclose(np.asarray(out), nhwc(io[f"out_{tag}"]), atol=1e-5, rtol=0)
  for k in keys:
    ref = acts[k]
    got = np.asarray(rec[k[len(tag) + 5:]])
    np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0,
                               err_msg=k)
  # AMM changes the output by far more than the tolerance (the test can see a missing AMM)
  assert np.abs(io["out_amm"] - io["out_plain"]).max() > 100 * 1e-5


def test_log_bias_form_and_cfg_match_official(golden):
  """The flash-friendly AMM form gives the official AMM outputs; so do both CFG variants."""
  io, params = golden["io"], golden["params"]
  scale = float(io["cfg.scale"])

  lb, plain = golden["model"].clone(amm_mode="log_bias"), golden["model"].clone(amm_layers="none")
  cfg_in = (nhwc(io["cfg.x"]), io["cfg.t"], io["cfg.y"])

  def cfg(model, p, cx, ct, cy):
    return model.apply({"params": p}, cx, ct, cy, scale, method=edt.EDT.forward_with_cfg)

  out, cfg_amm, cfg_plain = jax.jit(lambda p, x, t, y, cx, ct, cy: (
      lb.apply({"params": p}, x, t, y, full_output=True), cfg(lb, p, cx, ct, cy),
      cfg(plain, p, cx, ct, cy)))(params, nhwc(io["x"]), io["t"], io["y"], *cfg_in)
  np.testing.assert_allclose(np.asarray(out), nhwc(io["out_amm"]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(cfg_amm), nhwc(io["cfg.out_amm"]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(cfg_plain), nhwc(io["cfg.out_plain"]), atol=1e-5, rtol=0)
  # guidance on the first 3 channels only: channel 3 of the two halves differ, 0-2 do not
  c = np.asarray(cfg_plain)
  np.testing.assert_array_equal(c[:2, ..., :3], c[2:, ..., :3])
  assert np.abs(c[:2, ..., 3:] - c[2:, ..., 3:]).max() > 1e-3


def test_amm_off_in_training():
  """Official: AMM only when the attention is not training; train forward == plain forward."""
  m = _tiny(amm_layers="all")
  p = _params(m)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t, y = jnp.array([0.2, 0.7]), jnp.array([1, 2])
  rngs = {"label_dropout": jax.random.key(0)}
  plain = m.clone(amm_layers="none")
  # the five forwards in one program (one compilation)
  amm_train, plain_train, amm_eval, plain_eval, amm_in_train = (np.asarray(a) for a in jax.jit(
      lambda p: [mm.apply({"params": p}, x, t, y, train=train, rngs=rngs) for mm, train in [
          (m, True), (plain, True), (m, False), (plain, False),
          (m.clone(amm_in_train=True), True)]])(p))
  np.testing.assert_array_equal(amm_train, plain_train)
  assert np.abs(amm_eval - plain_eval).max() > 1e-3
  assert np.abs(amm_in_train - plain_train).max() > 1e-3


def test_relative_position_index_matches_official(golden_dir):
  g = np.load(golden_dir / "edt" / "amm.npz")
  for n in (12, 6, 3):
    np.testing.assert_array_equal(edt.relative_position_index(n), g[f"relative_position_index_{n}x{n}"])


# ----------------------------------------------------------------------------- converter
def test_full_size_xl_names_and_shapes(golden_dir):
  """Every state_dict name and shape of the official EDT-XL/2 (released [6,4,4,7,7] layout)."""
  want = {}
  for line in (golden_dir / "edt" / "keys_EDT-XL-2_official_full.txt").read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    name, shape = line.split("\t")
    want[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
  model = models.build_model("EDT-XL/2", input_size=32, num_classes=1000)
  abstract = models.abstract_params(model)
  got = {k: tuple(v.shape) for k, v in convert.params_to_state_dict(abstract, model).items()}
  assert got == want
  assert models.count_params(abstract) == 698_523_098  # official trainable parameters
  # the converter reads such a state_dict back to the same layout
  cfg = convert.infer_config({k: np.zeros(s, np.float32) for k, s in want.items()})
  assert tuple(cfg["stage_depths"]) == (6, 4, 4, 7, 7) and cfg["input_size"] == 32
  assert tuple(cfg["stage_heads"]) == (18, 24, 30, 24, 18)


def test_roundtrip_and_errors(golden):
  sd = convert.read_state_dict(golden["dir"] / "state_dict.npz")
  back = convert.params_to_state_dict(golden["params"], golden["model"])
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_allclose(back[k], sd[k], atol=1e-6, err_msg=k)
  bad = dict(sd)
  bad["down_blocks.0.pos_embed"] = sd["down_blocks.0.pos_embed"] + 0.1
  with pytest.raises(ValueError, match="sin-cos"):
    convert.state_dict_to_params(bad, golden["model"])
  bad = {k: v for k, v in sd.items() if k != "concat_blocks.1.cat.weight"}
  with pytest.raises(ValueError, match="missing from checkpoint: concat_blocks_1/cat/kernel"):
    convert.state_dict_to_params(bad, golden["model"])
  wrong = golden["model"].clone(stage_dims=(16, 24, 40, 24, 16), stage_heads=(2, 4, 4, 3, 4))
  with pytest.raises(ValueError, match="wrong shape"):
    convert.state_dict_to_params(sd, wrong)
  with pytest.raises(ValueError, match="num_heads"):
    convert.infer_config(sd, num_heads=4)


def test_convert_cli_on_an_edt_state_dict(golden, tmp_path, capsys):
  convert.main([str(golden["dir"] / "state_dict.npz"), str(tmp_path / "cli")])
  out = capsys.readouterr().out
  assert "EDT stage_depths=[6, 4, 4, 7, 7]" in out and "amm_blocks=[23, 25]" in out
  assert "params=282,493" in out
  model, _ = convert.load_converted(tmp_path / "cli")
  assert model.stage_dims == (16, 24, 32, 24, 16)
  # official EDT weights were trained with DiT's Gaussian diffusion: recorded without a flag
  assert "objective=gaussian (from the file name or architecture" in out
  assert checkpoint.load_objective(str(tmp_path / "cli"))["objective"] == "gaussian"
  convert.main([str(golden["dir"] / "state_dict.npz"), str(tmp_path / "tr"),
                "--objective", "transport"])
  assert checkpoint.load_objective(str(tmp_path / "tr"))["objective"] == "transport"
  named = tmp_path / "EDT-S-2.npz"
  named.write_bytes((golden["dir"] / "state_dict.npz").read_bytes())
  assert checkpoint.load_objective(str(named))["objective"] == "gaussian"


def test_converted_dir_roundtrip(golden, tmp_path):
  model = golden["model"].clone(amm_mode="log_bias")
  convert.save_converted(tmp_path / "c", model, golden["params"])
  again, params = convert.load_converted(tmp_path / "c")
  assert isinstance(again, edt.EDT) and again.amm_mode == "log_bias"
  assert again.stage_depths == model.stage_depths
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(golden["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- layout helpers
def test_space_to_depth_and_pixel_shuffle():
  x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
  z = np.asarray(edt.space_to_depth(jnp.asarray(x)))
  assert z.shape == (2, 3, 3, 12)
  for k, (r, c) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):  # official order
    np.testing.assert_array_equal(z[..., 3 * k:3 * k + 3], x[:, r::2, c::2])
  u = np.asarray(edt.depth_to_space(jnp.asarray(z)))
  for p1 in (0, 1):
    for p2 in (0, 1):  # channel (2 p1 + p2) C + c -> pixel (2i + p1, 2j + p2)
      np.testing.assert_array_equal(u[:, p1::2, p2::2], z[..., 3 * (2 * p1 + p2):3 * (2 * p1 + p2) + 3])
  # the two official orders differ (chunks 1 and 2 swapped), so they are inverses only after the
  # swap: a port must not assume depth_to_space(space_to_depth(x)) == x
  swapped = np.concatenate([z[..., 0:3], z[..., 6:9], z[..., 3:6], z[..., 9:12]], -1)
  np.testing.assert_array_equal(np.asarray(edt.depth_to_space(jnp.asarray(swapped))), x)
  assert not np.array_equal(u, x)


def test_relative_position_index_property():
  for g in (2, 5, 8):
    idx = edt.relative_position_index(g)
    r, c = np.divmod(np.arange(g * g), g)
    dr, dc = np.subtract.outer(r, r), np.subtract.outer(c, c)
    # equal index <=> equal displacement; index range covers the table
    assert len(np.unique(idx)) == (2 * g - 1) ** 2 == idx.max() + 1
    np.testing.assert_array_equal(idx, (dr + g - 1) * (2 * g - 1) + dc + g - 1)


# ----------------------------------------------------------------------------- FLOPs / params
@pytest.mark.parametrize("name,gflops_official,params", [("EDT-S/2", 2.667, 38_329_146),
                                                         ("EDT-B/2", 10.218, 152_262_100)])
def test_published_flops_and_params(name, gflops_official, params):
  m = models.build_model(name, input_size=32)
  assert round(flops.gflops(m, norms=False), 3) == gflops_official      # spec 4.8
  assert models.count_params(models.abstract_params(m)) == params       # 38.33 M / 152.26 M
  assert flops.gflops(m) > flops.gflops(m, norms=False)


def test_flops_match_official_count_and_jaxpr(golden):
  m = golden["model"].clone(amm_layers="none")
  assert flops.breakdown(m).total - flops.breakdown(m).norms == golden["cfg"]["get_flops"]
  assert round(flops.dot_gflops(m) * 1e9) == golden["cfg"]["get_flops"]
  other = models.build_model("", arch="edt", input_size=16, patch_size=2, in_channels=3,
                             stage_depths=(1, 2, 1), stage_dims=(24, 40, 24),
                             stage_heads=(2, 5, 3), num_classes=4, amm_layers="none")
  b = flops.breakdown(other)
  assert round(flops.dot_gflops(other) * 1e9) == b.total - b.norms


def test_xl_layout_question():
  """The released EDT-XL/2 ([6,4,4,7,7], AMM in blocks 23, 25) costs 53.44 G / 698.52 M; the
  stated 51.83 G / 708.44 M belong to a 12/12/4 split of the 28 blocks (docs/edt.md)."""
  xl = models.build_model("EDT-XL/2", input_size=32)
  assert round(flops.gflops(xl, norms=False), 2) == 53.44
  alt = models.build_model("EDT-XL/2", input_size=32, stage_depths=(5, 5, 4, 7, 7))
  assert round(flops.gflops(alt, norms=False), 2) == 51.83
  assert round(models.count_params(models.abstract_params(alt)) / 1e6, 2) == 708.44


# ----------------------------------------------------------------------------- other configs
def _tiny(**kw):
  base = dict(arch="edt", input_size=16, patch_size=2, in_channels=3, stage_depths=(1, 2, 1),
              stage_dims=(24, 40, 24), stage_heads=(2, 5, 3), num_classes=4)
  base.update(kw)
  return models.build_model("", **base)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(stage_depths=(1, 1, 1, 1, 2), stage_dims=(16, 20, 36, 20, 16), stage_heads=(1, 2, 3, 4, 2),
         input_size=8, patch_size=1, mask_ratios=((0.4, 0.5), (0.1, 0.2))),
    dict(stage_depths=(3,), stage_dims=(32,), stage_heads=(4,)),
])
def test_arbitrary_layouts_jit_and_mask(kw):
  m = _tiny(**kw)
  p = _params(m)
  x = jax.random.normal(jax.random.key(1), (3, m.input_size, m.input_size, 3))
  t, y = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 3, 4])
  fwd = jax.jit(lambda p, k: (m.apply({"params": p}, x, t, y),
                              m.apply({"params": p}, x, t, y, masked=True, rngs={"mask": k})))
  plain, a = (np.asarray(v) for v in fwd(p, jax.random.key(5)))
  _, c = (np.asarray(v) for v in fwd(p, jax.random.key(6)))
  assert plain.shape == x.shape and np.abs(plain).max() > 1e-3
  if m.num_down:
    assert np.abs(a - plain).max() > 1e-4    # masking changes the output
    assert np.abs(a - c).max() > 1e-4        # masks come from the "mask" rng stream
    np.testing.assert_array_equal(a, np.asarray(fwd(p, jax.random.key(5))[1]))
  else:                                      # nothing to mask without a DownSample
    np.testing.assert_array_equal(a, plain)
  assert fwd._cache_size() == 1              # one compilation whatever the masks


def _params(m, key=3):
  """Every leaf N(0, 0.2) (nonzero adaLN gates: every block acts)."""
  return _random(m, key, 0.2)


def test_downsample_mask_zeroes_exactly_the_masked_fine_tokens():
  """A masked fine token contributes nothing to its merged token: with the mask, the DownSample
  output equals the unmasked one computed on inputs whose modulated chunk is zero."""
  ds = edt.DownSample(8, 12, 4)
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  c = jax.random.normal(jax.random.key(1), (2, 8))
  p = jax.jit(ds.init)(jax.random.key(2), x, c)
  keep = np.ones((2, 16), np.float32)
  keep[0, 5] = keep[1, 0] = 0.0
  out, ref, h = jax.jit(lambda p: (ds.apply(p, x, c, keep), ds.apply(p, x, c), ds.apply(
      p, x, c, method=lambda m, xx, cc: _modulated(m, xx, cc))))(p)
  out, ref, h = np.asarray(out), np.asarray(ref), np.asarray(h)
  # token 5 = (row 1, col 1) of a 4x4 grid -> merged token (0, 0), chunk x11 (the 4th)
  diff = np.abs(out - ref).max(-1)
  assert diff[0, 0] > 1e-4 and np.all(diff[0, 1:] == 0) and diff[1, 0] > 1e-4 and np.all(diff[1, 1:] == 0)
  w = np.asarray(nn.unbox(p)["params"]["reduction"]["kernel"])  # (32, 12)
  np.testing.assert_allclose((ref - out)[0, 0], h[0, 0, 24:32] @ w[24:32], atol=1e-5)


def _modulated(m, x, c):
  """The DownSample's modulated 4C features (before masking and reduction)."""
  from edit_jax.models import sit
  b, n, cin = x.shape
  z = edt.space_to_depth(x.reshape(b, 4, 4, cin)).reshape(b, 4, 4 * cin)
  mod = nn.unbox(m.variables["params"]["adaLN_modulation_1"])
  mm = nn.silu(c) @ mod["kernel"] + mod["bias"]
  return sit.modulate(sit.layer_norm(z), mm[:, :32], mm[:, 32:])


def test_random_keep_ratio():
  keep = np.asarray(edt.random_keep(jax.random.key(0), (64, 256), (0.4, 0.5)))
  frac = 1 - keep.mean()
  assert 0.38 < frac < 0.52 and set(np.unique(keep)) == {0.0, 1.0}
  keeps = jax.jit(jax.vmap(lambda k: edt.random_keep(k, (4, 4096), (0.1, 0.2))))(
      jax.vmap(jax.random.key)(jnp.arange(20)))               # 20 independent forwards' masks
  fracs = list(1 - np.asarray(keeps).mean((1, 2)))
  assert 0.09 < min(fracs) and max(fracs) < 0.21 and np.std(fracs) > 0.01  # p drawn per forward


def test_mid_mask_replaces_tokens_with_position_embedding():
  m = _tiny(stage_depths=(3, 1, 1), mid_mask=True, mid_mask_block=1,
            mask_ratios=((0.0, 0.0),), mid_mask_ratio=(0.5, 0.5))
  p = _params(m)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t, y = jnp.array([0.2, 0.7]), jnp.array([1, 2])
  rec = jax.jit(lambda p, k: _record(m, p, x, t, y, masked=True, rngs={"mask": k})[1])(
      p, jax.random.key(9))
  h_in = np.asarray(rec["blocks.1.in"])       # the tokens entering block 1 after the mid mask
  h_prev = np.asarray(rec["blocks.0.out"])
  pos = models.sincos_pos_embed(24, 8)
  replaced = np.all(np.isclose(h_in, pos[None], atol=1e-6), -1)
  kept = np.all(np.isclose(h_in, h_prev, atol=1e-6), -1)
  assert np.all(replaced | kept) and 0.3 < replaced.mean() < 0.7
  assert m.clone(mid_mask=None).uses_mid_mask is False
  assert models.build_model("EDT-XL/2").uses_mid_mask and not models.build_model("EDT-S/2").uses_mid_mask


def test_amm_blocks_and_validation():
  s = models.build_model("EDT-S/2")
  assert s.amm_blocks == (7, 10) and s.block_grids[7] == 8 and s.block_grids[10] == 16
  assert s.clone(amm_layers="official_alt").amm_blocks == (8,)
  assert models.build_model("EDT-XL/2", amm_layers="official_alt").amm_blocks == (24,)
  assert _tiny().amm_blocks == ()                       # no official list for this layout
  assert _tiny(amm_layers="all").amm_blocks == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="official stage layouts"):
    _tiny(amm_layers="official")
  for kw, msg in [(dict(stage_depths=(1, 1)), "odd number"),
                  (dict(stage_dims=(24, 40, 28), stage_heads=(2, 5, 2)), "width of encoder"),
                  (dict(stage_heads=(5, 5, 3)), "not divisible"),
                  (dict(input_size=14), "multiple of 2"),
                  (dict(mask_ratios=((0.4, 0.5), (0.1, 0.2))), "one \\(lo, hi\\) pair"),
                  (dict(mask_ratios=((0.6, 0.5),)), "0 <= lo <= hi < 1"),
                  (dict(amm_mode="flash"), "mode")]:
    with pytest.raises(ValueError, match=msg):
      _tiny(**kw)
  with pytest.raises(ValueError, match="unknown model name"):
    models.build_model("EDT-M/2")
  with pytest.raises(ValueError, match="NCHW"):
    s2 = _tiny()
    s2.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


def test_cfg_all_channels_variant():
  """guide_channels=None guides every epsilon channel (the DiT#41 fix); the learned-sigma
  channels keep each half's own output, as in the official 3-channel variant."""
  m = _tiny(in_channels=4)
  p = _params(m)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  xx = jnp.concatenate([x, x])
  t, y = jnp.array([0.4, 0.4, 0.4, 0.4]), jnp.array([1, 2, 4, 4])
  f = jax.jit(lambda p: (m.apply({"params": p}, xx, t, y, full_output=True),
                         m.apply({"params": p}, xx, t, y, 3.0, None,
                                 method=edt.EDT.forward_with_cfg),
                         m.apply({"params": p}, xx, t, y, 3.0, method=edt.EDT.forward_with_cfg)))
  raw, all_ch, three = (np.asarray(a) for a in f(p))
  guided = raw[2:] + 3.0 * (raw[:2] - raw[2:])
  np.testing.assert_allclose(all_ch[:2, ..., :4], guided[..., :4], atol=1e-5)
  np.testing.assert_allclose(all_ch[2:, ..., :4], guided[..., :4], atol=1e-5)
  np.testing.assert_array_equal(all_ch[..., 4:], raw[..., 4:])
  np.testing.assert_allclose(three[..., :3], all_ch[..., :3], atol=1e-6)
  np.testing.assert_array_equal(three[..., 3:], raw[..., 3:])
