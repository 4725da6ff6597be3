"""SD-VAE port: shapes, conversion from diffusers-named state dicts, parity with diffusers' own
AutoencoderKL (stored reference outputs), helpers, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edit_jax.eval import vae, weights

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def diffusers_vae_shapes(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         latent_channels=4, in_channels=3, out_channels=3, legacy_attention=False):
  """Independent listing of diffusers AutoencoderKL state-dict names -> PyTorch shapes."""
  sd = {}

  def conv(name, cin, cout, k):
    sd[f"{name}.weight"] = (cout, cin, k, k)
    sd[f"{name}.bias"] = (cout,)

  def norm(name, c):
    sd[f"{name}.weight"] = (c,)
    sd[f"{name}.bias"] = (c,)

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cin, cout, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.conv_shortcut", cin, cout, 1)

  def mid(name, c):
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    names = ("query", "key", "value", "proj_attn") if legacy_attention else (
        "to_q", "to_k", "to_v", "to_out.0")
    for n in names:
      sd[f"{name}.attentions.0.{n}.weight"] = (c, c)
      sd[f"{name}.attentions.0.{n}.bias"] = (c,)
    resnet(f"{name}.resnets.1", c, c)

  ch = block_out_channels
  conv("encoder.conv_in", in_channels, ch[0], 3)
  cin = ch[0]
  for i, c in enumerate(ch):
    for j in range(layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
    cin = c
    if i < len(ch) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
  mid("encoder.mid_block", ch[-1])
  norm("encoder.conv_norm_out", ch[-1])
  conv("encoder.conv_out", ch[-1], 2 * latent_channels, 3)
  conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
  conv("post_quant_conv", latent_channels, latent_channels, 1)
  rch = ch[::-1]
  conv("decoder.conv_in", latent_channels, rch[0], 3)
  mid("decoder.mid_block", rch[0])
  cin = rch[0]
  for i, c in enumerate(rch):
    for j in range(layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
    cin = c
    if i < len(rch) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
  norm("decoder.conv_norm_out", rch[-1])
  conv("decoder.conv_out", rch[-1], out_channels, 3)
  return sd


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def tiny_model():
  return vae.AutoencoderKL(**TINY)


def test_sd_vae_shapes_match_diffusers_listing():
  shapes = vae.vae_param_shapes()
  flat = traverse_util.flatten_dict(shapes)
  assert len(flat) == 248
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == 83_653_863  # the SD VAE's size
  # full-size conversion without allocating: zero-stride views of the official names/shapes
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in diffusers_vae_shapes().items()}
  params = vae.convert_vae_state_dict(sd)
  assert params["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (512, 512)
  assert params["decoder"]["up_blocks_3"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 256, 128)
  model = vae.SD_VAE
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  mean, logvar = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode), shapes, x)
  assert mean.shape == logvar.shape == (2, 32, 32, 4)
  z = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
  img = jax.eval_shape(lambda p, z: vae.vae_decode(p, z), shapes, z)
  assert img.shape == (2, 256, 256, 3) and img.dtype == jnp.uint8


@pytest.mark.parametrize("legacy", [False, True])
def test_convert_official_names_lands_transposed(legacy):
  model = tiny_model()
  shapes = diffusers_vae_shapes(**{k: v for k, v in TINY.items() if k != "norm_num_groups"},
                                legacy_attention=legacy)
  sd = random_state_dict(shapes)
  if legacy:  # some exports store the attention linears as 1x1 convs
    k = "encoder.mid_block.attentions.0.query.weight"
    sd[k] = sd[k][:, :, None, None]
  p = vae.convert_vae_state_dict(sd, model)
  np.testing.assert_array_equal(p["encoder"]["conv_in"]["kernel"],
                                sd["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["bias"],
                                sd["decoder.up_blocks.0.upsamplers.0.conv.bias"])
  np.testing.assert_array_equal(p["decoder"]["conv_norm_out"]["scale"], sd["decoder.conv_norm_out.weight"])
  q = "query" if legacy else "to_q"
  o = "proj_attn" if legacy else "to_out.0"
  np.testing.assert_array_equal(p["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                np.reshape(sd[f"encoder.mid_block.attentions.0.{q}.weight"], (16, 16)).T)
  np.testing.assert_array_equal(p["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                                sd[f"decoder.mid_block.attentions.0.{o}.weight"].T)
  np.testing.assert_array_equal(p["quant_conv"]["kernel"][0, 0], sd["quant_conv.weight"][:, :, 0, 0].T)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(p, x)
  assert mean.shape == (2, 4, 4, 4) and np.isfinite(np.asarray(mean)).all()
  assert float(logvar.max()) <= 20.0


def test_conv_and_linear_layout_semantics_against_numpy():
  """A PyTorch-layout conv (cross-correlation, NCHW) equals the converted NHWC Flax conv."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)  # (O, I, kh, kw), non-square kernel
  b = rng.standard_normal(5).astype(np.float32)
  x = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)  # NCHW
  ref = np.zeros((1, 5, 4, 6), np.float32)
  for i in range(4):
    for j in range(6):
      ref[0, :, i, j] = np.einsum("oikl,ikl->o", w, x[0, :, i:i + 3, j:j + 2]) + b
  kernel = weights._to_flax("conv", w)  # pylint: disable=protected-access
  out = nn.Conv(5, (3, 2), padding="VALID").apply({"params": {"kernel": kernel, "bias": b}},
                                                  x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
  wl = rng.standard_normal((4, 3)).astype(np.float32)  # torch Linear (out, in)
  v = rng.standard_normal((2, 3)).astype(np.float32)
  out = nn.Dense(4).apply({"params": {"kernel": weights._to_flax("linear", wl), "bias": np.zeros(4)}}, v)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(out), v @ wl.T, rtol=1e-5, atol=1e-6)


