"""Input pipelines: real digits, determinism per (seed, step), process slices, prepared latents,
image folders, TFDS ArrayRecord (mock), synthetic data, and the error messages."""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from edit_jax import data, prepare


def cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      name="digits", path="", image_size=32, channels=1, num_classes=10, random_flip=False,
      latent_sample=True, space="pixels", latent_channels=4, tfds_name="", split="train",
      image_key="image", label_key="label", num_threads=2, prefetch=2, worker_count=0))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def digits():
  return data.DigitsSource()


def test_digits_are_real_padded_mnist(digits):
  assert len(digits) == 5000
  assert digits.images.shape == (5000, 32, 32, 1) and digits.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(digits.labels), [500] * 10)
  # 2 px of zeros on every side, ink in the middle.
  border = np.concatenate([digits.images[:, :2].ravel(), digits.images[:, -2:].ravel(),
                           digits.images[:, :, :2].ravel(), digits.images[:, :, -2:].ravel()])
  assert border.max() == 0
  assert digits.images[:, 2:-2, 2:-2].max() == 255
  p = data.make_pipeline(cfg(), seed=0, global_batch_size=16, source=digits)
  b = p.batch(0)
  assert b["x"].shape == (16, 32, 32, 1) and b["x"].dtype == np.float32
  assert b["x"].min() == -1.0 and b["x"].max() == 1.0
  assert b["y"].dtype == np.int32 and set(b["y"]) <= set(range(10))
  # A "1" has far less ink than a "0" (mean over the class): the labels match the images.
  ink = [digits.images[digits.labels == k].mean() for k in range(10)]
  assert int(np.argmin(ink)) == 1


def test_batches_depend_on_seed_and_step_only(digits):
  p = data.make_pipeline(cfg(), seed=3, global_batch_size=8, source=digits)
  q = data.make_pipeline(cfg(), seed=3, global_batch_size=8, source=digits)
  for s in (0, 5, 700):  # 700 * 8 > 5000: crosses an epoch boundary
    np.testing.assert_array_equal(p.batch(s)["x"], q.batch(s)["x"])
    np.testing.assert_array_equal(p.batch(s)["y"], q.batch(s)["y"])
  assert not np.array_equal(p.batch(0)["y"], p.batch(1)["y"])
  other = data.make_pipeline(cfg(), seed=4, global_batch_size=8, source=digits)
  assert not np.array_equal(p.batch(0)["x"], other.batch(0)["x"])
  # The prefetching iterator from step k yields batch(k), batch(k+1), ... (resume).
  it = p.iterate(5)
  for s in (5, 6, 7):
    np.testing.assert_array_equal(next(it)["y"], p.batch(s)["y"])
  # A new epoch reshuffles: epoch 0 and epoch 1 orders differ.
  e0 = np.concatenate([p.batch(s)["y"] for s in range(0, 625)])
  e1 = np.concatenate([p.batch(s)["y"] for s in range(625, 1250)])
  np.testing.assert_array_equal(np.bincount(e0), [500] * 10)
  assert not np.array_equal(e0, e1)


def test_process_slices_partition_the_global_batch(digits):
  full = data.make_pipeline(cfg(), seed=0, global_batch_size=12, source=digits)
  parts = [data.make_pipeline(cfg(), seed=0, global_batch_size=12, process_index=i,
                              process_count=3, source=digits) for i in range(3)]
  for s in (0, 9):
    got = np.concatenate([p.batch(s)["x"] for p in parts])
    np.testing.assert_array_equal(got, full.batch(s)["x"])
  with pytest.raises(data.DataError, match="not divisible by the number of processes 5"):
    data.make_pipeline(cfg(), seed=0, global_batch_size=12, process_count=5, source=digits)


def test_synthetic_is_deterministic():
  c = cfg(name="synthetic", image_size=8, channels=3, num_classes=7)
  p = data.make_pipeline(c, seed=0, global_batch_size=4)
  b = p.batch(2)
  assert b["x"].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(b["x"], data.make_pipeline(c, seed=0, global_batch_size=4).batch(2)["x"])
  assert b["y"].max() < 7


def _image_folder(root, sizes=((64, 48), (40, 72), (33, 33))):
  rng = np.random.default_rng(0)
  for ci, cls in enumerate(["n001", "n002"]):
    os.makedirs(root / cls)
    for j, (w, h) in enumerate(sizes):
      arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(arr).save(root / cls / f"img{j}.JPEG", quality=95)
  return root


def test_center_crop_matches_adm_rule():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (350, 600, 3), dtype=np.uint8))
  out = data.center_crop_arr(img, 100)   # 600x350 -> BOX /2 -> 300x175 -> BICUBIC 171x100 -> crop
  assert out.shape == (100, 100, 3)
  ref = img.resize((300, 175), Image.BOX).resize((171, 100), Image.BICUBIC)
  np.testing.assert_array_equal(out, np.asarray(ref)[:, 35:135])
  # While the short side is >= 2x the target, keep halving: 800x400 -> 400x200 -> 200x100.
  img = Image.fromarray(rng.integers(0, 256, (400, 800, 3), dtype=np.uint8))
  ref = img.resize((400, 200), Image.BOX).resize((200, 100), Image.BOX)
  np.testing.assert_array_equal(data.center_crop_arr(img, 100), np.asarray(ref)[:, 50:150])


