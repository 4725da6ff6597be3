"""Labels: `sample` stores them (ADM `arr_1`, summary.json) and reads them (`--classes`), and every
public sampling entry refuses ids outside [0, num_classes) before the jit boundary instead of
returning non-finite samples."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import convert, models, sample
from edit_jax.diffusion import dynamic, samplers, transport
from edit_jax.eval import redundancy


def tiny(n=4, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
             num_classes=10, mediator_num=n)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def random_params(model, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype),
                                models.abstract_params(model))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  m = tiny()
  path = tmp_path_factory.mktemp("ck") / "n4"
  convert.save_converted(path, m, random_params(m))
  return str(path)


def test_sample_writes_and_reads_labels(ckpt, tmp_path):
  args = ["--ckpt", ckpt, "--num_samples", "8", "--batch_size", "8", "--mode", "ode",
          "--method", "euler", "--num_steps", "3", "--no_progress"]
  res = sample.main(args + ["--out", str(tmp_path / "a"), "--classes", "3,7"])
  with np.load(tmp_path / "a" / "samples.npz") as f:
    assert sorted(f.files) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(f["arr_1"], [3, 7] * 4)
    assert f["arr_1"].dtype == np.int64 and f["arr_0"].shape == (8, 8, 8, 3)
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["labels"] == [3, 7] * 4
  np.testing.assert_array_equal(res["labels"], [3, 7] * 4)
  # labels from a file: text, .npy, or another run's samples.npz (arr_1)
  (tmp_path / "c.txt").write_text("1 2\n5,")
  np.save(tmp_path / "c.npy", np.array([9, 8, 7, 6, 5, 4, 3, 2]))
  for src, want in [(tmp_path / "c.txt", [1, 2, 5] * 2 + [1, 2]),
                    (tmp_path / "c.npy", [9, 8, 7, 6, 5, 4, 3, 2]),
                    (tmp_path / "a" / "samples.npz", [3, 7] * 4)]:
    out = tmp_path / src.name.replace(".", "_")
    sample.main(args + ["--out", str(out), "--classes", str(src)])
    with np.load(out / "samples.npz") as f:
      np.testing.assert_array_equal(f["arr_1"], want)
  # random labels are stored too
  res = sample.main(args + ["--out", str(tmp_path / "r")])
  with np.load(tmp_path / "r" / "samples.npz") as f:
    np.testing.assert_array_equal(f["arr_1"], res["labels"])
  (tmp_path / "bad.txt").write_text("3 x")
  with pytest.raises(ValueError, match=r"cannot read class ids from .*bad.txt"):
    sample.main(args + ["--out", str(tmp_path / "b"), "--classes", str(tmp_path / "bad.txt")])
  np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"has no `arr_1`"):
    sample.main(args + ["--out", str(tmp_path / "b"), "--classes", str(tmp_path / "imgs.npz")])


def test_make_sample_fn_checks_labels_before_and_under_jit():
  m = tiny(0)
  p = random_params(m)
  fn = samplers.make_sample_fn(m, transport.create_transport(),
                               samplers.ODEConfig("euler", 3), cfg_scale=2.0)
  x0 = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 9\] \(or 10, the null class\)"
                                       r".*got \[3, 11\]"):
    fn(p, x0, np.array([3, 11]))
  with pytest.raises(ValueError, match=r"got \[-1, 2\]"):
    fn(p, x0, jnp.array([-1, 2]))
  jitted = jax.jit(fn)
  ok = jitted(p, x0, jnp.array([3, 10])).x  # 10 = the null class (unconditional): allowed
  assert np.isfinite(np.asarray(ok)).all()
  with pytest.raises(Exception, match=r"labels must be in \[0, 9\]"):  # JaxRuntimeError
    jax.block_until_ready(jitted(p, x0, jnp.array([3, 12])).x)


def test_dynamic_sampler_and_redundancy_check_labels():
  ms = [tiny(1), tiny(4)]
  ps = [random_params(m, i) for i, m in enumerate(ms)]
  ds = dynamic.DynamicSampler(ms, ps, transport.create_transport(), samplers.ODEConfig("euler", 6),
                              dynamic.SwitchRule((0.5,), 1), batch_size=2)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 9\].*got \[0, 11\]"):
    ds.sample(np.zeros((2, 8, 8, 1), np.float32), np.array([0, 11]))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
    redundancy.analyse(ms[0], ps[0], timesteps=1, batch=2, labels=10)
