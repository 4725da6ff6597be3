"""The Flax SiT computes the same function as the official PyTorch code (golden tensors)."""
import numpy as np
import pytest

from edit_jax import convert, models

TAGS = ["mediator_tiny", "vanilla_tiny"]


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=TAGS)
def loaded(request, golden_dir):
  tag = request.param
  model, params = convert.load_torch_checkpoint(golden_dir / f"{tag}_state_dict.npz", num_heads=4)
  io = dict(np.load(golden_dir / f"{tag}_io.npz"))
  return tag, model, params, io


def test_inferred_config(loaded):
  tag, model, _, io = loaded
  import json
  cfg = json.loads(str(io["config"]))
  assert model.input_size == cfg["input_size"] and model.patch_size == cfg["patch_size"]
  assert model.hidden_size == cfg["hidden_size"] and model.depth == cfg["depth"]
  assert model.num_classes == cfg["num_classes"] and model.learn_sigma
  assert model.mediator_num == cfg.get("mediator_num", 0)


def test_forward_matches_official(loaded):
  _, model, params, io = loaded
  out = model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"])
  assert out.shape == nhwc(io["out"]).shape
  np.testing.assert_allclose(np.asarray(out), nhwc(io["out"]), atol=1e-5, rtol=0)


def test_cfg_matches_official(loaded):
  _, model, params, io = loaded
  out = model.apply({"params": params}, nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"],
                    float(io["cfg_scale"]), method=models.SiT.forward_with_cfg)
  np.testing.assert_allclose(np.asarray(out), nhwc(io["cfg_out"]), atol=1e-5, rtol=0)


def test_cfg_all_channels_option(loaded):
  _, model, params, io = loaded
  x, t, y, s = nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"], float(io["cfg_scale"])
  raw = np.asarray(model.apply({"params": params}, np.concatenate([x[:3], x[:3]]), t, y))
  out = np.asarray(model.apply({"params": params}, x, t, y, s, guide_channels=None,
                               method=models.SiT.forward_with_cfg))
  guided = raw[3:] + s * (raw[:3] - raw[3:])
  np.testing.assert_allclose(out[:3], guided, atol=1e-5)
  np.testing.assert_allclose(out[3:], guided, atol=1e-5)


def test_precomputed_biases_same_output(golden_dir):
  model, params = convert.load_torch_checkpoint(golden_dir / "mediator_tiny_state_dict.npz")
  io = np.load(golden_dir / "mediator_tiny_io.npz")
  variables = models.precompute_mediator_biases(model, params)
  assert "mediator_cache" in variables
  out = model.apply(variables, nhwc(io["x"]), io["t"], io["y"])
  np.testing.assert_allclose(np.asarray(out), nhwc(io["out"]), atol=1e-5, rtol=0)


def test_pos_embed_formula(golden_dir):
  sd = np.load(golden_dir / "vanilla_tiny_state_dict.npz")
  np.testing.assert_allclose(models.sincos_pos_embed(96, 8)[None], sd["pos_embed"], atol=1e-5)