def test_image_folder_pixels(tmp_path):
  root = _image_folder(tmp_path / "imgs")
  c = cfg(name="images", path=str(root), image_size=16, channels=3, num_classes=2, random_flip=True)
  p = data.make_pipeline(c, seed=0, global_batch_size=6)
  b = p.batch(0)
  assert b["x"].shape == (6, 16, 16, 3) and sorted(b["y"].tolist()) == [0, 0, 0, 1, 1, 1]
  assert -1.0 <= b["x"].min() and b["x"].max() <= 1.0


def test_prepare_latents_with_stub_encoder(tmp_path):
  root = _image_folder(tmp_path / "train")

  def stub_encode(x):  # (B, 16, 16, 3) -> mean = 8x8 average (B, 2, 2, 3) + a zero channel
    b, h, w, _ = x.shape
    mean = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    mean = np.concatenate([mean, np.zeros_like(mean[..., :1])], -1)
    return mean, np.full_like(mean, np.log(0.25))        # std = 0.5

  dst = tmp_path / "lat"
  r = prepare.prepare(str(root), str(dst), image_size=16, encode_fn=stub_encode, shard_size=4,
                      batch_size=3, num_workers=2)
  assert r["written"] == [0, 1] and r["meta"]
  meta = json.loads((dst / "meta.json").read_text())
  assert meta["num_examples"] == 6 and meta["latent_shape"] == [2, 2, 4]
  assert meta["classes"] == ["n001", "n002"] and meta["store"] == "moments"
  lat = np.load(dst / "latents-00000.npy")
  assert lat.shape == (4, 2, 2, 2, 8) and lat.dtype == np.float16
  # flip 1 is the encoding of the mirrored crop
  crop = data.to_unit_range(prepare.load_image(str(root / "n001" / "img0.JPEG"), 16))
  want = stub_encode(np.stack([crop, crop[:, ::-1]]))[0]
  np.testing.assert_allclose(lat[0, :, ..., :4], want, atol=2e-3)
  np.testing.assert_allclose(lat[0, ..., 4:], 0.5, atol=1e-3)
  # Rerun: complete shards are skipped.
  assert prepare.prepare(str(root), str(dst), image_size=16, encode_fn=stub_encode,
                         shard_size=4)["skipped"] == [0, 1]
  # Training input: mean + std * eps, times 0.18215; deterministic per (seed, step).
  c = cfg(name="latents", path=str(dst), image_size=16, num_classes=2, random_flip=True)
  p = data.make_pipeline(c, seed=0, global_batch_size=6)
  b = p.batch(0)
  assert b["x"].shape == (6, 2, 2, 4)
  np.testing.assert_array_equal(b["x"], data.make_pipeline(c, seed=0, global_batch_size=6).batch(0)["x"])
  assert 0.01 < np.std(b["x"][..., 3] / data.VAE_SCALE) < 1.5   # noise of std 0.5 on a zero mean
  c.latent_sample = False
  b = data.make_pipeline(c, seed=0, global_batch_size=6).batch(0)
  np.testing.assert_allclose(b["x"][..., 3], 0.0)


def test_tfds_array_record_mock():
  """Batches hold the dataset's own records: image / 127.5 - 1 and the label of the same record,
  in the order of grain's seeded permutation (8 mock examples = one epoch in 2 batches)."""
  import grain  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415
  with tfds.testing.mock_data(num_examples=8):
    c = cfg(name="tfds", tfds_name="mnist", image_size=28, channels=1, num_classes=10)
    p = data.make_pipeline(c, seed=0, global_batch_size=4)
    b0, b1 = p.batch(0), p.batch(1)
    src = tfds.data_source("mnist", split="train")
    recs = [src[i] for i in range(len(src))]
  assert len(recs) == 8 and p.num_classes == 10
  assert b1["x"].shape == (4, 28, 28, 1) and b1["y"].shape == (4,)
  order = [int(i) for i in grain.MapDataset.range(8).shuffle(seed=0)]
  assert sorted(order) == list(range(8)) and order != list(range(8))
  x = np.concatenate([b0["x"], b1["x"]])
  y = np.concatenate([b0["y"], b1["y"]])
  for row, i in enumerate(order):
    img = np.asarray(recs[i]["image"]).reshape(28, 28, 1)
    np.testing.assert_array_equal(x[row], img.astype(np.float32) / 127.5 - 1.0, err_msg=str(row))
    assert y[row] == int(recs[i]["label"]), row
  assert len({float(v.mean()) for v in x}) == 8  # eight different mock images


@pytest.mark.parametrize("kw,msg", [
    (dict(name="latents", path="/nonexistent/lat"), "python -m edit_jax.prepare"),
    (dict(name="latents", path=""), "is not a directory of prepared latents"),
    (dict(name="images", path="/nonexistent/imgs"), "does not exist"),
    (dict(name="images", path=""), "data.path is empty"),
    (dict(name="tfds", tfds_name=""), "data.tfds_name is empty"),
    (dict(name="cifar"), "unknown data.name 'cifar'"),
])
def test_missing_data_errors(kw, msg):
  with pytest.raises(data.DataError, match=msg):
    data.make_pipeline(cfg(**kw), seed=0, global_batch_size=4)


def test_latents_meta_missing(tmp_path):
  (tmp_path / "x").mkdir()
  with pytest.raises(data.DataError, match="meta.json is missing"):
    data.make_pipeline(cfg(name="latents", path=str(tmp_path / "x")), seed=0, global_batch_size=4)


def test_num_classes_mismatch(digits):
  with pytest.raises(data.DataError, match="set --config.data.num_classes=10"):
    data.make_pipeline(cfg(num_classes=1000), seed=0, global_batch_size=4, source=digits)
