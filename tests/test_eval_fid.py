"""ADM metric suite: Frechet distance, streamed statistics, IS, precision/recall, .npz I/O, CLI."""
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from edit_jax.eval import fid, metrics, weights


def random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or 2 * d))
  return a @ a.T / a.shape[1]


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_matches_scipy_formula():
  rng = np.random.default_rng(0)
  d = 12
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = random_cov(rng, d), random_cov(rng, d)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
  # closed form for commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
  a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
  assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_eps_fallback(monkeypatch):
  rng = np.random.default_rng(1)
  s1, s2 = random_cov(rng, 4), random_cov(rng, 4)
  real_sqrtm = linalg.sqrtm
  calls = []

  def flaky(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(metrics.linalg, "sqrtm", flaky)
  with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
    got = metrics.frechet_distance(np.zeros(4), s1, np.zeros(4), s2)
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(4)) @ (s2 + 1e-6 * np.eye(4)))
  want = np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(calls[1]).real)
  assert got == pytest.approx(want, rel=1e-10)


def test_frechet_shape_errors():
  with pytest.raises(ValueError, match="different lengths"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"covariances must be \(D, D\)"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ----------------------------------------------------------------------------- streaming stats
def test_running_stats_equal_numpy_one_shot():
  rng = np.random.default_rng(2)
  x = (1e4 + rng.standard_normal((1003, 7)) * rng.uniform(0.1, 3, 7)).astype(np.float32)
  rs = metrics.RunningStats()
  for lo, hi in ((0, 1), (1, 64), (64, 500), (500, 1003)):  # uneven batches, one of size 1
    rs.update(x[lo:hi])
  st = rs.stats()
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(st.mu, x64.mean(0), rtol=1e-12)
  np.testing.assert_allclose(st.sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
  assert rs.n == 1003
  with pytest.raises(ValueError, match="feature dimension changed"):
    rs.update(np.zeros((2, 8)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.RunningStats().stats()


# ----------------------------------------------------------------------------- Inception Score
def test_inception_score_reference_values():
  assert metrics.inception_score(np.zeros((10, 5))) == pytest.approx(1.0)
  assert metrics.inception_score(100.0 * np.eye(8)) == pytest.approx(8.0, rel=1e-6)
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((25, 6)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for s in range(0, 25, 10):  # ADM: consecutive splits, mean of exp(mean KL)
    part = p[s:s + 10]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  assert metrics.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-10)


# ----------------------------------------------------------------------------- precision/recall
def brute_force_pr(ref, sam, k=3):
  def radii(f):
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
  d = ((sam[:, None] - ref[None]) ** 2).sum(-1)  # (Ns, Nr) squared distances
  precision = np.mean((d <= radii(ref)[None]).any(1))
  recall = np.mean((d <= radii(sam)[:, None]).any(0))
  return precision, recall


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(4)
  ref = rng.standard_normal((60, 5)).astype(np.float32)
  sam = (0.5 + 1.5 * rng.standard_normal((45, 5))).astype(np.float32)
  want = brute_force_pr(ref.astype(np.float64), sam.astype(np.float64))
  assert 0 < want[0] < 1 and 0 < want[1] < 1
  got = metrics.precision_recall(ref, sam, distance_dtype="float32")
  assert got == pytest.approx(want)
  assert metrics.precision_recall(ref, sam, distance_dtype="float32", row_batch_size=16) == pytest.approx(want)
  got16 = metrics.precision_recall(ref, sam, distance_dtype="float16", row_batch_size=16)
  assert abs(got16[0] - want[0]) <= 0.05 and abs(got16[1] - want[1]) <= 0.05
  assert metrics.precision_recall(ref, ref + 0, distance_dtype="float32") == (1.0, 1.0)
  assert metrics.precision_recall(ref, sam + 100.0, distance_dtype="float32") == (0.0, 0.0)


def test_float16_overflow_falls_back_to_float32():
  rng = np.random.default_rng(5)
  ref = (300 * rng.standard_normal((20, 4))).astype(np.float32)  # squared norms > fp16 max
  sam = (300 * rng.standard_normal((20, 4))).astype(np.float32)
  assert metrics.precision_recall(ref, sam, distance_dtype="float16") == pytest.approx(
      brute_force_pr(ref.astype(np.float64), sam.astype(np.float64)))
  with pytest.raises(ValueError, match="distance_dtype"):
    metrics.precision_recall(ref, sam, distance_dtype="bfloat16")


# ----------------------------------------------------------------------------- npz streaming
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_stream_reads_batches(tmp_path, compressed):
  imgs = np.random.default_rng(6).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
  path = tmp_path / "s.npz"
  (np.savez_compressed if compressed else np.savez)(path, arr_0=imgs, other=np.arange(3))
  assert sorted(fid.npz_keys(path)) == ["arr_0", "other"]
  with fid.open_npz_array(path) as stream:
    assert len(stream) == 10 and stream.shape == (10, 4, 5, 3)
    parts = list(stream.batches(4))
  assert [len(p) for p in parts] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(parts), imgs)
  with pytest.raises(KeyError, match="has no array 'arr_1'.*arr_0"):
    with fid.open_npz_array(path, "arr_1"):
      pass


# ----------------------------------------------------------------------------- suite and CLI
def fake_inception(params, images, model=None):
  """A cheap stand-in for the network: deterministic features of the pixel statistics."""
  del model
  x = images.astype(jnp.float32) / 255.0
  m = x.mean(axis=(1, 2))  # (B, 3)
  s = x.std(axis=(1, 2))
  base = jnp.concatenate([m, s, m * s, m ** 2], axis=1)  # (B, 12)
  return {"pool": base @ params["pool"], "spatial": base @ params["spatial"], "logits": base @ params["logits"]}


@pytest.fixture
def fake_params():
  rng = np.random.default_rng(7)
  return {"pool": jnp.asarray(rng.standard_normal((12, 6)), jnp.float32),
          "spatial": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32),
          "logits": jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)}


def write_images(path, n, seed, shift=0):
  rng = np.random.default_rng(seed)
  imgs = np.clip(rng.integers(0, 200, (n, 8, 8, 3)) + shift * np.arange(n)[:, None, None, None] % 50,
                 0, 255).astype(np.uint8)
  np.savez(path, arr_0=imgs)
  return imgs


def test_evaluate_matches_direct_computation(tmp_path, monkeypatch, fake_params):
  monkeypatch.setattr(fid.inception_lib, "inception_features", fake_inception)
  ref = write_images(tmp_path / "ref.npz", 23, 0)
  sam = write_images(tmp_path / "sam.npz", 17, 1, shift=3)
  res = fid.evaluate(tmp_path / "ref.npz", tmp_path / "sam.npz", params=fake_params, batch_size=5,
                     distance_dtype="float32", progress=False)
  fr = {k: np.asarray(v, np.float64) for k, v in fake_inception(fake_params, jnp.asarray(ref)).items()}
  fs = {k: np.asarray(v, np.float64) for k, v in fake_inception(fake_params, jnp.asarray(sam)).items()}
  st = lambda a: (a.mean(0), np.cov(a, rowvar=False))  # noqa: E731
  assert res["fid"] == pytest.approx(metrics.frechet_distance(*st(fs["pool"]), *st(fr["pool"])), rel=1e-5)
  assert res["sfid"] == pytest.approx(metrics.frechet_distance(*st(fs["spatial"]), *st(fr["spatial"])), rel=1e-5)
  assert res["inception_score"] == pytest.approx(metrics.inception_score(fs["logits"]), rel=1e-5)
  assert (res["precision"], res["recall"]) == pytest.approx(brute_force_pr(fr["pool"], fs["pool"]))
  assert res["num_samples"] == 17 and res["num_reference"] == 23


def test_reference_with_precomputed_stats(tmp_path, monkeypatch, fake_params):
  monkeypatch.setattr(fid.inception_lib, "inception_features", fake_inception)
  sam = write_images(tmp_path / "sam.npz", 12, 2)
  f = {k: np.asarray(v, np.float64) for k, v in fake_inception(fake_params, jnp.asarray(sam)).items()}
  # ADM reference layout: mu/sigma/mu_s/sigma_s (+ arr_0 for precision/recall). Here the reference
  # statistics are the samples' own, so FID and sFID must vanish.
  np.savez(tmp_path / "ref.npz", arr_0=sam, mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False),
           mu_s=f["spatial"].mean(0), sigma_s=np.cov(f["spatial"], rowvar=False))
  res = fid.evaluate(tmp_path / "ref.npz", tmp_path / "sam.npz", params=fake_params, batch_size=5,
                     progress=False)
  assert res["fid"] == pytest.approx(0.0, abs=1e-4) and res["sfid"] == pytest.approx(0.0, abs=1e-4)
  assert res["precision"] == 1.0 and res["recall"] == 1.0
  np.savez(tmp_path / "stats_only.npz", mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False),
           mu_s=f["spatial"].mean(0), sigma_s=np.cov(f["spatial"], rowvar=False))
  res = fid.evaluate(tmp_path / "stats_only.npz", tmp_path / "sam.npz", params=fake_params, progress=False)
  assert res["precision"] is None and res["fid"] == pytest.approx(0.0, abs=1e-4)
  np.savez(tmp_path / "bad_ref.npz", mu=np.zeros(6))
  with pytest.raises(KeyError, match=r"lacks \['sigma', 'mu_s', 'sigma_s'\]"):
    fid.evaluate(tmp_path / "bad_ref.npz", tmp_path / "sam.npz", params=fake_params, progress=False)


