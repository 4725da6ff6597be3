"""launch/tpu.sh and launch/gpu.sh run against stub `gcloud`, `nvidia-smi`, `python3.11`, `sudo`
and `apt-get` on PATH that record their command lines (and, for `gcloud ... ssh --command` of setup and train, run
the remote command locally in one fake home per TPU worker, so its quoting is exercised; logs and
stop are only recorded: `stop`'s pkill must not run here):
every verb, all workers, EDIT_JAX_DISTRIBUTED=1, config and overrides passed through intact,
jax[tpu] / jax[cuda*] pinned to the range of requirements.txt."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_RANGE = re.search(r"^jax([<>=].*)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
NUM_WORKERS = 2

STUB = r'''#!{python}
"""Recording stub: appends one JSON line per call to $STUB_LOG."""
import json, os, pathlib, shutil, subprocess, sys
prog = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps({{"prog": prog, "argv": args, "cwd": os.getcwd(),
                      "worker": os.environ.get("STUB_WORKER"),
                      "env": {{k: os.environ.get(k) for k in ("EDIT_JAX_DISTRIBUTED",
                              "XLA_PYTHON_CLIENT_MEM_FRACTION")}}}}) + "\n")
if prog.startswith("python") and args[:2] == ["-m", "venv"]:
  b = pathlib.Path(args[2]) / "bin"
  b.mkdir(parents=True, exist_ok=True)
  for n in ("pip", "python"):
    shutil.copy(sys.argv[0], b / n)
elif prog == "nvidia-smi":
  print("| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: "
        + os.environ.get("STUB_CUDA", "12.8") + "     |")
elif prog == "gcloud" and "ssh" in args and os.environ.get("STUB_EXEC") == "1":
  cmd = next(a for a in args if a.startswith("--command="))[len("--command="):]
  worker = next(a for a in args if a.startswith("--worker="))[len("--worker="):]
  ids = range({workers}) if worker == "all" else [int(worker)]
  rc = 0
  for w in ids:  # each TPU worker: its own home directory
    home = pathlib.Path(os.environ["STUB_HOMES"]) / f"worker{{w}}"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), STUB_WORKER=str(w))
    rc |= subprocess.run(["bash", "-c", cmd], env=env, cwd=str(home)).returncode
  sys.exit(rc)
elif prog == "gcloud" and "scp" in args:
  src, dst = [a for a in args if not a.startswith("-") and a not in ("compute", "tpus",
                                                                       "tpu-vm", "scp")]
  shutil.copy(src, dst.split(":", 1)[1])
'''


@pytest.fixture()
def sandbox(tmp_path):
  """A copy of the launch scripts in a fake repo, stub tools first on PATH, a log of calls."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for f in ("launch/tpu.sh", "launch/gpu.sh", "requirements.txt", "pyproject.toml"):
    shutil.copy(ROOT / f, repo / f)
  (repo / "edit_jax").mkdir()
  (repo / "edit_jax" / "__init__.py").write_text("")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub = STUB.format(python=sys.executable, workers=NUM_WORKERS)
  for name in ("gcloud", "nvidia-smi", "python3.11", "sudo", "apt-get"):
    (bin_dir / name).write_text(stub)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
         "STUB_HOMES": str(tmp_path / "homes"), "HOME": str(tmp_path / "home"),
         "TMPDIR": str(tmp_path)}

  def run(script, *args, **extra_env):
    e = dict(env, **extra_env)
    return subprocess.run(["bash", str(repo / "launch" / script), *args], env=e,
                          capture_output=True, text=True, timeout=120)

  def calls(prog=None, wait_for=0):
    deadline = time.time() + 20
    while True:  # background remote commands (nohup ... &) may still be starting
      rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
      rows = [r for r in rows if prog is None or r["prog"] == prog]
      if len(rows) >= wait_for or time.time() > deadline:
        return rows
      time.sleep(0.1)

  return run, calls, tmp_path


TPU_ENV = dict(TPU_NAME="sit-v4-32", ZONE="us-central2-b", PROJECT="proj",
               ACCELERATOR_TYPE="v4-32", BUCKET="gs://bkt")


def _gcloud_flags(argv):
  return {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else True for a in argv
          if a.startswith("--")}


