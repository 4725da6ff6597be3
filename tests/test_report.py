"""Smoke tests of the results report's pure functions (benchmarks/report.py): no training."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402


def test_parse_parts():
  assert report.parse_parts("all") == report.PARTS
  assert report.parse_parts("speed, flops") == ("speed", "flops")
  with pytest.raises(ValueError, match=r"unknown report part\(s\) \['fid'\]: choose from flops"):
    report.parse_parts("flops,fid")
  with pytest.raises(ValueError, match="choose from"):
    report.parse_parts(" , ")


def test_parse_rho_pairs():
  assert report.parse_rho_pairs("0.9:0.8, 0.6:0.4") == ((0.9, 0.8), (0.6, 0.4))
  with pytest.raises(ValueError, match=r"bad rho pair '0.9': write pairs as rho1:rho2"):
    report.parse_rho_pairs("0.9")
  with pytest.raises(ValueError, match=r"rho pair '1.2:0.5': both ratios must lie in \(0, 1\)"):
    report.parse_rho_pairs("1.2:0.5")
  with pytest.raises(ValueError, match="no rho pairs given"):
    report.parse_rho_pairs(",")


def test_checkpoint_steps_and_names():
  assert report.checkpoint_steps(600, 4) == [150, 300, 450, 600]
  assert report.checkpoint_steps(1000, 3) == [333, 667, 1000]
  assert report.checkpoint_steps(7, 1) == [7]
  with pytest.raises(ValueError, match=r"need 1 <= count \(5\) <= total steps \(4\)"):
    report.checkpoint_steps(4, 5)
  assert report.run_name(0, 600, 0) == "full_steps600_seed0"
  assert report.run_name(16, 600, 1) == "med16_steps600_seed1"
  assert [report.attn_label(n) for n in (0, 64)] == ["full", "n=64"]


def test_train_config_overrides_quickstart():
  c = report.train_config(64, 600, 1, 4)
  assert (c.model.mediator_num, c.num_train_steps, c.seed) == (64, 600, 1)
  assert c.checkpoint_every == 150 and c.keep_checkpoints >= 4 and c.sample.every == 0
  assert (c.model.hidden_size, c.model.depth, c.data.name) == (128, 4, "digits")


def test_md_table_and_pareto():
  text = report.md_table([{"a": 1.23456, "b": "x"}, {"a": None}], ["a", "b"], {"a": ".2f"})
  assert text.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |", "| - |  |"]
  # (cost, loss): (2, 5) is dominated by (1, 4); (3, 1) and (1, 4) are not.
  assert report.pareto_front([(1.0, 4.0), (2.0, 5.0), (3.0, 1.0)]) == [0, 2]
  assert report.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


def test_flops_rows_reproduce_published_table():
  rows = {(r["model"], r["resolution"]): r for r in report.flops_rows()}
  # Published fvcore numbers on the official code (edit_jax.flops.PUBLISHED).
  assert rows[("SiT-S/2", 256)]["full"] == pytest.approx(6.066, abs=1e-3)
  assert rows[("SiT-S/2", 256)]["n=4"] == pytest.approx(5.493, abs=1e-3)
  assert rows[("SiT-B/2", 1024)]["full"] == pytest.approx(657.640, abs=1e-3)
  assert rows[("SiT-B/2", 1024)]["n=64"] == pytest.approx(358.746, abs=1e-3)
  assert rows[("SiT-B/2", 512)]["tokens"] == 1024
  r = rows[("SiT-S/2", 1024)]
  assert r["n=64 / full"] == pytest.approx(r["n=64"] / r["full"])


def _fake_parts():
  machine = {"machine": "cpu (test)", "date": "2026-01-01 00:00 UTC"}
  quality = {"command": "python benchmarks/report.py --parts quality", **machine,
             "train_steps": 20, "checkpoints": [10, 20], "num_samples": 50, "sample_steps": 10,
             "sampler": "Euler ODE", "eval_seed": 0, "classifier": {"held_out_accuracy": 0.98},
             "real_reference": {"num": 50, "fdd": 30.0, "accuracy": 0.98, "per_class": [5] * 10},
             "train_config": {"global_batch_size": 48, "depth": 3, "hidden_size": 96,
                              "num_heads": 4, "patch_size": 4, "image_size": 32, "channels": 1,
                              "tokens": 64, "params": 1_234_567, "schedule": "cosine",
                              "learning_rate": 3e-3, "warmup_steps": 100,
                              "quickstart_steps": 1700, "fdd_reference_digits": 4500},
             "eval_noise_check": {"attention": "full", "step": 20, "seeds": [0, 1],
                                  "fdd": [40.0, 44.0], "accuracy": [0.9, 0.8]},
             "rows": [{"attention": report.attn_label(n), "mediators": n, "seed": s,
                       "step": st, "fdd": 100.0 - st - n / 8 + s, "accuracy": 0.5 + st / 100}
                      for n in (0, 4, 16, 64) for s in ((0, 1) if n == 0 else (0,))
                      for st in (10, 20)]}
  dyn = {"command": "python benchmarks/report.py --parts dynamic", **machine, "nfe": 9,
         "train_steps": 20, "first_several": 3, "num_samples": 50,
         "rows": [{"schedule": "static n=4", "rho": None, "fdd": 50.0, "accuracy": 0.7,
                   "gflops_per_image": 1.0, "steps_per_stage": None},
                  {"schedule": "static n=64", "rho": None, "fdd": 40.0, "accuracy": 0.8,
                   "gflops_per_image": 2.0, "steps_per_stage": None},
                  {"schedule": "dynamic rho=(0.6, 0.4)", "rho": [0.6, 0.4], "fdd": 45.0,
                   "accuracy": 0.75, "gflops_per_image": 1.5, "steps_per_stage": [3, 3, 3]},
                  {"schedule": "dynamic rho=(0.9, 0.8)", "rho": [0.9, 0.8], "fdd": 46.0,
                   "accuracy": 0.75, "gflops_per_image": 1.9, "steps_per_stage": [1, 1, 7]}]}
  return {"quality": quality, "dynamic": dyn}


def test_observations_and_markdown():
  parts = _fake_parts()
  obs = report.quality_observations(parts["quality"])
  # final step 20: FDD = 80 - n/8 (+1 for seed 1): n=64 best (72), full mean (80 + 81) / 2.
  assert obs[0] == ("At step 20: ranking by Frechet digit distance (best first): n=64 72.0, "
                    "n=16 78.0, n=4 79.5, full 80.5.")
  assert "Training-seed spread (full, seeds [0, 1]): FDD 80.0, 81.0 (range 1.0)." in obs
  assert any(o.startswith("Sampling-noise spread (full, step 20") for o in obs)
  dyn = report.dynamic_observations(parts["dynamic"])
  # (1.9, 46) is dominated by (1.5, 45); the other three points are on the front.
  assert "rho=(0.9, 0.8)" not in dyn[0] and "dynamic rho=(0.6, 0.4) (1.50, 45.0)" in dyn[0]
  text = report.build_markdown(parts, {"dynamic": "results/dynamic.png"})
  assert "## 3. Quality vs training steps" in text and "## 4a. Dynamic" in text
  assert "## 4b." not in text
  assert "## 1." not in text  # parts without results are left out
  assert "![quality vs GFLOPs](results/dynamic.png)" in text
  assert "`python benchmarks/report.py --parts quality` on cpu (test)" in text


def test_plots_are_small_pngs(tmp_path):
  parts = _fake_parts()
  for name, fn in (("quality", report.plot_quality), ("dynamic", report.plot_dynamic)):
    path = fn(parts[name], tmp_path / f"{name}.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_published_check_pairs_our_values():
  rows = [{"model": "SiT-S/2", "resolution": 256, "full": 6.0, "n=4": 5.5, "n=4 / full": 0.9}]
  got = report.published_check(rows, [("SiT-S/2", 256, 0, 6.066), ("SiT-S/2", 256, 4, 5.493),
                                      ("SiT-S/2", 256, 16, 5.551), ("SiT-B/2", 256, 0, 23.0)])
  assert got == [{"model": "SiT-S/2", "resolution": 256, "mediators": 0, "ours": 6.0,
                  "published": 6.066},
                 {"model": "SiT-S/2", "resolution": 256, "mediators": 4, "ours": 5.5,
                  "published": 5.493}]


def test_eval_steps_and_seeds():
  import argparse  # noqa: PLC0415
  args = argparse.Namespace(train_steps=600, num_checkpoints=4, eval_steps="600,150",
                            second_seed="0")
  assert report.eval_steps(args) == [150, 600]
  assert report.seeds_for(args, 0) == [0, 1] and report.seeds_for(args, 16) == [0]
  args.eval_steps = "200"
  with pytest.raises(ValueError, match=r"--eval_steps \[200\] are not saved checkpoints: .* "
                                       r"they are \[150, 300, 450, 600\]"):
    report.eval_steps(args)


def test_discussion_lists_cuts():
  text = "\n".join(report.discussion(_fake_parts()))
  assert "training shortened to 20 steps per model" in text
  assert "50 samples per evaluation instead of 500" in text
  assert "Euler ODE with 10 grid points" in text
  assert "2 rho pairs" in text
  # fake data: full FDD 80 / 81 (seeds 0 / 1) at step 20, mediators 79.5 / 78 / 72.
  assert ("At step 20 the mediator models (FDD 72-80) are below full attention (80, 81 over 2 "
          "training seeds); all mediator models beat every full-attention seed at step(s) 10, "
          "20 of 10, 20. The three n are within 7.5 of each other (sampling-noise spread of one "
          "model: 4.0)") in text
  assert "Full attention's training-seed spread (1) is of the order" in text


def test_rarely_switching_schedule_is_flagged():
  parts = _fake_parts()
  for r in parts["dynamic"]["rows"]:
    if r["rho"] is not None:
      r["steps_per_stage"] = [9, 0, 0]
  text = report.build_markdown({"dynamic_sde": parts["dynamic"]}, {})
  assert "## 4b. Dynamic mediator schedule (Euler SDE)" in text
  assert "- For 2 of the 2 rho pairs the samples spend >= 95% of the steps at n = 4" in text


def test_stratified_subset_covers_every_class():
  import numpy as np  # noqa: PLC0415
  from edit_jax.eval import digits  # noqa: PLC0415
  _, _, _, hy = digits.digits_split()
  assert list(hy[:300]) == sorted(hy[:300])  # held-out digits come sorted by class:
  assert set(hy[:300]) != set(range(10))     # the first 300 miss classes
  idx = report.stratified_subset(hy, 300)
  assert len(idx) == len(set(idx.tolist())) == 300
  np.testing.assert_array_equal(np.bincount(hy[idx], minlength=10), [30] * 10)
  idx = report.stratified_subset(hy, 25)
  np.testing.assert_array_equal(np.bincount(hy[idx], minlength=10), [3] * 5 + [2] * 5)
  assert len(report.stratified_subset(hy, 10 ** 6)) == len(hy)
  with pytest.raises(ValueError, match="class 1 has 1 examples, fewer than the 2"):
    report.stratified_subset(np.array([0, 0, 0, 0, 1]), 4)


def test_experiment_text_comes_from_the_recorded_config():
  """Batch, model and the quickstart's own step count are read from the results' train_config,
  never written into the text by hand."""
  parts = _fake_parts()
  text = report.build_markdown(parts, {})
  assert ("model (3 blocks, width 96, 4 heads, patch 4 on 32x32x1 digits, 64 tokens, 1,234,567 "
          "parameters) trained for 20 steps (batch 48, lr 0.003 with 100 warm-up steps and the "
          "cosine schedule over 20 steps; the quickstart itself trains 1,700)") in text
  assert "FDD against the 4,500 training digits" in text
  assert "50 held-out real digits (5 of each class) score FDD 30.0, accuracy 0.980" in text
  assert "1.2M-parameter quickstart model, 20 steps at batch 48 (the quickstart config trains 1,700)" in text
  assert "batch 64" not in text and "3,000" not in text


def test_experiment_description_reads_the_quickstart_config():
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("qs", report.ROOT / "configs" / "quickstart.py")
  qs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qs)
  c = qs.get_config()
  d = report.experiment_description(600, 4, 4500)
  assert d["global_batch_size"] == c.global_batch_size
  assert d["quickstart_steps"] == c.num_train_steps
  assert (d["depth"], d["hidden_size"], d["patch_size"], d["tokens"]) == (
      c.model.depth, c.model.hidden_size, c.model.patch_size,
      (c.model.input_size // c.model.patch_size) ** 2)
  assert 1.0e6 < d["params"] < 2.0e6 and d["fdd_reference_digits"] == 4500


def test_committed_results_floor_is_stratified():
  """docs/results.md's real-data floor comes from a stratified selection (every class)."""
  q = report.read_part("quality")
  ref = q["real_reference"]
  assert ref["per_class"] == [ref["num"] // 10] * 10
  text = (report.ROOT / "docs" / "results.md").read_text()
  assert f"score FDD {ref['fdd']:.1f}, accuracy {ref['accuracy']:.3f}" in text


def test_real_reference_scores_every_class(monkeypatch):
  import numpy as np  # noqa: PLC0415
  seen = {}

  def fake_score(images, labels, real, classifier):
    seen["labels"] = np.asarray(labels)
    return {"fdd": 1.0, "accuracy": 1.0}

  monkeypatch.setattr(report, "score_digits", fake_score)
  hy = np.repeat(np.arange(10), 50)  # sorted by class, as the held-out digits are
  hx = np.zeros((500, 32, 32, 1), np.float32)
  ref = report.real_reference(300, None, (hx, hy), None)
  np.testing.assert_array_equal(np.bincount(seen["labels"], minlength=10), [30] * 10)
  assert ref["num"] == 300 and ref["per_class"] == [30] * 10


def _objectives_payload(rows, seeds=(0, 1)):
  train = [{"objective": o, "seed": s, "final_loss": 0.1 + s, "cpu_seconds": 100.0}
           for s in seeds for o in ("transport", "gaussian")]
  return {"command": "python benchmarks/gaussian_vs_transport.py", "machine": "cpu", "date": "d",
          "git_revision": "abc", "recipe_revision": "abc", "steps": 1500, "seeds": list(seeds),
          "num_samples": 500, "nfe": 50, "cfg_scale": 3.0,
          "configs": {"transport": "configs/quickstart.py", "gaussian": "configs/dit.py:digits"},
          "train": train, "rows": rows, "real_reference": {"fdd": 1.0, "accuracy": 0.99}}


def _obj_row(obj, seed, sampler, natural, nfe, fdd, acc):
  return {"objective": obj, "seed": seed, "sampler": sampler, "natural": natural, "nfe": nfe,
          "fdd": fdd, "accuracy": acc}


def test_objectives_rows_pair_seeds_and_average():
  rows = [_obj_row("gaussian", 0, "DDIM-50", True, 50, 30.0, 0.8),
          _obj_row("transport", 0, "Euler ODE-50", False, 50, 22.0, 0.9),
          _obj_row("transport", 0, "Heun ODE-30", True, 58, 20.0, 0.9),
          _obj_row("transport", 1, "Heun ODE-30", True, 58, 40.0, 0.7),
          _obj_row("gaussian", 1, "DDIM-50", True, 50, 10.0, 0.6),
          _obj_row("transport", 1, "Euler ODE-50", False, 50, 24.0, 0.8),
          _obj_row("gaussian", 0, "DDPM-50", False, 50, 25.0, 0.8),
          _obj_row("gaussian", 1, "DDPM-50", False, 50, 26.0, 0.8)]
  out = report.objectives_rows(_objectives_payload(rows))
  assert [(r["objective"], r["sampler"]) for r in out] == [
      ("transport", "Heun ODE-30"), ("transport", "Euler ODE-50"), ("gaussian", "DDIM-50"),
      ("gaussian", "DDPM-50")]
  heun = out[0]
  assert heun["FDD s0"] == 20.0 and heun["FDD s1"] == 40.0 and heun["FDD mean"] == 30.0
  assert heun["acc s1"] == 0.7 and heun["acc mean"] == pytest.approx(0.8) and heun["NFE"] == 58
  text = "\n".join(report.objectives_section(_objectives_payload(rows)))
  assert "| transport | Heun ODE-30 | yes | 58 | 20.0 | 40.0 | 30.0 | 0.900 | 0.700 | 0.800 |" \
      in text
  # natural: transport 30.0 vs gaussian 20.0 (mean) -> gaussian, but seed 0 says transport
  assert ("**Natural samplers.** transport Heun ODE-30 (58 NFE): FDD 30.0, accuracy 0.800; "
          "gaussian DDIM-50 (50 NFE): FDD 20.0, accuracy 0.700 (means over seeds). Lower FDD: "
          "gaussian, in 1 of 2 seeds (the seeds disagree: no verdict).") in text
  assert ("**Best at matched NFE.** transport Euler ODE-50 (50 NFE): FDD 23.0, accuracy 0.850; "
          "gaussian DDPM-50 (50 NFE): FDD 25.5, accuracy 0.800 (means over seeds). Lower FDD: "
          "transport, in 2 of 2 seeds.") in text
  one = report.objectives_section(_objectives_payload(
      [r for r in rows if r["seed"] == 0], seeds=(0,)))
  text1 = "\n".join(one)
  assert "| objective | sampler | natural | NFE | FDD | accuracy |" in text1
  assert "training seed 0 only" in text1 and "seeds disagree" not in text1
