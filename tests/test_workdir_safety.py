"""No run loses or rewrites what is already in a workdir: a checkpoint of another configuration is
an error naming the differing fields and tensors (nothing on disk changes), bad settings are
refused before the workdir is touched, a corrupt checkpoint is the only thing moved aside, and a
finished run re-run trains nothing."""
import hashlib
import pathlib
import shutil

import jax
import pytest

from edit_jax import checkpoint, train


def tiny_config():
  """test_train's tiny experiment (8 fake devices, synthetic data), 2 steps, checkpoint at 2."""
  from test_train import tiny_config as base  # noqa: PLC0415 - tests/ is on sys.path
  c = base()
  c.num_train_steps = 2
  return c


def snapshot(root: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256 of the bytes, or '<dir>'} of everything under root."""
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 2 steps (checkpoint at step 2, config.json)."""
  wd = tmp_path_factory.mktemp("trained") / "wd"
  r = train.train_and_evaluate(tiny_config(), str(wd))
  assert r["step"] == 2 and r["stopped"] == "done"
  return wd


@pytest.fixture
def workdir(trained, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(trained, wd)
  return wd


def mismatch_message(workdir, change) -> str:
  """The CheckpointMismatchError message of a 4-step run with ``change(config)`` applied in
  ``workdir``; asserts that nothing under workdir changed (no corrupt-* dir, same config.json)."""
  before = snapshot(workdir)
  c = tiny_config()
  c.num_train_steps = 4
  change(c)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    train.train_and_evaluate(c, str(workdir))
  assert snapshot(workdir) == before
  msg = str(e.value)
  assert "checkpoint step 2" in msg and "nothing on disk was changed" in msg
  assert "corrupt" not in msg and "unreadable" not in msg
  return msg


def test_other_mediator_count_is_a_named_error_and_changes_nothing(workdir):
  msg = mismatch_message(workdir, lambda c: c.model.update(mediator_num=1))
  assert "model.mediator_num: 4 -> 1" in msg and "--config.init_from" in msg
  assert "params/blocks_0/attn/an_bias: checkpoint (2, 4, 7, 7) vs this run (2, 1, 7, 7)" in msg
  # The correct command afterwards resumes from step 2 (not from 0).
  c = tiny_config()
  c.num_train_steps = 3
  r = train.train_and_evaluate(c, str(workdir))
  assert r["step"] == 3
  assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 3]


def test_other_optimizer_state_is_a_named_error_and_changes_nothing(workdir):
  """Gradient clipping adds an optax state: same model, other optimizer state tree."""
  msg = mismatch_message(workdir, lambda c: c.optim.update(grad_clip=1.0))
  assert "optim.grad_clip: 0.0 -> 1.0" in msg and "tensors that differ: opt_state/" in msg


def test_bad_settings_leave_an_existing_workdir_untouched(workdir):
  before = snapshot(workdir)
  cases = [
      ({"sample.every": 1, "sample.method": "rk45"}, r"config.sample: unknown ODE method 'rk45'"),
      ({"optim.learning_rate": -1.0}, r"optim.learning_rate=-1.0 must be > 0"),
      ({"optim.b2": 1.0}, r"optim.b2=1.0 must be in \[0, 1\)"),
  ]
  for overrides, match in cases:
    c = tiny_config()
    c.num_train_steps = 4
    for k, v in overrides.items():
      node, leaf = (c.sample, k.split(".")[1]) if k.startswith("sample.") else (
          c.optim, k.split(".")[1])
      node[leaf] = v
    with pytest.raises(train.ConfigError, match=match):
      train.train_and_evaluate(c, str(workdir))
    assert snapshot(workdir) == before, overrides


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "wd"
  f.write_text("my notes")
  with pytest.raises(train.ConfigError, match=r"is a file, not a directory"):
    train.train_and_evaluate(tiny_config(), str(f))
  with pytest.raises(train.ConfigError, match=r"is a file, not a directory"):
    train.train_and_evaluate(tiny_config(), str(f / "sub"))
  assert f.read_text() == "my notes" and sorted(tmp_path.iterdir()) == [f]


def test_finished_run_rerun_trains_nothing(workdir, caplog):
  before = snapshot(workdir / "checkpoints")
  r = train.train_and_evaluate(tiny_config(), str(workdir))
  assert r["step"] == 2 and r["stopped"] == "done"
  assert snapshot(workdir / "checkpoints") == before


def test_loading_a_checkpoint_is_quiet(trained, caplog):
  """No Orbax 'read only' warnings when a checkpoint is opened for sampling / evaluation."""
  caplog.set_level("WARNING")
  model, _ = checkpoint.load_params_for_sampling(str(trained))
  assert model.mediator_num == 4
  noisy = [r.getMessage() for r in caplog.records if "read only" in r.getMessage()
           or "read_only" in r.getMessage()]
  assert not noisy, noisy


