"""What a user running the documented commands in a clone leaves behind: benchmark scripts print
unless asked to write the tracked results, and the output folders the docs suggest are ignored."""
import json
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flops_benchmark_prints_and_writes_only_when_asked(tmp_path, monkeypatch, capsys):
  from benchmarks import flops as bench  # noqa: PLC0415
  monkeypatch.chdir(tmp_path)                       # the tracked path is relative to the cwd
  rows = bench.main([])
  assert "SiT-XL/2" in capsys.readouterr().out and len(rows) > 10
  assert list(tmp_path.iterdir()) == []              # a plain run writes nothing
  bench.main(["--json", "mine.json"])
  assert json.loads((tmp_path / "mine.json").read_text())["rows"] == rows
  calls = []
  monkeypatch.setattr(bench.flops, "xla_gflops", lambda m: calls.append(m) or 1.0)
  bench.main(["--write"])                            # the tracked file keeps every column
  written = json.loads((tmp_path / bench.TRACKED).read_text())
  assert calls and all("XLA/2" in r for r in written["rows"])
  assert written["command"] == "python benchmarks/flops.py --write"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout")
def test_suggested_output_folders_are_ignored():
  paths = ["samples/samples.npz", "dyn/grid.png", "redundancy/redundancy.json",
           "converted/x/model_config.json", "runs/quickstart/config.json"]
  out = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
  assert sorted(out.stdout.split()) == sorted(paths)
