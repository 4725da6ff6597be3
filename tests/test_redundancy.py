"""JSD redundancy analysis: exact values on hand cases, and the end-to-end command."""
import math

import jax
import numpy as np
import pytest

from edit_jax import convert, models
from edit_jax.eval import redundancy


def test_identical_rows_score_zero():
  p = np.array([[0.1, 0.2, 0.7]] * 5, np.float32)
  assert float(redundancy.pairwise_jsd_score(p)) == pytest.approx(0.0, abs=1e-7)


def test_hand_computed_case():
  p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
  m = np.array([0.75, 0.25])
  h = lambda a: -sum(x * math.log(x) for x in a if x > 0)  # noqa: E731
  expected = h(m) - (h(p) + h(q)) / 2
  assert float(redundancy.jsd(p, q)) == pytest.approx(expected, rel=1e-6)
  # disjoint supports reach the maximum ln 2
  assert float(redundancy.jsd(np.array([1.0, 0.0]), np.array([0.0, 1.0]))) == pytest.approx(math.log(2))
  # three rows: mean of the three pairwise values
  rows = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], np.float32)
  pairs = [redundancy.jsd(rows[i], rows[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
  assert float(redundancy.pairwise_jsd_score(rows)) == pytest.approx(float(np.mean(pairs)), rel=1e-6)


def test_sampled_pairs_close_to_all_pairs():
  rows = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 100, 30)), -1)
  full = float(redundancy.pairwise_jsd_score(rows, max_pairs=10**6))
  sampled = float(redundancy.pairwise_jsd_score(rows, max_pairs=2000))
  assert sampled == pytest.approx(full, rel=0.05)


def test_analyse_and_cli(tmp_path, golden_dir, capsys):
  model, params = convert.load_torch_checkpoint(golden_dir / "mediator_tiny_state_dict.npz")
  res = redundancy.analyse(model, params, timesteps=3, batch=2)
  assert res["layers"] == ["blocks_0", "blocks_1"] and len(res["t"]) == 3
  s = np.asarray(res["score"])
  assert s.shape == (2, 3) and np.all(s >= 0) and np.all(s <= math.log(2) + 1e-6)
  conv = tmp_path / "conv"
  convert.save_converted(conv, model, params)
  redundancy.main(["--checkpoint", str(conv), "--out", str(tmp_path / "r"), "--timesteps", "2",
                   "--batch", "2"])
  assert (tmp_path / "r" / "redundancy.png").stat().st_size > 1000
  assert "blocks_0 (mediator)" in (tmp_path / "r" / "redundancy.md").read_text()
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    redundancy.main(["--checkpoint", str(conv), "--out", str(tmp_path / "r")])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    redundancy.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")])
