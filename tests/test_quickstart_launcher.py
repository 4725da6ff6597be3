"""launch/quickstart.sh with a stub `.venv/bin/python` (records its calls; the training CLI is
simulated): an existing run is continued in place, never moved aside, and the last line states
the step reached and the digit score the run wrote (samples/latest.json), and says so when the run
stopped before the config's step budget (e.g. a time limit) and how to continue it."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

STUB = r'''#!{python}
import json, os, pathlib, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
if args[:1] == ["-"]:                      # the launcher's closing summary: run it for real
  sys.exit(subprocess.run([{python!r}, *args], stdin=sys.stdin).returncode)
if args[:2] == ["-m", "edit_jax.main"]:    # simulated training: what train_and_evaluate writes
  wd = pathlib.Path(next(a for a in args if a.startswith("--workdir="))[len("--workdir="):])
  (wd / "samples").mkdir(parents=True, exist_ok=True)
  (wd / "samples" / "latest.json").write_text(json.dumps(
      {{"step": int(os.environ["STUB_STEP"]), "num_train_steps": 800,
        "png": str(wd / "samples" / "step_0000800.png"),
        "num_samples": 80, "digit_accuracy": 0.85}}))
'''


@pytest.mark.parametrize("reached", [800, 500])
def test_rerun_continues_in_place_and_reports(tmp_path, reached):
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for f in ("launch/quickstart.sh", "requirements.txt"):
    shutil.copy(ROOT / f, repo / f)
  venv = repo / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text(STUB.format(python=sys.executable))
  (venv / "python").chmod(0o755)
  wd = repo / "runs" / "quickstart"
  (wd / "checkpoints" / "400").mkdir(parents=True)   # an interrupted or finished earlier run
  (wd / "samples").mkdir()
  (wd / "samples" / "latest.png").write_bytes(b"png")
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, STUB_LOG=str(log), ACCEL="cpu", STUB_STEP=str(reached))
  r = subprocess.run(["bash", str(repo / "launch" / "quickstart.sh"), "--config.seed=1"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert sorted(p.name for p in (repo / "runs").iterdir()) == ["quickstart"]  # nothing moved
  assert (wd / "checkpoints" / "400").is_dir() and (wd / "samples" / "latest.png").is_file()
  calls = [json.loads(x) for x in log.read_text().splitlines()]
  train = [c for c in calls if c[:2] == ["-m", "edit_jax.main"]]
  assert train == [["-m", "edit_jax.main", "--config=configs/quickstart.py",
                    "--workdir=runs/quickstart", "--config.seed=1"]]
  assert "continuing it" in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  assert f"step {reached} of 800," in last and "85.0% of the 80 sampled digits" in last
  assert ("run the same command again to continue" in last) == (reached < 800)
  assert "samples in runs/quickstart/samples/step_0000800.png" in last
