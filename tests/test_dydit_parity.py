"""DyDiT computes the official alibaba-damo-academy/DyDiT function (goldens in tests/golden/dydit).

Outputs to 1e-5, masks exactly (entries whose saved router logit is within 1e-4 of the threshold
are skipped, as the golden README prescribes: float32 sigmoid rounding decides those).
"""
import numpy as np
import pytest

from edit_jax import convert, models
from edit_jax.models import dydit

VARIANTS = ["official", "centered"]
MASKS = [("head", "attn_weight_masks", "attn_rate"), ("group", "mlp_weight_masks", "mlp_rate"),
         ("token", "token_select", "token_selection")]


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=VARIANTS)
def golden(request, golden_dir):
  d = golden_dir / "dydit" / request.param
  model, params = convert.load_torch_checkpoint(d / "state_dict.npz", num_heads=8)
  io = dict(np.load(d / "io.npz"))
  out, gates = dydit.forward_with_gates(model, {"params": params}, nhwc(io["x"]), io["t"],
                                        io["y"], full_output=True, logits=True)
  return request.param, model, params, io, np.asarray(out), {k: np.asarray(v)
                                                            for k, v in gates.items()}, d


def _saved_logits(io, prefix, name, depth):
  """(B, L, U) logits saved by the golden's hooks on each block's router."""
  return np.stack([io[f"{prefix}.logits.blocks.{i}.{name}"] for i in range(depth)], axis=1)


def _with_forced(logits):
  """Logit table aligned with the (B, L, H) masks: the forced unit 0 gets +inf."""
  return np.concatenate([np.full(logits.shape[:-1] + (1,), np.inf), logits], axis=-1)


def test_converter_infers_dydit(golden):
  _, model, params, _, _, _, _ = golden
  assert isinstance(model, dydit.DyDiT)
  assert model.router_format == "forced" and model.router_units == 7
  assert model.token_router_ratio == 16 and model.num_heads == 8 and model.depth == 3
  assert params["blocks_0"]["attn_rate"]["router"]["kernel"].shape == (64, 7)
  assert params["blocks_2"]["token_selection"]["mlp_head_0"]["kernel"].shape == (64, 4)
  assert models.count_params(params) == 260069


def test_forward_matches_official(golden):
  _, _, _, io, out, _, _ = golden
  assert out.shape == nhwc(io["out"]).shape == (4, 12, 12, 8)
  np.testing.assert_allclose(out, nhwc(io["out"]), atol=1e-5, rtol=0)


def test_router_logits_match_official(golden):
  _, model, _, io, _, gates, _ = golden
  for ours, name in (("attn_logits", "attn_rate"), ("mlp_logits", "mlp_rate"),
                     ("token_logits", "token_selection")):
    np.testing.assert_allclose(gates[ours], _saved_logits(io, "dyn", name, model.depth),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("ours,ref,name", MASKS)
def test_masks_match_official_exactly(golden, ours, ref, name):
  variant, model, _, io, _, gates, _ = golden
  logits = _saved_logits(io, "dyn", name, model.depth)
  if ours != "token":
    logits = _with_forced(logits)
  decided = np.abs(logits) >= 1e-4
  assert decided.mean() > 0.99  # the skip rule removes at most a few entries
  got, want = gates[ours], io[ref]
  assert got.shape == want.shape
  np.testing.assert_array_equal(got[decided], want[decided])
  if variant == "centered":  # the variant with mixed masks really exercises the gating
    assert 0.2 < want.mean() < 0.9


def test_block_activations_match_official(golden):
  """Per-block outputs and the final layer (before unpatchify), via the dense forward's pieces."""
  _, model, params, io, _, _, _ = golden
  h = model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"], full_output=True,
                  capture_intermediates=lambda mdl, _: mdl.name and mdl.name.startswith(
                      ("blocks_", "final_layer")),
                  mutable=["intermediates"])[1]["intermediates"]
  for i in range(model.depth):
    np.testing.assert_allclose(np.asarray(h[f"blocks_{i}"]["__call__"][0]),
                               io[f"dyn.act.blocks.{i}.out"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(h["final_layer"]["__call__"][0]),
                             io["dyn.act.final_layer.out"], atol=1e-5, rtol=0)


def test_complete_model_matches_official(golden):
  variant, model, params, io, out, _, _ = golden
  comp = np.asarray(model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"],
                                complete_model=True, full_output=True))
  np.testing.assert_allclose(comp, nhwc(io["out_complete_model"]), atol=1e-5, rtol=0)
  if variant == "official":  # every gate on: the dynamic forward IS the complete model
    np.testing.assert_array_equal(out, comp)
  else:
    assert np.abs(out - comp).max() > 0.05


