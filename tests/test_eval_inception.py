"""FID InceptionV3 port: shapes, pytorch-fid state-dict conversion, layer semantics, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edit_jax.eval import inception as inc
from edit_jax.eval import weights

# Independent spot checks of pytorch-fid / torchvision Inception3 names -> PyTorch shapes.
KNOWN = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6d.branch7x7_2.conv.weight": (160, 160, 1, 7),
    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def torch_names_and_shapes():
  """All expected PyTorch names/shapes, derived through the converter's naming rule."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(inc.inception_param_shapes()).items():
    names, kind = inc._inception_rule(path, leaf.shape)  # pylint: disable=protected-access
    out[names[0]] = weights._torch_shape(kind, tuple(leaf.shape))  # pylint: disable=protected-access
  return out


def random_state_dict(seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in torch_names_and_shapes().items():
    if k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
    else:
      sd[k] = (scale * rng.standard_normal(s)).astype(np.float32)
  return sd


def test_structure_matches_pytorch_fid_inception():
  names = torch_names_and_shapes()
  assert len(names) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 BN tensors) + fc weight/bias
  for k, s in KNOWN.items():
    assert names[k] == s, k
  flat = traverse_util.flatten_dict(inc.inception_param_shapes())
  # torchvision inception_v3 without aux (23,834,568 params incl. a 1000-way fc) + 1008-way fc
  # + BN running statistics (2 x 17,216 channels)
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == 23_834_568 + 8 * 2048 + 8 + 2 * 17_216


def test_output_shapes_at_adm_resolution():
  shapes = inc.inception_param_shapes()
  out = jax.eval_shape(lambda p, x: inc.InceptionV3().apply({"params": p}, x), shapes,
                       jax.ShapeDtypeStruct((3, 256, 256, 3), jnp.uint8))
  assert out["pool"].shape == (3, 2048)
  assert out["spatial"].shape == (3, 17 * 17 * 7)  # mixed_6/conv[..., :7] flattened: 2023
  assert out["logits"].shape == (3, 1008)


def test_convert_and_forward_small_input():
  sd = random_state_dict()
  sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(7)  # ignored
  p = inc.convert_inception_state_dict(sd)
  np.testing.assert_array_equal(p["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"],
                                sd["Mixed_6d.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["Mixed_7c"]["branch1x1"]["bn"]["var"], sd["Mixed_7c.branch1x1.bn.running_var"])
  np.testing.assert_array_equal(p["Conv2d_2a_3x3"]["bn"]["mean"], sd["Conv2d_2a_3x3.bn.running_mean"])
  np.testing.assert_array_equal(p["Conv2d_2a_3x3"]["bn"]["scale"], sd["Conv2d_2a_3x3.bn.weight"])
  np.testing.assert_array_equal(p["fc_kernel"], sd["fc.weight"].T)
  model = inc.InceptionV3(resize_to=None)  # 75x75 is the smallest input the network takes
  imgs = np.random.default_rng(1).integers(0, 256, (2, 75, 75, 3)).astype(np.uint8)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True))
  out, state = fwd(p, imgs)
  assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 3 * 3 * 7)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  # sFID features are Mixed_6d.branch1x1's (post-ReLU) output, first 7 channels, (h, w, c) order
  b1 = np.asarray(state["intermediates"]["Mixed_6d"]["branch1x1"]["__call__"][0])
  np.testing.assert_array_equal(np.asarray(out["spatial"]), b1[..., :7].reshape(2, -1))
  # IS logits: pool @ fc.weight^T without the bias (as the ADM evaluator)
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(out["pool"]) @ sd["fc.weight"].T,
                             rtol=1e-4, atol=1e-5)
  # uint8 and float [0, 255] inputs are the same thing
  out_f, _ = fwd(p, imgs.astype(np.float32))
  np.testing.assert_allclose(np.asarray(out_f["pool"]), np.asarray(out["pool"]), atol=1e-6)