def test_mismatched_state_dict_lists_every_problem():
  model = tiny_model()
  sd = random_state_dict(diffusers_vae_shapes(block_out_channels=(8, 16), layers_per_block=1))
  del sd["encoder.conv_in.weight"]
  del sd["decoder.mid_block.attentions.0.to_v.bias"]
  sd["encoder.extra.weight"] = np.zeros(3, np.float32)
  sd["quant_conv.bias"] = np.zeros(9, np.float32)
  with pytest.raises(weights.StateDictMismatchError) as e:
    vae.convert_vae_state_dict(sd, model)
  msg = str(e.value)
  assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
  assert "encoder.conv_in.weight (8, 3, 3, 3)" in msg
  assert "decoder.mid_block.attentions.0.to_v.bias (or decoder.mid_block.attentions.0.value.bias)" in msg
  assert "encoder.extra.weight" in msg
  assert "quant_conv.bias: (9,) -> (8,)" in msg
  assert e.value.missing and e.value.unexpected and e.value.misshaped


def test_compvis_names_get_a_hint():
  sd = {"encoder.down.0.block.0.norm1.weight": np.zeros(8, np.float32)}
  with pytest.raises(weights.StateDictMismatchError, match="original CompVis/LDM names"):
    vae.convert_vae_state_dict(sd, tiny_model())


def test_missing_file_names_the_checkpoint(tmp_path, monkeypatch):
  monkeypatch.delenv(vae.WEIGHTS_ENV, raising=False)
  with pytest.raises(weights.MissingWeightsError) as e:
    vae.load_vae_params(tmp_path / "nowhere.safetensors")
  assert "diffusion_pytorch_model.safetensors" in str(e.value)
  assert "stabilityai/sd-vae-ft-ema" in str(e.value)
  with pytest.raises(weights.MissingWeightsError, match="no file given.*EDIT_JAX_VAE"):
    vae.load_vae_params(None)
  with pytest.raises(weights.MissingWeightsError, match="not found at"):
    vae.load_vae_params(tmp_path)  # a folder without the file


