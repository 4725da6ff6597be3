"""Every command line tool reports user errors the same way (edit_jax.cli): one line on stderr,
exit status 2, no traceback (unless --debug), and nothing already written is touched."""
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from edit_jax import cli, convert, models, sample
from edit_jax.eval import redundancy
from random_params import random_params as _random  # tests/random_params.py

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(main, prog, argv, capsys):
  """(exit status, stderr) of ``cli.run(main, prog, argv)``; asserts the one-line format."""
  with pytest.raises(SystemExit) as e:
    cli.run(main, prog, argv)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
  assert "Traceback" not in err
  return e.value.code, err


def digest(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  model = models.build_model(None, input_size=8, patch_size=2, in_channels=3, hidden_size=32,
                             depth=1, num_heads=2, num_classes=10, mediator_num=4)
  params = _random(model, 0, 0.1, as_jax=True)
  root = tmp_path_factory.mktemp("ck")
  convert.save_converted(root / "n4", model, params)
  return str(root / "n4")


def test_helper_one_line_debug_and_bugs(capsys, monkeypatch):
  def bad_input(argv):
    raise ValueError("first line\n  second line")

  code, err = run_cli(bad_input, "prog", ["--x"], capsys)
  assert code == 2 and "ValueError: first line; second line (--debug shows the traceback)" in err
  with pytest.raises(ValueError, match="first line"):
    cli.run(bad_input, "prog", ["--x", "--debug"])
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(ValueError):
    cli.run(bad_input, "prog", [])
  monkeypatch.delenv(cli.DEBUG_ENV)

  def bug(argv):
    raise TypeError("a real bug")
  with pytest.raises(TypeError):  # not a user error: the traceback stays
    cli.run(bug, "prog", [])


def test_sample_cli_user_errors(tiny_ckpt, tmp_path, capsys):
  base = ["--out", str(tmp_path / "o"), "--num_samples", "8", "--batch_size", "8",
          "--num_steps", "4", "--no_progress"]
  prog = "python -m edit_jax.sample"
  cases = [
      (["--ckpt", str(tmp_path / "missing")], "does not exist"),
      (["--ckpt", tiny_ckpt, "--cfg_scale", "-1"], "cfg_scale=-1.0 must be >= 0"),
      (["--ckpt", tiny_ckpt, "--ckpt", tiny_ckpt, "--switch_ratios", "0.8,0.5"],
       "2 models need 1 switch ratios, got 2"),
      (["--ckpt", tiny_ckpt, "--classes", "3,12"], r"labels must be in [0, 9]"),
  ]
  for extra, match in cases:
    code, err = run_cli(sample.main, prog, extra + base, capsys)
    assert code == 2 and match in err, (extra, err)
  assert not (tmp_path / "o").exists()
  # an existing output is refused and left byte-for-byte as it was
  out = tmp_path / "o"
  out.mkdir()
  (out / "samples.npz").write_bytes(b"earlier samples")
  before = digest(out)
  code, err = run_cli(sample.main, prog, ["--ckpt", tiny_ckpt] + base, capsys)
  assert code == 2 and "FileExistsError: refusing to overwrite" in err and "--overwrite" in err
  assert digest(out) == before


def test_convert_cli_names_files_that_are_not_checkpoints(tmp_path, capsys):
  prog = "python -m edit_jax.convert"
  text = tmp_path / "x.npz"
  text.write_text("not numpy at all\n")
  garbage = tmp_path / "g.safetensors"
  garbage.write_bytes(np.random.default_rng(0).bytes(300))
  one = tmp_path / "one.npz"
  np.save(tmp_path / "one.npy", np.zeros(3))
  (tmp_path / "one.npy").rename(one)
  for src, what in [(text, "numpy cannot read it as an .npz"), (one, "single array"),
                    (garbage, "cannot be read as a .safetensors file")]:
    code, err = run_cli(convert.main, prog, [str(src), str(tmp_path / "out")], capsys)
    assert code == 2 and f"{src} is not a checkpoint" in err and what in err, err
    assert "pickle" not in err and "unsafe" not in err
  code, err = run_cli(convert.main, prog, [str(tmp_path / "nope.npz"), str(tmp_path / "o")], capsys)
  assert code == 2 and "does not exist" in err
  assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
  # an existing, non-empty output directory is refused before reading the source
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  code, err = run_cli(convert.main, prog, [str(text), str(tmp_path / "full")], capsys)
  assert code == 2 and "is not empty" in err and "--overwrite" in err
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_redundancy_cli_user_errors(tiny_ckpt, tmp_path, capsys):
  prog = "python -m edit_jax.eval.redundancy"
  code, err = run_cli(redundancy.main, prog, ["--checkpoint", str(tmp_path / "none"), "--out",
                                              str(tmp_path / "r")], capsys)
  assert code == 2 and "does not exist" in err
  code, err = run_cli(redundancy.main, prog, ["--checkpoint", tiny_ckpt, "--out",
                                              str(tmp_path / "r"), "--timesteps", "0"], capsys)
  assert code == 2 and "--timesteps (0)" in err
  code, err = run_cli(redundancy.main, prog, ["--checkpoint", tiny_ckpt, "--out",
                                              str(tmp_path / "r"), "--label", "10"], capsys)
  assert code == 2 and "labels must be in [0, 9]" in err
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "redundancy.json").write_text("{}")
  code, err = run_cli(redundancy.main, prog, ["--checkpoint", tiny_ckpt, "--out",
                                              str(tmp_path / "r")], capsys)
  assert code == 2 and "refusing to overwrite" in err
  assert (tmp_path / "r" / "redundancy.json").read_text() == "{}"