def test_bad_sample_files(tmp_path, monkeypatch, fake_params):
  monkeypatch.setattr(fid.inception_lib, "inception_features", fake_inception)
  write_images(tmp_path / "ref.npz", 8, 0)
  np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"NHWC.*NCHW\? transpose"):
    fid.evaluate(tmp_path / "ref.npz", tmp_path / "nchw.npz", params=fake_params, progress=False)
  np.savez(tmp_path / "unit.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"uint8 images in \[0, 255\]"):
    fid.evaluate(tmp_path / "ref.npz", tmp_path / "unit.npz", params=fake_params, progress=False)
  with pytest.raises(FileNotFoundError, match="no such .npz"):
    fid.evaluate(tmp_path / "ref.npz", tmp_path / "absent.npz", params=fake_params, progress=False)


def test_cli_prints_and_writes_json(tmp_path, monkeypatch, capsys, fake_params):
  monkeypatch.setattr(fid.inception_lib, "inception_features", fake_inception)
  monkeypatch.setattr(fid.inception_lib, "load_inception_params", lambda path: fake_params)
  write_images(tmp_path / "ref.npz", 14, 0)
  write_images(tmp_path / "sam.npz", 11, 1, shift=5)
  res = fid.main(["--ref", str(tmp_path / "ref.npz"), "--sample", str(tmp_path / "sam.npz"),
                  "--batch-size", "4", "--quiet"])
  out = capsys.readouterr().out
  for label in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
    assert label in out
  record = json.loads((tmp_path / "sam.metrics.json").read_text())
  assert record["fid"] == pytest.approx(res["fid"]) and record["num_samples"] == 11


def test_cli_without_inception_weights(tmp_path, monkeypatch):
  monkeypatch.delenv("EDIT_JAX_INCEPTION", raising=False)
  write_images(tmp_path / "ref.npz", 4, 0)
  with pytest.raises(weights.MissingWeightsError, match="pt_inception-2015-12-05"):
    fid.main(["--ref", str(tmp_path / "ref.npz"), "--sample", str(tmp_path / "ref.npz"),
              "--inception", str(tmp_path / "none.pth")])


def test_no_warnings_on_well_conditioned_stats():
  rng = np.random.default_rng(8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    metrics.frechet_distance(np.zeros(5), random_cov(rng, 5), np.ones(5), random_cov(rng, 5))