def test_tpu_create_and_delete(sandbox):
  run, calls, _ = sandbox
  r = run("tpu.sh", "create", SPOT="1", **TPU_ENV)
  assert r.returncode == 0, r.stderr
  (c,) = calls("gcloud")
  assert c["argv"][:5] == ["compute", "tpus", "tpu-vm", "create", "sit-v4-32"]
  f = _gcloud_flags(c["argv"])
  assert f["--zone"] == "us-central2-b" and f["--project"] == "proj"
  assert f["--accelerator-type"] == "v4-32" and f["--spot"] is True and "--version" in f
  r = run("tpu.sh", "delete", **TPU_ENV)
  assert r.returncode == 0, r.stderr
  c = calls("gcloud")[-1]
  assert c["argv"][:5] == ["compute", "tpus", "tpu-vm", "delete", "sit-v4-32"]
  assert "--quiet" in c["argv"] and _gcloud_flags(c["argv"])["--zone"] == "us-central2-b"


def test_tpu_setup_installs_pinned_jax_on_every_worker(sandbox):
  run, calls, tmp = sandbox
  r = run("tpu.sh", "setup", STUB_EXEC="1", **TPU_ENV)
  assert r.returncode == 0, r.stdout + r.stderr
  scp, ssh = calls("gcloud")
  assert scp["argv"][3] == "scp" and "--worker=all" in scp["argv"]
  assert ssh["argv"][3] == "ssh" and "--worker=all" in ssh["argv"]
  for w in range(NUM_WORKERS):
    src = tmp / "homes" / f"worker{w}" / "edit_jax"
    assert (src / "launch" / "tpu.sh").is_file() and (src / "requirements.txt").is_file()
  pips = [c for c in calls("pip") if "-r" in c["argv"]]
  assert sorted(c["worker"] for c in pips) == [str(w) for w in range(NUM_WORKERS)]
  for c in pips:
    assert f"jax[tpu]{JAX_RANGE}" in c["argv"], c["argv"]
    assert "jax[tpu]" not in c["argv"] and "gcsfs" in c["argv"]
    assert c["argv"][c["argv"].index("-r") + 1] == "requirements.txt"
  editable = [c for c in calls("pip") if "-e" in c["argv"]]
  assert len(editable) == NUM_WORKERS and all("--no-deps" in c["argv"] for c in editable)
  assert not list(tmp.glob("edit_jax_src.*.tgz"))  # the local tarball is removed
  pathlib.Path(scp["argv"][-4].split(":", 1)[1]).joinpath(
      pathlib.Path(scp["argv"][4]).name).unlink()  # the stub "remote" copy in /tmp


def test_tpu_train_runs_one_distributed_process_per_worker(sandbox):
  run, calls, tmp = sandbox
  for w in range(NUM_WORKERS):  # what `setup` leaves on each worker
    venv = tmp / "homes" / f"worker{w}" / "edit_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    shutil.copy(tmp / "bin" / "gcloud", venv / "python")
  overrides = ["--config.data.path=/mnt/my latents", "--config.sample.classes=(1, 2)",
               "--config.model.name=SiT-XL/2", "--config.note=it's"]
  r = run("tpu.sh", "train", *overrides, CONFIG="configs/sit.py:XL2-med64", RUN="xl2",
          STUB_EXEC="1", **TPU_ENV)
  assert r.returncode == 0, r.stdout + r.stderr
  (ssh,) = calls("gcloud")
  assert "--worker=all" in ssh["argv"]
  procs = calls("python", wait_for=NUM_WORKERS)
  assert sorted(c["worker"] for c in procs) == [str(w) for w in range(NUM_WORKERS)]
  for c in procs:
    assert c["env"]["EDIT_JAX_DISTRIBUTED"] == "1"
    assert c["argv"] == ["-m", "edit_jax.main", "--config=configs/sit.py:XL2-med64",
                         "--workdir=gs://bkt/edit_jax/xl2", *overrides]
    assert c["cwd"].endswith(f"worker{c['worker']}/edit_jax")
  # No extra arguments at all: no stray empty argument reaches the CLI.
  r = run("tpu.sh", "train", RUN="plain", STUB_EXEC="1", **TPU_ENV)
  assert r.returncode == 0, r.stderr
  plain = [c for c in calls("python", wait_for=2 * NUM_WORKERS) if "plain" in " ".join(c["argv"])]
  assert len(plain) == NUM_WORKERS
  assert all(c["argv"] == ["-m", "edit_jax.main", "--config=configs/sit.py:S2-med64",
                           "--workdir=gs://bkt/edit_jax/plain"] for c in plain)