def test_every_cli_exits_2_with_one_line_from_the_shell(tmp_path):
  """The real entry points (`python -m ...`): user errors -> status 2, one line, no traceback;
  the training CLI included (a negative learning rate; a workdir that is a file)."""
  notes = tmp_path / "notes.txt"
  notes.write_text("keep me")
  tiny = ["--config.model.hidden_size=32", "--config.model.depth=1",
          "--config.model.num_heads=2", "--config.model.patch_size=8"]
  cmds = {
      "sample": ["-m", "edit_jax.sample", "--ckpt", str(tmp_path / "none"), "--out",
                 str(tmp_path / "s")],
      "convert": ["-m", "edit_jax.convert", str(notes), str(tmp_path / "c")],
      "redundancy": ["-m", "edit_jax.eval.redundancy", "--checkpoint", str(tmp_path / "none"),
                     "--out", str(tmp_path / "r")],
      "digits": ["-m", "edit_jax.eval.digits", "--samples", str(tmp_path / "none")],
      "main_lr": ["-m", "edit_jax.main", "--config=configs/quickstart.py",
                  f"--workdir={tmp_path / 'w'}", "--config.optim.learning_rate=-1", *tiny],
      "main_file": ["-m", "edit_jax.main", "--config=configs/quickstart.py",
                    f"--workdir={notes}", *tiny],
  }
  expect = {"sample": "does not exist", "convert": "unknown checkpoint format",
            "redundancy": "does not exist", "digits": "does not exist",
            "main_lr": "ConfigError: optim.learning_rate=-1.0 must be > 0",
            "main_file": "is a file, not a directory"}
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  procs = {k: subprocess.Popen([sys.executable, *v], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, v in cmds.items()}
  for k, p in procs.items():
    out, err = p.communicate(timeout=300)
    lines = [line for line in err.splitlines() if " error: " in line or "Error" in line]
    assert p.returncode == 2, (k, out, err[-3000:])
    assert "Traceback" not in err and len(lines) == 1 and expect[k] in lines[0], (k, err[-3000:])
  assert notes.read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