def test_unable_to_initialize_tpu_note_is_filtered():
  import logging  # noqa: PLC0415
  from edit_jax import main  # noqa: PLC0415
  f = main._QuietLibraries()

  def rec(level, msg, path="/x/jax/_src/xla_bridge.py"):
    return logging.LogRecord("jax._src.xla_bridge", level, path, 1, msg, None, None)
  assert not f.filter(rec(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: no TPU"))
  assert f.filter(rec(logging.INFO, "step 100/1000 | loss 0.2"))
  assert f.filter(rec(logging.WARNING, "Unable to initialize backend 'cuda': ..."))
  assert not f.filter(rec(logging.INFO, "saved", path="/x/orbax/checkpoint/manager.py"))


@pytest.fixture
def quick_classifier(tmp_path_factory, monkeypatch):
  """A digit classifier in a private cache (the metric's default path points there). Untrained
  (freshly initialized weights): the test checks that the accuracy is computed, reported and
  reproduced on a re-run, not its value, so training one would only cost time."""
  import jax.numpy as jnp  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  root = tmp_path_factory.getbasetemp() / "digit_cache"
  path = root / "clf.msgpack"
  if not path.exists():
    size = digits.IMAGE_SIZE
    params = jax.jit(digits.DigitClassifier().init)(jax.random.key(0),
                                                    jnp.zeros((1, size, size, 1)))["params"]
    digits.save_classifier(path, params, {"held_out_accuracy": float("nan"), "train_size": 0,
                                         "held_out_size": 0, "epochs": 0, "seed": 0})
  monkeypatch.setattr(digits, "default_cache_path", lambda: path)
  return path


def digits_config():
  c = tiny_config()
  c.model.update(dict(input_size=32, patch_size=8, num_classes=10))
  c.data.update(dict(name="digits", image_size=32, channels=1, num_classes=10))
  c.sample.update(dict(every=2, method="euler", num_steps=3, cfg_scale=2.0, guide_channels=-1,
                       classes=tuple(range(10)), per_class=1, digit_accuracy=True))
  return c


def test_rerun_of_a_finished_run_reports_and_rewrites_missing_samples(tmp_path, quick_classifier):
  from edit_jax import main  # noqa: PLC0415
  wd = tmp_path / "digits"
  r = train.train_and_evaluate(digits_config(), str(wd))
  latest = (wd / "samples" / "latest.json")
  import json  # noqa: PLC0415
  info = json.loads(latest.read_text())
  assert info["step"] == 2 and info["num_train_steps"] == 2 and info["num_samples"] == 10
  assert r["digit_accuracy"] == info["digit_accuracy"] and 0.0 <= r["digit_accuracy"] <= 1.0
  assert r["samples"].endswith("step_0000002.png")
  line = main.final_line(r)
  assert line.startswith("done: step 2/2 (done); ")
  assert f"{100 * r['digit_accuracy']:.1f}% of the 10 sampled digits are classified" in line
  # The run stopped before writing its samples (simulated): a re-run trains nothing, writes them.
  shutil.rmtree(wd / "samples")
  before = snapshot(wd / "checkpoints")
  again = train.train_and_evaluate(digits_config(), str(wd))
  assert again["step"] == 2 and again["digit_accuracy"] == r["digit_accuracy"]
  assert json.loads(latest.read_text()) == info
  assert snapshot(wd / "checkpoints") == before


SIGINT_CHILD = """
import os, signal, sys, threading
sys.path.insert(0, {root!r})
from absl import logging
from edit_jax import train, main
sys.path.insert(0, {tests!r})
from test_train import tiny_config
c = tiny_config()
c.num_train_steps = 10 ** 6
c.checkpoint_every = 10 ** 6
orig = train.make_train_step
def make(*a, **k):
  step = orig(*a, **k)
  def wrapped(state, batch, rng):
    out = step(state, batch, rng)
    if int(out[0].step) == 3:
      os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C after step 3
    return out
  return wrapped
train.make_train_step = make
r = train.train_and_evaluate(c, {wd!r})
print("RESULT", r["step"], r["stopped"], main.final_line(r), flush=True)
"""


def test_ctrl_c_saves_and_the_rerun_continues(tmp_path):
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = pathlib.Path(__file__).resolve().parents[1]
  wd = tmp_path / "int"
  script = SIGINT_CHILD.format(root=str(root), tests=str(root / "tests"), wd=str(wd))
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu"))
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  result = [line for line in p.stdout.splitlines() if line.startswith("RESULT")][0].split()
  stopped_at = int(result[1])
  assert result[2] == "interrupted" and 3 <= stopped_at < 10
  assert checkpoint.Checkpointer(wd / "checkpoints", read_only=True).all_steps() == [stopped_at]
  assert f"stopping at step {stopped_at}" in p.stderr and "Ctrl-C" in p.stderr
  c = tiny_config()
  c.num_train_steps = stopped_at + 1
  r = train.train_and_evaluate(c, str(wd))  # continues: one more step, not from 0
  assert r["step"] == stopped_at + 1
  assert checkpoint.Checkpointer(wd / "checkpoints", read_only=True).all_steps() == [
      stopped_at, stopped_at + 1]
