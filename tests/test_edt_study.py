"""benchmarks/edt_study.py: its Markdown is computed from the JSON, and the section committed in
docs/benchmarks.md is exactly what the committed JSON renders (no hand-edited figures)."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import edt_study  # noqa: E402


def test_markdown_observations_and_section_replacement(tmp_path, monkeypatch):
  meta = {"command": "benchmarks/edt_study.py", "machine": "cpu", "date": "d"}
  masked = dict(meta, train_steps=10, num_samples=20, sample_steps=3, cfg_scale=3.0,
                real_floor={"num": 20, "fdd": 1.0, "accuracy": 0.9}, train_time={},
                rows=[{"training": t, "step": 10, "amm": a, "fdd": f, "accuracy": 0.5}
                      for t, a, f in [("plain", "7,10", 50.0), ("plain", "off", 60.0),
                                      ("masked", "7,10", 40.0), ("masked", "off", 45.0)]])
  amm = dict(meta, train_steps=10, num_samples=4, sample_steps=3, cfg_scale=3.0,
             noise_check_off={"fdd": 52.0, "accuracy": 0.5},
             rows=[{"amm_blocks": "off", "fdd": 50.0, "accuracy": 0.5},
                   {"amm_blocks": "3", "fdd": 40.0, "accuracy": 0.6},
                   {"amm_blocks": "all", "fdd": 51.0, "accuracy": 0.5}])
  md = edt_study.build_markdown({"masked": masked, "amm_sit": amm})
  assert "masked FDD 40.0 vs plain 50.0 (-10.0)" in md
  assert "FDD 60.0 -> 50.0 (-10.0)" in md
  assert "blocks 3: FDD -10.0 vs off (better; noise 2.0)" in md
  assert "blocks all: FDD +1.0 vs off (within sampling noise" in md
  assert "(20 held-out digits, 2 of each class): FDD 1.0" in md
  out = tmp_path / "b.md"
  out.write_text("# B\n" + edt_study.BEGIN + "\nstale\n" + edt_study.END + "\nafter\n")
  monkeypatch.setattr(edt_study, "RESULTS_DIR", tmp_path)  # no JSON: an empty section replaces it
  edt_study.render(out)
  text = out.read_text()
  assert "stale" not in text and text.endswith("after\n") and text.count(edt_study.BEGIN) == 1


def test_committed_section_is_rendered_from_the_committed_json():
  parts = {p: edt_study.read_part(p) for p in edt_study.PARTS}
  parts = {k: v for k, v in parts.items() if v}
  assert "flops" in parts
  text = (ROOT / "docs" / "benchmarks.md").read_text()
  assert edt_study.build_markdown(parts) in text
