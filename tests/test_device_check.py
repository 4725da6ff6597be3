"""benchmarks/device_check.py: the dry run covers every section, and the budget plumbing holds.

The dry run runs in a subprocess with ml_collections, grain, clu and tensorboardX blocked (the GPU
machine has none of them), on CPU at tiny sizes with the Pallas kernel interpreted. The Runner
tests use a fake clock: no wall-clock time is asserted anywhere.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import device_check as dc

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("ml_collections", "grain", "clu", "tensorboardX")

# Runs the script as __main__ with the modules the GPU machine lacks made unimportable.
LAUNCH = f"""
import runpy, sys
BLOCKED = {BLOCKED!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = ["benchmarks/device_check.py"] + sys.argv[1:]
runpy.run_path("benchmarks/device_check.py", run_name="__main__")
"""


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device, as on the GPU machine's host side; the suite's compile-speed flags otherwise
  # (conftest.py): the dry run is compile-bound.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = str(ROOT)
  return env


def _launch(args, **kw):
  return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  proc = _launch(["--dry-run", "--out", str(out), "--budget-s", "900"])
  log, _ = proc.communicate(timeout=900)
  return proc.returncode, out, log


def test_dry_run_runs_every_section_without_optional_modules(dry_run):
  rc, out, log = dry_run
  assert rc == 0, log[-4000:]
  res = json.loads((out / "device_check.json").read_text())
  assert res["meta"]["status"] == "done" and res["meta"]["dry_run"]
  # The blocker really hid the optional modules from the script (and nothing needed them).
  assert sorted(res["env"]["missing_optional_modules"]) == sorted(BLOCKED)
  names = [s for s, _, _ in dc.SECTIONS]
  assert list(res["sections"]) == names
  for name in names:
    sec = res["sections"][name]
    assert "error" not in sec, (name, sec.get("traceback"))
    assert sec["items"], f"section {name} ran no item"
    for it in sec["items"]:
      assert it["status"] == "ok", (name, it)
  assert res["meta"]["counts"] == {"ok": sum(len(s["items"]) for s in res["sections"].values()),
                                   "failed": 0, "error": 0, "skipped": 0}


def test_dry_run_results_are_complete_and_consistent(dry_run):
  _, out, _ = dry_run
  res = json.loads((out / "device_check.json").read_text())
  items = {s: [it["result"] for it in sec["items"]] for s, sec in res["sections"].items()}
  peaks = res["peaks"]
  assert peaks["matmul_tflops_bfloat16"] > 0 and peaks["matmul_tflops_float32"] > 0
  assert peaks["bandwidth_gbs"] > 0
  (check,) = items["correctness"]
  assert check["ok"] and set(check["errs"]) == set(dc_names())
  assert check["worst"] < 2e-2          # bf16 kernel vs the exact answer
  kernel = {(r["impl"], r["mode"]) for r in items["kernel"]}
  assert kernel == {("pallas", "fwdbwd"), ("xla", "fwdbwd"), ("full", "fwdbwd")}
  for r in items["kernel"]:
    assert r["ms"] > 0 and r["flops"] > 0 and r["floor_bytes"] > 0 and r["bw_frac"] > 0
  assert items["kernel"][0]["err"] < 5e-2
  assert len(items["autotune"]) == 2 and res["sections"]["autotune"]["best"]
  variants = {r["variant"] for r in items["model"]}
  assert variants == {"full", "mediators-xla", "mediators-pallas"}
  (train,) = items["train"]
  assert train["loss_finite"] and train["params_dtype"] == "float32"
  assert train["images_per_s"] > 0 and train["mfu_measured_peak"] > 0
  # MFU is against the measured peak: images/s x FLOPs/image / peak.
  want = train["images_per_s"] * train["train_gflops_per_image"] / 1e3 / peaks[
      "matmul_tflops_float32"]
  assert train["mfu_measured_peak"] == pytest.approx(want, rel=0.02)
  (sample,) = items["sample"]
  assert sample["finite"] and sample["forwards_per_image"] == 2 * (sample["steps"] - 1)
  edt = {(r["model"], r["variant"]) for r in items["edt"]}
  assert edt == {("SiT-S/2", "full"), ("EDT-S/2", "no AMM"), ("EDT-S/2", "AMM post_softmax"),
                 ("EDT-S/2", "AMM log_bias")}
  assert all(r["ms"] > 0 and r["gflops_per_image"] > 0 for r in items["edt"])
  assert {tuple(r["amm_blocks"]) for r in items["edt"] if "AMM " in r["variant"]} == {(1, 2)}
  md = (out / "device_check.md").read_text()
  for header in ("## Environment", "## Measured peaks", "## Kernel correctness", "## Kernel timing",
                 "## Block-size sweep", "## Model forward", "## Training step", "## Sampling",
                 "## EDT-S/2 vs SiT-S/2 forward"):
    assert header in md
  row = next(ln for ln in md.splitlines() if ln.startswith("| SiT-B/2 | 64 | 2 | float32"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert all(cells[4:10]), row        # full / xla / pallas ms, both time ratios, FLOPs ratio


def dc_names():
  from benchmarks.mediator_kernel import CHECK_NAMES
  return CHECK_NAMES


class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def _runner(tmp_path, budget, clock, **kw):
  return dc.Runner(tmp_path, budget, {"command": "test"}, kw.pop("match", None), clock=clock,
                   t_start=clock(), reserve_s=0.0, **kw)


def test_runner_skips_what_does_not_fit_and_saves_after_every_item(tmp_path):
  clock = FakeClock()
  run = _runner(tmp_path, 100.0, clock)

  def work(seconds, value):
    def fn():
      clock.t += seconds
      return {"value": value}
    return fn

  run.start_section("a", 1.0, 2.0)                 # 50 s of 100
  assert run.results["sections"]["a"]["allowance_s"] == 50.0
  assert run.item("one", 5.0, work(10.0, 1)) == {"value": 1}     # first item: not calibrated on
  saved = json.loads((tmp_path / "device_check.json").read_text())
  assert saved["sections"]["a"]["items"][0]["result"] == {"value": 1}
  assert run.item("two", 10.0, work(20.0, 2)) == {"value": 2}    # took 2x its guess
  # 20 s left; a guess of 12 s is scaled by the observed 2x -> 24 s: skipped, with the reason.
  assert run.item("three", 12.0, work(1.0, 3)) is None
  rec = run.results["sections"]["a"]["items"][2]
  assert rec["status"] == "skipped" and "estimated 24 s, 20 s left" in rec["reason"]
  assert run.item("four", 8.0, work(1.0, 4)) == {"value": 4}     # 16 s estimated: fits
  run.end_section()
  # The next section gets all the time the first one left (it is the last one: weight 1 of 1).
  run.start_section("b", 1.0, 1.0)
  assert run.results["sections"]["b"]["allowance_s"] == 69.0

  def boom():
    clock.t += 1.0
    raise RuntimeError("Triton compile failed")

  assert run.item("bad", 1.0, boom) is None
  assert run.item("after", 1.0, work(1.0, 5), check=lambda r: ["wrong"]) == {"value": 5}
  items = run.results["sections"]["b"]["items"]
  assert items[0]["status"] == "error" and "Triton compile failed" in items[0]["error"]
  assert items[1]["status"] == "failed" and items[1]["problems"] == ["wrong"]
  md = (tmp_path / "device_check.md").read_text()
  assert "Triton compile failed" in md and "would not fit" in md


def test_runner_match_and_forced_items(tmp_path):
  clock = FakeClock()
  run = _runner(tmp_path, 10.0, clock, match=r"^s/keep")
  run.start_section("s", 1.0, 1.0)
  assert run.item("drop me", 0.0, lambda: 1) is None
  assert run.item("keep me", 0.0, lambda: 2) == 2
  assert run.item("keep big", 100.0, lambda: 3) is None                  # does not fit
  assert run.item("keep forced", 100.0, lambda: 4, force=True) == 4      # env always runs
  assert [it["name"] for it in run.results["sections"]["s"]["items"]] == [
      "keep me", "keep big", "keep forced"]


def test_bad_arguments_exit_2():
  for args in (["--sections", "model,nope"], ["--budget-s", "0"], ["--match", "("]):
    proc = subprocess.run([sys.executable, "benchmarks/device_check.py", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (args, proc.stderr)
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_sigterm_leaves_a_valid_json_marked_terminated(tmp_path):
  proc = _launch(["--dry-run", "--out", str(tmp_path), "--sections", "correctness"])
  path = tmp_path / "device_check.json"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:     # wait until an item is running
    try:
      if json.loads(path.read_text())["meta"].get("current", "").startswith("correctness/"):
        break
    except (OSError, ValueError):
      pass
    time.sleep(0.2)
  else:
    proc.kill()
    pytest.fail("the dry run never started an item")
  proc.send_signal(signal.SIGTERM)
  log, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, log[-3000:]
  res = json.loads(path.read_text())
  assert res["meta"]["status"].startswith("terminated (SIGTERM) during correctness/"), res["meta"]
  assert res["sections"]["env"]["items"][0]["status"] == "ok"     # finished work is kept
  assert "terminated" in (tmp_path / "device_check.md").read_text()


def test_real_plan_without_accelerator_stops_after_env(tmp_path):
  """Without --dry-run on a machine whose jax sees no GPU/TPU, nothing heavy runs on the CPU."""
  proc = _launch(["--out", str(tmp_path), "--budget-s", "30"])
  log, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, log[-3000:]
  res = json.loads((tmp_path / "device_check.json").read_text())
  assert res["meta"]["status"].startswith("aborted: no accelerator: jax's backend is 'cpu'")
  assert list(res["sections"]) == ["env"]