def test_load_from_safetensors_folder_and_helpers(tmp_path):
  from safetensors.numpy import save_file
  model = tiny_model()
  sd = random_state_dict(diffusers_vae_shapes(block_out_channels=(8, 16), layers_per_block=1))
  save_file(sd, str(tmp_path / vae.WEIGHTS_FILENAME))
  params = vae.load_vae_params(tmp_path, model)  # a folder holding the file
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                sd["decoder.conv_out.weight"].transpose(2, 3, 1, 0))
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  x = jnp.asarray(imgs / 127.5 - 1.0, jnp.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  lat = vae.encode_to_latents(params, imgs, jax.random.key(0), model=model, sample=False)
  assert lat.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(np.asarray(lat), 0.18215 * np.asarray(mean), rtol=1e-5, atol=1e-6)
  lat_f = vae.encode_to_latents(params, imgs / 127.5 - 1.0, jax.random.key(0), model=model, sample=False)
  np.testing.assert_allclose(np.asarray(lat_f), np.asarray(lat), atol=1e-6)  # uint8 == [-1, 1] input
  key = jax.random.key(1)
  s1 = vae.encode_to_latents(params, imgs, key, model=model)
  want = 0.18215 * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape))
  np.testing.assert_allclose(np.asarray(s1), np.asarray(want), rtol=1e-5, atol=1e-6)
  s2 = vae.encode_to_latents(params, imgs, jax.random.key(2), model=model)
  assert not np.allclose(np.asarray(s1), np.asarray(s2))
  out = vae.decode_latents(params, lat, model=model)
  assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(vae.decode_latents(params, lat, model=model, batch_size=1), out)
  # decode_latents == to_uint8(decode(latents / 0.18215))
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
  np.testing.assert_array_equal(np.asarray(vae.to_uint8(dec(params, lat / 0.18215))), out)


def test_to_uint8_matches_official_postprocessing():
  x = jnp.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
  # clamp(127.5 x + 128, 0, 255) then truncation: 0.5 -> 0, 191.75 -> 191, 255.5 -> 255
  np.testing.assert_array_equal(np.asarray(vae.to_uint8(x)), [0, 0, 128, 191, 255, 255])


def test_bad_inputs_raise_helpful_errors():
  params = vae.convert_vae_state_dict(
      random_state_dict(diffusers_vae_shapes(block_out_channels=(8, 16), layers_per_block=1)), tiny_model())
  with pytest.raises(ValueError, match="NHWC"):
    vae.encode_to_latents(params, np.zeros((1, 3, 8, 8), np.uint8), jax.random.key(0), model=tiny_model())
  with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
    vae.encode_to_latents(params, np.full((1, 8, 8, 3), 200.0), jax.random.key(0), model=tiny_model())
  with pytest.raises(ValueError, match="divisible by 2"):
    vae.encode_to_latents(params, np.zeros((1, 7, 8, 3), np.uint8), jax.random.key(0), model=tiny_model())
  with pytest.raises(ValueError, match="latents must be NHWC"):
    vae.decode_latents(params, np.zeros((1, 4, 4, 4, 1)), model=tiny_model())


def test_matches_diffusers_autoencoderkl_reference(golden_dir):
  """diffusers' own AutoencoderKL (PyTorch, diffusers 0.42.1) on seeded weights, stored once in
  tests/golden/vae_tiny_ref.npz (tests/golden/make_torch_refs.py): encoder posterior mean/logvar
  and decode(mean) must match the Flax port on the same weights and input."""
  ref = dict(np.load(golden_dir / "vae_tiny_ref.npz"))
  sd = {k[3:]: v for k, v in ref.items() if k.startswith("sd/")}
  model = tiny_model()
  p = vae.convert_vae_state_dict(sd, model)
  x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(p, x)
  scale = np.abs(ref["mean"]).max()
  assert scale > 0.1  # a non-trivial reference
  np.testing.assert_allclose(np.asarray(mean), ref["mean"].transpose(0, 2, 3, 1), atol=5e-6 * scale)
  np.testing.assert_allclose(np.asarray(logvar), ref["logvar"].transpose(0, 2, 3, 1),
                             atol=5e-6 * np.abs(ref["logvar"]).max())
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(p, mean)
  np.testing.assert_allclose(np.asarray(dec), ref["decoded"].transpose(0, 2, 3, 1),
                             atol=5e-6 * np.abs(ref["decoded"]).max())


def test_torch_bin_state_dict_loads_without_torch(golden_dir):
  """tests/golden/vae_tiny_state_dict.bin is torch.save(AutoencoderKL.state_dict()) (diffusers'
  .bin format): read by edit_jax.pt_reader without torch, tensor for tensor."""
  ref = dict(np.load(golden_dir / "vae_tiny_ref.npz"))
  want = {k[3:]: v for k, v in ref.items() if k.startswith("sd/")}
  got = weights.load_state_dict(golden_dir / "vae_tiny_state_dict.bin")
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  params = vae.load_vae_params(golden_dir / "vae_tiny_state_dict.bin", tiny_model())
  np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"],
                                want["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