def test_cfg_matches_official(golden):
  _, model, params, io, _, _, _ = golden
  out = model.apply({"params": params}, nhwc(io["cfg.x"]), io["cfg.t"], io["cfg.y"],
                    float(io["cfg.scale"]), full_output=True, method=models.SiT.forward_with_cfg)
  np.testing.assert_allclose(np.asarray(out), nhwc(io["cfg.out"]), atol=1e-5, rtol=0)


def test_timestep_mask_table_matches_official(golden):
  """`DyDiT.route` over t = 0..999 gives the official t -> (head, group) mask table."""
  variant, model, params, io, _, _, _ = golden
  head, group, la, lm = (np.asarray(a) for a in model.apply(
      {"params": params}, io["sweep.t"], method=dydit.DyDiT.route))
  for got, want, logits, name in ((head, io["sweep.attn_weight_masks"], la, "attn_rate"),
                                  (group, io["sweep.mlp_weight_masks"], lm, "mlp_rate")):
    ref_logits = _saved_logits(io, "sweep", name, model.depth)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    decided = np.abs(_with_forced(ref_logits)) >= 1e-4
    np.testing.assert_array_equal(got[decided], want[decided])
  if variant == "centered":
    assert len({m.tobytes() for m in io["sweep.attn_weight_masks"]}) > 100


def test_first_release_router_format(golden):
  """The NUS release's routers have H outputs and no forced unit: the same network written in
  that format (unit 0 gets its own router row, always on) loads as router_format="all" and
  computes the same outputs and masks."""
  _, _, _, io, out, gates, d = golden
  sd = convert.read_state_dict(d / "state_dict.npz")
  for i in range(3):
    for r in ("attn_rate", "mlp_rate"):
      w, b = sd[f"blocks.{i}.{r}.router.weight"], sd[f"blocks.{i}.{r}.router.bias"]
      sd[f"blocks.{i}.{r}.router.weight"] = np.concatenate([np.zeros((1, 64), w.dtype), w])
      sd[f"blocks.{i}.{r}.router.bias"] = np.concatenate([np.full((1,), 30.0, b.dtype), b])
  model, params = convert.load_torch_checkpoint(sd, num_heads=8)
  assert model.router_format == "all" and model.router_units == 8
  out2, gates2 = dydit.forward_with_gates(model, {"params": params}, nhwc(io["x"]), io["t"],
                                          io["y"], full_output=True)
  np.testing.assert_array_equal(np.asarray(out2), out)
  for k in ("head", "group", "token"):
    np.testing.assert_array_equal(np.asarray(gates2[k]), gates[k])


def test_state_dict_round_trip_names(golden_dir):
  d = golden_dir / "dydit" / "centered"
  sd = dict(np.load(d / "state_dict.npz"))
  model, params = convert.load_torch_checkpoint(sd, num_heads=8)
  back = convert.params_to_state_dict(params, model)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converted_directory_round_trip(golden_dir, tmp_path):
  d = golden_dir / "dydit" / "centered"
  model, params = convert.load_torch_checkpoint(d / "state_dict.npz", num_heads=8)
  out_dir = convert.save_converted(tmp_path / "conv", model, params)
  model2, params2 = convert.load_converted(out_dir)
  assert isinstance(model2, dydit.DyDiT) and model2 == model
  io = np.load(d / "io.npz")
  a = model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"])
  b = model2.apply({"params": params2}, nhwc(io["x"]), io["t"], io["y"])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_converter_rejects_wrong_head_count(golden_dir):
  with pytest.raises(ValueError, match="router format"):
    convert.load_torch_checkpoint(golden_dir / "dydit" / "centered" / "state_dict.npz",
                                  num_heads=4)
