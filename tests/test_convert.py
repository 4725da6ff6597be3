"""Official checkpoint loading: formats, architecture inference, mismatch messages, Orbax CLI."""
import json

import jax
import numpy as np
import pytest

from edit_jax import convert, models


@pytest.fixture(scope="module")
def med_sd(golden_dir):
  return dict(np.load(golden_dir / "mediator_tiny_state_dict.npz"))


@pytest.fixture(scope="module")
def io(golden_dir):
  return dict(np.load(golden_dir / "mediator_tiny_io.npz"))


def _out(model, params, io):
  x = io["x"].transpose(0, 2, 3, 1)
  return np.asarray(jax.jit(model.apply)({"params": params}, x, io["t"], io["y"]))


def test_infer_config(med_sd):
  cfg = convert.infer_config(med_sd)
  assert cfg == dict(hidden_size=96, in_channels=4, patch_size=2, depth=2, num_heads=4,
                     num_classes=10, class_dropout_prob=0.1, learn_sigma=True, mediator_num=16,
                     mediator_layers=None, mlp_ratio=4.0, input_size=16)


def test_training_checkpoint_uses_ema_by_default(med_sd, io):
  noisy = {k: v + 1.0 for k, v in med_sd.items()}
  ckpt = {"model": noisy, "ema": med_sd, "opt": {}, "args": None, "train_steps": 3}
  model, params = convert.load_torch_checkpoint(ckpt)
  ref = io["out"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(_out(model, params, io), ref, atol=1e-5)
  model2, params2 = convert.load_torch_checkpoint(ckpt, use_ema=False)
  assert np.abs(_out(model2, params2, io) - ref).max() > 1e-2
  # DDP prefix and flattened npz-style training checkpoints
  flat = {f"ema.module.{k}": v for k, v in med_sd.items()}
  flat.update({f"model.module.{k}": v for k, v in noisy.items()})
  _, params3 = convert.load_torch_checkpoint(flat)
  np.testing.assert_allclose(_out(model, params3, io), ref, atol=1e-5)


def test_safetensors_and_roundtrip(tmp_path, med_sd, io):
  from safetensors.numpy import save_file
  path = tmp_path / "m.safetensors"
  save_file(med_sd, str(path))
  model, params = convert.load_torch_checkpoint(path)
  back = convert.params_to_state_dict(params, model)
  assert set(back) == set(med_sd)
  for k in med_sd:
    np.testing.assert_allclose(back[k], med_sd[k], atol=1e-6, err_msg=k)


def test_partial_mediator_layers_inferred():
  model = models.build_model("SiT-S/2", input_size=16, depth=3, hidden_size=64, num_heads=2,
                             num_classes=7, mediator_num=4, mediator_layers=2, learn_sigma=False)
  params = models.init_params(model, jax.random.key(0))
  sd = convert.params_to_state_dict(params, model)
  assert "blocks.1.attn.an_bias" in sd and "blocks.2.attn.an_bias" not in sd
  model2, params2 = convert.load_torch_checkpoint(sd)
  assert model2.mediator_blocks == (0, 1) and model2.num_classes == 7 and not model2.learn_sigma
  assert model2.num_heads == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_mismatch_lists_every_offending_tensor(med_sd):
  sd = dict(med_sd)
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  sd["blocks.0.attn.proj.weight"] = np.zeros((96, 95), np.float32)
  with pytest.raises(ValueError) as e:
    convert.load_torch_checkpoint(sd)
  msg = str(e.value)
  assert "missing from checkpoint: blocks_1/mlp/fc2/bias" in msg
  assert "unexpected in checkpoint: blocks.0.attn.extra (3,)" in msg
  assert "wrong shape: blocks.0.attn.proj.weight: checkpoint (96, 95)" in msg
  # Forcing a different architecture (wrong input size) names the position-dependent tensors.
  with pytest.raises(ValueError) as e:
    convert.load_torch_checkpoint(med_sd, input_size=32)
  assert "wrong shape: pos_embed" in str(e.value) and "ah_bias" in str(e.value)


def test_non_standard_width_needs_heads(golden_dir):
  sd = dict(np.load(golden_dir / "vanilla_tiny_state_dict.npz"))
  with pytest.raises(ValueError, match="pass num_heads"):
    convert.load_torch_checkpoint(sd)


def test_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.load_torch_checkpoint(tmp_path / "nope.pt")
  p = tmp_path / "x.ckpt"
  p.write_text("hi")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.load_torch_checkpoint(p)
  with pytest.raises(ValueError, match="not an official SiT state_dict"):
    convert.load_torch_checkpoint({"foo": np.zeros(2)})


def test_cli_writes_orbax_and_never_overwrites(tmp_path, golden_dir, io, capsys):
  out = tmp_path / "conv"
  convert.main([str(golden_dir / "mediator_tiny_state_dict.npz"), str(out)])
  assert "mediator_num=16" in capsys.readouterr().out
  meta = json.loads((out / "model_config.json").read_text())
  assert meta["model_config"]["mediator_num"] == 16
  model, params = convert.load_converted(out)
  np.testing.assert_allclose(_out(model, params, io), io["out"].transpose(0, 2, 3, 1), atol=1e-5)
  before = sorted(p.name for p in out.rglob("*"))
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.main([str(golden_dir / "mediator_tiny_state_dict.npz"), str(out)])
  assert sorted(p.name for p in out.rglob("*")) == before
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    convert.load_converted(tmp_path)


def test_official_pt_file_without_torch(golden_dir, med_sd, io):
  """tests/golden/mediator_tiny_ckpt.pt was written by torch.save (torch 2.13, see the README):
  an official-style training checkpoint read here without torch (edit_jax.pt_reader)."""
  path = golden_dir / "mediator_tiny_ckpt.pt"
  model, params = convert.load_torch_checkpoint(path)  # "ema" by default
  ref = io["out"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(_out(model, params, io), ref, atol=1e-5)
  back = convert.params_to_state_dict(params, model)
  for k in med_sd:
    np.testing.assert_array_equal(back[k], med_sd[k], err_msg=k)
  # "model" differs from "ema" in final_layer.linear.bias (+1): the choice is honoured.
  sd = convert.read_state_dict(path, use_ema=False)
  np.testing.assert_array_equal(sd["final_layer.linear.bias"], med_sd["final_layer.linear.bias"] + 1)
  np.testing.assert_array_equal(sd["blocks.1.attn.an_bias"], med_sd["blocks.1.attn.an_bias"])


def test_pt_reader_tensors_and_args(golden_dir, med_sd):
  from edit_jax import pt_reader  # noqa: PLC0415
  obj = pt_reader.load(golden_dir / "mediator_tiny_ckpt.pt")
  assert obj["args"].global_batch_size == 256 and obj["train_steps"] == 3
  st = obj["opt"]["state"][0]
  w = med_sd["blocks.0.mlp.fc1.weight"]
  t = np.asarray(st["exp_avg_t"])  # a transposed view: strides (1, 96) over fc1's storage
  assert t.shape == w.T.shape and t.flags["C_CONTIGUOUS"]
  np.testing.assert_array_equal(t, w.T)
  bf = np.asarray(st["bf16"])
  assert bf.dtype.name == "bfloat16"
  np.testing.assert_array_equal(bf.astype(np.float32), np.arange(6.0).reshape(2, 3))
  ids = np.asarray(st["ids"])
  assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 2, 3, 4]
  assert np.asarray(st["step"]).shape == () and float(np.asarray(st["step"])) == 3.0


def _zip_pickle(path, payload: bytes):
  import zipfile  # noqa: PLC0415
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    import os  # noqa: PLC0415
    return (os.makedirs, (self.target,))


def test_pt_reader_refuses_code_and_explains(tmp_path):
  import pickle  # noqa: PLC0415
  from edit_jax import pt_reader  # noqa: PLC0415
  target = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  _zip_pickle(path, pickle.dumps({"model": _Evil(str(target))}, protocol=2))
  with pytest.raises(pt_reader.UnsafePickleError, match=r"refers to (posix|os)\.makedirs.*cannot "
                     r"run code"):
    pt_reader.load(path)
  assert not target.exists()
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(pt_reader.LegacyFormatError, match="not a zip-format torch.save file"):
    pt_reader.load(legacy)
  # The converter turns both into one clear error (torch is not installed in CI).
  with pytest.raises((ValueError, pickle.UnpicklingError), match="torch"):
    convert.load_torch_checkpoint(path)


def test_pt_reader_truncated_storage(tmp_path, golden_dir):
  import zipfile  # noqa: PLC0415
  from edit_jax import pt_reader  # noqa: PLC0415
  src = zipfile.ZipFile(golden_dir / "mediator_tiny_ckpt.pt")
  bad = tmp_path / "trunc.pt"
  with zipfile.ZipFile(bad, "w") as z:
    for n in src.namelist():
      data = src.read(n)
      z.writestr(n, data[:len(data) // 2] if n.endswith("/data/0") else data)
  obj = pt_reader.load(bad)
  with pytest.raises(ValueError, match="truncated or corrupt"):
    for v in obj["ema"].values():
      np.asarray(v)