def test_tpu_logs_stop_and_usage(sandbox):
  run, calls, _ = sandbox
  assert run("tpu.sh", "logs", **TPU_ENV).returncode == 0
  assert "--worker=0" in calls("gcloud")[-1]["argv"]
  assert "tail" in _gcloud_flags(calls("gcloud")[-1]["argv"])["--command"]
  assert run("tpu.sh", "stop", **TPU_ENV).returncode == 0
  stop = calls("gcloud")[-1]
  assert "--worker=all" in stop["argv"] and "pkill -TERM" in _gcloud_flags(stop["argv"])["--command"]
  r = run("tpu.sh", "frobnicate", **TPU_ENV)
  assert r.returncode == 1 and "bash launch/tpu.sh create" in r.stdout
  r = run("tpu.sh", "create", TPU_NAME="x")
  assert r.returncode != 0 and "set ZONE" in r.stderr


def test_gpu_setup_pins_jax_cuda_to_the_driver(sandbox):
  run, calls, tmp = sandbox
  for cuda, extra in (("12.8", "cuda12"), ("13.0", "cuda13")):
    shutil.rmtree(tmp / "repo" / ".venv", ignore_errors=True)
    r = run("gpu.sh", "setup", STUB_CUDA=cuda)
    assert r.returncode == 0, r.stdout + r.stderr
    pip = [c for c in calls("pip") if "-r" in c["argv"]][-1]
    assert f"jax[{extra}]{JAX_RANGE}" in pip["argv"], pip["argv"]
  assert [c["argv"][:3] for c in calls("python3.11")] == [["-m", "venv", ".venv"]] * 2
  r = run("gpu.sh", "setup", STUB_CUDA="11.8")
  assert r.returncode == 2 and "CUDA 12 or 13" in r.stderr


def test_gpu_setup_without_driver(sandbox, tmp_path):
  run, _, tmp = sandbox
  (tmp / "bin" / "nvidia-smi").unlink()
  clean_path = ":".join(p for p in os.environ["PATH"].split(":")
                        if not (pathlib.Path(p) / "nvidia-smi").exists())
  r = run("gpu.sh", "setup", PATH=f"{tmp / 'bin'}:{clean_path}")
  assert r.returncode == 2 and "nvidia-smi not found" in r.stderr


def test_gpu_train_single_and_multi_node(sandbox):
  run, calls, tmp = sandbox
  venv = tmp / "repo" / ".venv" / "bin"
  venv.mkdir(parents=True)
  shutil.copy(tmp / "bin" / "gcloud", venv / "python")  # the recording stub
  overrides = ["--config.data.path=/data/my latents", "--config.model.dtype=bfloat16"]
  r = run("gpu.sh", "train", *overrides, CONFIG="configs/sit.py:B2-med64", WORKDIR="/w/b2")
  assert r.returncode == 0, r.stderr
  (c,) = calls("python")
  assert c["argv"] == ["-m", "edit_jax.main", "--config=configs/sit.py:B2-med64",
                       "--workdir=/w/b2", *overrides]
  assert c["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  r = run("gpu.sh", "train", *overrides, NUM_NODES="4", NODE_RANK="3", COORDINATOR="node0:1234")
  assert r.returncode == 0, r.stderr
  c = calls("python")[-1]
  assert c["argv"] == ["-m", "edit_jax.main", "--config=configs/sit.py:S2-med64",
                       "--workdir=runs/sit-S2-med64", "--config.distributed.enabled=true",
                       "--config.distributed.coordinator_address=node0:1234",
                       "--config.distributed.num_processes=4",
                       "--config.distributed.process_id=3", *overrides]
  r = run("gpu.sh", "train", SLURM_NTASKS="8")
  assert r.returncode == 0, r.stderr
  assert calls("python")[-1]["argv"][-1] == "--config.distributed.enabled=true"
  r = run("gpu.sh", "train", NUM_NODES="2", COORDINATOR="node0:1234")
  assert r.returncode != 0 and "set NODE_RANK" in r.stderr
  assert len(calls("python")) == 3
