"""`python -m edit_jax.sample` and `sample_images`: outputs, determinism, refusal, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from edit_jax import convert, flops, models, sample


def tiny(n=0, channels=3, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=channels, hidden_size=32, depth=1,
             num_heads=2, num_classes=10, mediator_num=n)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def random_params(model, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype),
                                models.abstract_params(model))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  out = {}
  for name, m in [("n1", tiny(1)), ("n4", tiny(4)), ("n4_c5", tiny(4, num_classes=5))]:
    convert.save_converted(root / name, m, random_params(m, len(out)))
    out[name] = str(root / name)
  return out


def test_cli_static_outputs_and_refusal(ckpts, tmp_path):
  out = tmp_path / "run"
  args = ["--ckpt", ckpts["n1"], "--out", str(out), "--num_samples", "12", "--batch_size", "8",
          "--num_steps", "6", "--cfg_scale", "2.0", "--labels", "1,2,3", "--no_progress"]
  res = sample.main(args)
  arr = np.load(out / "samples.npz")["arr_0"]
  assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
  np.testing.assert_array_equal(arr, res["images"])
  np.testing.assert_array_equal(res["labels"], [1, 2, 3] * 4)
  assert 0 < arr.std()
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape == (3 * 8, 4 * 8, 3)  # 12 images: 3 rows of 4
  np.testing.assert_array_equal(grid[:8, 8:16], arr[1])
  s = json.loads((out / "summary.json").read_text())
  g = flops.gflops(tiny(1))
  assert s["nfe_per_image"] == 6  # 5 Euler-Maruyama steps + the Mean last step
  assert s["gflops_per_image"] == pytest.approx(g * 6 * 2)  # CFG doubles every forward
  assert s["sampler"]["diffusion_form"] == "sigma" and s["devices"] == 8
  assert s["images_per_second"] > 0
  with pytest.raises(FileExistsError, match="refusing to overwrite .*--overwrite"):
    sample.main(args)
  again = sample.main(args + ["--overwrite"])  # same seed -> same images
  np.testing.assert_array_equal(again["images"], arr)


def test_sample_images_dynamic_and_one_channel(ckpts, tmp_path):
  res = sample.sample_images([ckpts["n1"], ckpts["n4"]], str(tmp_path / "dyn"), num_samples=8,
                             batch_size=8, num_steps=12, switch_ratios=(0.9,), progress=False)
  dyn = res["summary"]["dynamic"]
  assert dyn["mediator_nums"] == [1, 4] and len(dyn["steps_per_stage_mean"]) == 2
  assert sum(dyn["steps_per_stage_mean"]) == pytest.approx(11)
  g1, g4 = flops.gflops(tiny(1)), flops.gflops(tiny(4))
  assert dyn["gflops_static_largest_per_image"] == pytest.approx(g4 * 12)
  assert g1 * 12 <= res["summary"]["gflops_per_image"] <= g4 * 12
  assert (tmp_path / "dyn" / "samples.npz").exists()
  # a 1-channel pixel model: images are repeated to 3 channels, nothing written without `out`
  m = tiny(0, channels=1)
  one = sample.sample_images(models_and_params=[(m, random_params(m, 9))], num_samples=8,
                             batch_size=8, mode="ode", method="euler", num_steps=4,
                             progress=False)
  img = one["images"]
  assert img.shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_to_uint8_official_mapping():
  x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(sample.to_uint8(x)[0, 0, :, 0], [0, 64, 128, 255, 255, 255])


@pytest.mark.parametrize("extra,match", [
    (["--switch_ratios", "0.8"], "needs one checkpoint per mediator count"),
    (["--labels", "3,10"], r"labels must be in \[0, 9\]"),
    (["--batch_size", "6"], "multiple of the 8 local devices"),
    (["--mode", "ode", "--method", "rk4"], "unknown ODE method 'rk4'"),
    (["--diffusion_form", "SBDM"], "sample_eps > 0"),
    (["--guidance_interval", "0.9,0.1", "--cfg_scale", "4"], "t_lo <= t_hi"),
])
def test_cli_bad_input(ckpts, tmp_path, extra, match):
  with pytest.raises(ValueError, match=match):
    sample.main(["--ckpt", ckpts["n1"], "--out", str(tmp_path / "bad"), "--num_samples", "8",
                 "--batch_size", "8", "--num_steps", "6", "--no_progress"] + extra)
  assert not (tmp_path / "bad" / "samples.npz").exists()


def test_cli_mismatched_schedule(ckpts, tmp_path):
  with pytest.raises(ValueError, match="num_classes: 10 vs 5"):
    sample.main(["--ckpt", ckpts["n1"], "--ckpt", ckpts["n4_c5"], "--switch_ratios", "0.8",
                 "--out", str(tmp_path / "bad"), "--num_samples", "8", "--batch_size", "8",
                 "--no_progress"])
  with pytest.raises(ValueError, match="strictly increasing"):
    sample.main(["--ckpt", ckpts["n4"], "--ckpt", ckpts["n1"], "--switch_ratios", "0.8",
                 "--out", str(tmp_path / "bad"), "--num_samples", "8", "--batch_size", "8",
                 "--no_progress"])
  assert not (tmp_path / "bad").exists()


def test_latent_model_needs_vae(tmp_path, monkeypatch):
  monkeypatch.delenv("EDIT_JAX_VAE", raising=False)
  m = tiny(0, channels=4)
  with pytest.raises(ValueError, match="needs the SD-VAE decoder: pass --vae"):
    sample.sample_images(models_and_params=[(m, random_params(m, 0))], num_samples=8,
                         batch_size=8, num_steps=4, progress=False)