def test_basic_conv_semantics_against_numpy():
  """Asymmetric (1, 7) kernel, padding (0, 3), BN eps 1e-3 and ReLU, computed in NCHW numpy."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 3, 1, 7)).astype(np.float32)
  g, b = rng.uniform(0.5, 2, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  mu, var = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
  x = rng.standard_normal((1, 3, 5, 6)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (3, 3)))
  conv = np.zeros((1, 4, 5, 6), np.float32)
  for i in range(5):
    for j in range(6):
      conv[0, :, i, j] = np.einsum("oikl,ikl->o", w, xp[0, :, i:i + 1, j:j + 7])
  bn = lambda v: v[None, :, None, None]  # noqa: E731
  ref = np.maximum((conv - bn(mu)) / np.sqrt(bn(var) + 1e-3) * bn(g) + bn(b), 0)
  sd = {"conv.weight": w, "bn.weight": g, "bn.bias": b, "bn.running_mean": mu, "bn.running_var": var}
  m = inc.BasicConv(4, (1, 7), padding=(0, 3))
  shapes = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 5, 6, 3), jnp.float32))
  p = weights.convert_state_dict(sd, shapes["params"], weights.default_leaf_rule, what="BasicConv")
  out = m.apply({"params": p}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


def test_fid_pooling_patches():
  x = jnp.ones((1, 4, 4, 1))
  # TF average pooling ignores the padding: corners stay 1 (count_include_pad=True gives 4/9)
  np.testing.assert_allclose(np.asarray(inc._avg_pool_same(x)), 1.0)  # pylint: disable=protected-access
  y = -jnp.arange(16.0).reshape(1, 4, 4, 1)
  # max pool pads with -inf, not zeros
  assert float(inc._max_pool_same(y)[0, 3, 3, 0]) == -10.0  # pylint: disable=protected-access


def test_tf_legacy_bilinear_resize():
  m = inc.tf_legacy_bilinear_matrix(2, 4)  # sources 0, 0.5, 1, 1.5 -> clamped at the edge
  np.testing.assert_allclose(m, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  np.testing.assert_array_equal(inc.tf_legacy_bilinear_matrix(299, 299), np.eye(299))
  m = inc.tf_legacy_bilinear_matrix(256, 299)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  src = 100 * 256 / 299  # row 100 samples between floor(src) and floor(src) + 1
  lo = int(np.floor(src))
  np.testing.assert_allclose(m[100, lo:lo + 2], [1 - (src - lo), src - lo], atol=1e-5)
  img = np.random.default_rng(0).uniform(0, 255, (1, 3, 5, 2)).astype(np.float32)
  out = np.asarray(inc.tf_legacy_resize(jnp.asarray(img), 6))
  mh, mw = inc.tf_legacy_bilinear_matrix(3, 6), inc.tf_legacy_bilinear_matrix(5, 6)
  np.testing.assert_allclose(out[0, :, :, 1], mh @ img[0, :, :, 1] @ mw.T, rtol=1e-5)


def test_state_dict_errors():
  sd = random_state_dict()
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  del sd["Mixed_7c.branch_pool.bn.bias"]
  sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(weights.StateDictMismatchError) as e:
    inc.convert_inception_state_dict(sd)
  msg = str(e.value)
  assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
  assert "Mixed_7c.branch_pool.bn.bias (192,)" in msg
  assert "fc.weight: (1000, 2048) -> (1008, 2048)" in msg
  assert "not the FID Inception" in msg


def test_missing_weights_file(tmp_path, monkeypatch):
  monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
  with pytest.raises(weights.MissingWeightsError) as e:
    inc.load_inception_params(tmp_path / "missing.pth")
  assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
  with pytest.raises(weights.MissingWeightsError, match="EDIT_JAX_INCEPTION"):
    inc.load_inception_params()


def test_pth_without_torch_explains_conversion(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("torch is installed: .pth files load directly")
  except ImportError:
    pass
  f = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  f.write_bytes(b"not really a pickle")
  with pytest.raises(ImportError, match="python -m edit_jax.eval.weights"):
    inc.load_inception_params(f)


def test_load_from_npz(tmp_path):
  sd = random_state_dict()
  np.savez(tmp_path / "inception.npz", **sd)
  p = inc.load_inception_params(tmp_path / "inception.npz")
  np.testing.assert_array_equal(np.asarray(p["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]),
                                sd["Mixed_5b.branch5x5_2.conv.weight"].transpose(2, 3, 1, 0))


def _make_refs_module():
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  path = pathlib.Path(__file__).parent / "golden" / "make_torch_refs.py"
  spec = importlib.util.spec_from_file_location("make_torch_refs", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_matches_pytorch_fid_reference(golden_dir):
  """pytorch-fid 0.3.0's own FID InceptionV3 (fid_inception_v3, PyTorch) on seeded weights, run
  once (tests/golden/make_torch_refs.py) on two 75x75 images: pool_3, the sFID Mixed_6d.branch1x1
  features and the IS logits must match the Flax port (no resize: the torch side was fed
  (x - 128) / 128, the port's own normalisation)."""
  refs = _make_refs_module()
  ref = dict(np.load(golden_dir / "inception_fid_ref.npz"))
  sd = refs.inception_weights(torch_names_and_shapes())
  # Same random weights as when the reference was made (a numpy change would show here first).
  np.testing.assert_allclose(refs.weights_fingerprint(sd), ref["fingerprint"], rtol=1e-9)
  p = inc.convert_inception_state_dict(sd)
  model = inc.InceptionV3(resize_to=None)
  assert ref["images"].dtype == np.uint8 and ref["images"].shape == (2, 75, 75, 3)
  # Same program as test_convert_and_forward_small_input (the compilation cache serves it).
  out, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True))(
      p, ref["images"])
  for k in ("pool", "spatial", "logits"):
    want = ref[k]
    assert np.abs(want).max() > 0.1, k  # non-degenerate activations
    np.testing.assert_allclose(np.asarray(out[k]), want, atol=5e-6 * np.abs(want).max(), err_msg=k)
