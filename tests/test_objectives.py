"""objective = "transport" | "gaussian" through training (main.py configs, resume), the sample CLI,
the dynamic mediator schedule, converted checkpoints and FLOPs accounting."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax import checkpoint, convert, flops, models, sample, train
from edit_jax.diffusion import dynamic, gaussian
from random_params import random_params as _random  # tests/random_params.py

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(steps=4):
  c = train.default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.num_train_steps = steps
  c.log_every = 1
  c.checkpoint_every = 2
  c.sample.every = 0
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  c.mesh_shape = (4, 2)
  c.objective = "gaussian"
  c.diffusion.diffusion_steps = 100
  c.sample.update(dict(method="ddim", num_steps=5, cfg_scale=2.0, per_class=1))
  return c


def params_of(result):
  return jax.tree.map(np.asarray, jax.device_get(result["state"].params))


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
  """4 gaussian steps straight, and 2 + resume to 4 in another workdir (samples at the end)."""
  straight = tmp_path_factory.mktemp("straight")
  r4 = train.train_and_evaluate(tiny_config(4), str(straight))
  resumed = tmp_path_factory.mktemp("resumed")
  r2 = train.train_and_evaluate(tiny_config(2), str(resumed))
  c = tiny_config(4)
  c.sample.every = 4
  r = train.train_and_evaluate(c, str(resumed))
  return straight, resumed, r4, r2, r


def test_gaussian_training_resumes_exactly(gaussian_run):
  straight, resumed, r4, r2, r = gaussian_run
  assert r4["step"] == 4 and r2["step"] == 2 and r["step"] == 4 and r["stopped"] == "done"
  for a, b in zip(jax.tree.leaves(params_of(r4)), jax.tree.leaves(params_of(r))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert json.loads((resumed / "config.json").read_text())["objective"] == "gaussian"
  assert (resumed / "samples" / "step_0000004.png").exists()
  assert np.isfinite(r["loss"])


def test_trainer_uses_the_objectives_loss():
  c = tiny_config()
  model = train.get_model(c)
  obj = train.get_objective(c, model)
  assert isinstance(obj, gaussian.GaussianDiffusion) and obj.num_timesteps == 100
  assert obj.model_var_type == "learned_range"
  params = random_params(model, 0)
  x, y = jnp.zeros((8, 8, 8, 1)), jnp.zeros(8, jnp.int32)
  _, aux = jax.jit(train.make_loss_fn(c, model, obj))(params, x, y, jax.random.key(1))
  assert {"mse", "vb"} <= set(aux) and int(aux["t"].max()) < 100
  c.objective = "transport"
  c.sample.method = "heun2"
  obj = train.get_objective(c, model)
  _, aux = jax.jit(train.make_loss_fn(c, model, obj))(params, x, y, jax.random.key(1))
  assert "vb" not in aux and float(aux["t"].max()) <= 1.0


def test_resume_refuses_another_objective_and_keeps_config_json(gaussian_run):
  _, resumed, *_ = gaussian_run
  before = (resumed / "config.json").read_text()
  c = tiny_config(6)
  c.objective = "transport"
  c.sample.method = "heun2"
  with pytest.raises(train.ConfigError, match="trained with objective='gaussian'.*"
                                              "--config.objective=gaussian"):
    train.train_and_evaluate(c, str(resumed))
  assert (resumed / "config.json").read_text() == before


@pytest.mark.parametrize("overrides,msg", [
    (dict(objective="dit"), "objective='dit': expected one of"),
    (dict(sample__method="heun2", sample__every=2), "sample.method='heun2' does not fit "
                                                    "objective='gaussian': use 'ddpm' or 'ddim'"),
    (dict(objective="transport", sample__method="ddim", sample__every=2), "use 'euler'"),
    (dict(diffusion__noise_schedule="cosine"), "config.diffusion: unknown noise schedule"),
])
def test_objective_config_errors(tmp_path, overrides, msg):
  c = tiny_config()
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  with pytest.raises(train.ConfigError, match=msg):
    train.train_and_evaluate(c, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "checkpoints").exists()


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("preset,res,n", [("S2", 256, 0), ("XL2", 256, 0), ("B2-med64", 256, 64),
                                          ("XL2-med64-512", 512, 64)])
def test_dit_presets(preset, res, n):
  c = _config_module("dit").get_config(preset)
  model = train.get_model(c)
  assert c.objective == "gaussian" and model.learn_sigma and model.mediator_num == n
  assert model.input_size == res // 8 and c.sample.method == "ddpm" and c.sample.num_steps == 250
  assert c.optim.learning_rate == 1e-4 and c.ema_decay == 0.9999 and c.global_batch_size in (
      256, 64)
  d = train.get_objective(c, model)
  assert d.num_timesteps == 1000 and d.loss_type == "mse"
  with pytest.raises(ValueError, match="unknown preset 'Z9'"):
    _config_module("dit").get_config("Z9")


def test_dit_digits_preset_is_the_quickstart_with_the_gaussian_objective():
  c = _config_module("dit").get_config("digits")
  q = _config_module("quickstart").get_config()
  assert c.objective == "gaussian" and q.objective == "transport"
  for k in ("data", "optim"):
    assert c[k].to_dict() == q[k].to_dict()
  mc, mq = c.model.to_dict(), q.model.to_dict()
  assert mc.pop("learn_sigma") and not mq.pop("learn_sigma")
  assert mc == mq and c.num_train_steps == q.num_train_steps
  assert c.sample.method == "ddim" and c.sample.clip_denoised


# --------------------------------------------------------------------------- sampling
def tiny(n=0, **kw):
  cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
             num_classes=10, mediator_num=n, learn_sigma=True)
  cfg.update(kw)
  return models.build_model(None, **cfg)


def random_params(model, seed):
  return _random(model, seed, 0.1, as_jax=True)


@pytest.fixture(scope="module")
def dit_ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("dit_ckpts")
  out = {}
  for name, m in [("n1", tiny(1)), ("n4", tiny(4))]:
    convert.save_converted(root / name, m, random_params(m, len(out)),
                           extra=convert.objective_record("gaussian", {"diffusion_steps": 200}))
    out[name] = str(root / name)
  return out


def test_sample_cli_reads_the_objective_from_the_checkpoint(dit_ckpts, tmp_path):
  args = ["--ckpt", dit_ckpts["n1"], "--out", str(tmp_path / "o"), "--num_samples", "8",
          "--batch_size", "8", "--num_steps", "6", "--cfg_scale", "2.0", "--no_progress"]
  res = sample.main(args)
  s = json.loads((tmp_path / "o" / "summary.json").read_text())
  assert s["objective"] == "gaussian" and s["sampler"]["method"] == "ddpm"  # DiT's default
  assert s["diffusion"]["num_timesteps"] == 6 and s["diffusion"]["original_num_steps"] == 200
  assert s["nfe_per_image"] == 6
  assert s["gflops_per_image"] == pytest.approx(flops.gflops(tiny(1)) * 6 * 2)  # CFG doubles
  assert res["images"].shape == (8, 8, 8, 3) and res["images"].std() > 0
  again = sample.main(args[:3] + [str(tmp_path / "o2")] + args[4:] + ["--mode", "ddim",
                                                                      "--respacing", "ddim5"])
  assert again["summary"]["sampler"]["respacing"] == "ddim5"
  assert again["summary"]["nfe_per_image"] == 5


def test_sample_cli_gaussian_from_a_training_workdir(gaussian_run, tmp_path):
  _, resumed, *_ = gaussian_run
  rec = checkpoint.load_objective(str(resumed))
  assert rec == {"objective": "gaussian", "time_scale": 100.0,
                 "diffusion": dict(gaussian.DIFFUSION_DEFAULTS, diffusion_steps=100)}
  res = sample.sample_images(str(resumed), None, num_samples=8, batch_size=8, mode="ddim",
                             num_steps=4, progress=False)
  assert res["summary"]["diffusion"]["original_num_steps"] == 100


@pytest.mark.parametrize("extra,match", [
    (["--mode", "ode"], "--mode ode samples the transport objective"),
    (["--method", "Euler"], "--method Euler is a transport option"),
    (["--mode", "ddim", "--eta", "2"], r"eta=2.0 must be in \[0, 1\]"),
    (["--respacing", "ddim7x"], "expected 'ddimN' with an integer N"),
    (["--cfg_scale", "3", "--guidance_interval", "0,0.5"], "not available with the Gaussian"),
])
def test_sample_cli_bad_gaussian_options(dit_ckpts, tmp_path, extra, match):
  with pytest.raises(ValueError, match=match):
    sample.main(["--ckpt", dit_ckpts["n1"], "--out", str(tmp_path / "bad"), "--num_samples", "8",
                 "--batch_size", "8", "--num_steps", "6", "--no_progress"] + extra)
  assert not (tmp_path / "bad" / "samples.npz").exists()


def test_transport_options_refuse_gaussian_flags(tmp_path):
  m = tiny(0, learn_sigma=False)
  with pytest.raises(ValueError, match="apply to the gaussian objective"):
    sample.sample_images(models_and_params=[(m, random_params(m, 0))], num_samples=8,
                         batch_size=8, num_steps=4, eta=0.5, progress=False)
  with pytest.raises(ValueError, match="--mode ddim samples the gaussian objective"):
    sample.sample_images(models_and_params=[(m, random_params(m, 0))], num_samples=8,
                         batch_size=8, num_steps=4, mode="ddim", progress=False)


def test_dynamic_schedule_with_ddpm_equals_static_and_switches(dit_ckpts):
  """One compiled step per mediator count with DDPM: a rule that never switches reproduces the
  static jitted DDPM loop of the first model (same per-sample noise); a loose rule switches."""
  ms, ps = zip(*[convert.load_converted(dit_ckpts[k]) for k in ("n1", "n4")])
  d = gaussian.create_diffusion("", diffusion_steps=200)
  cfg = gaussian.GaussianSamplerConfig("ddpm", num_steps=12)
  ds = dynamic.DynamicSampler(ms, ps, d, cfg, dynamic.SwitchRule((0.9,), 3), batch_size=4,
                              cfg_scale=2.0, guide_channels=None, bucket_sizes=(4,))
  x0 = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  y = jnp.array([1, 2, 3, 4], jnp.int32)
  keys = jax.random.split(jax.random.key(5), 4)
  never = ds.sample(x0, y, keys, rule=dynamic.SwitchRule((1e-9,), 3))
  assert (never.stages == 0).all() and never.nfe[0] == 12
  static = jax.jit(gaussian.make_sample_fn(ms[0], d, cfg, cfg_scale=2.0, guide_channels=None))(
      ps[0], x0, y, keys)
  # float32 resolution at the samples' scale (|x| reaches hundreds with this untrained model):
  # two differently compiled programs agree to a few ulps of the largest value
  scale = float(np.abs(static.x).max())
  np.testing.assert_allclose(never.x, static.x, rtol=1e-5, atol=4e-7 * scale)
  g = np.array([flops.gflops(m) for m in ms])
  np.testing.assert_allclose(never.gflops, g[0] * 12 * 2)
  loose = ds.sample(x0, y, keys, rule=dynamic.SwitchRule((0.999,), 1))
  assert loose.stages[-1].max() == 1
  with pytest.raises(ValueError, match="needs rng"):
    ds.sample(x0, y)


# --------------------------------------------------------------------------- converter
def test_convert_records_the_objective(golden_dir, tmp_path, capsys):
  src = golden_dir / "dit_diffusion" / "state_dict.npz"
  convert.main([str(src), str(tmp_path / "dit"), "--objective", "gaussian", "--num_heads", "2"])
  assert "objective=gaussian" in capsys.readouterr().out
  meta = json.loads((tmp_path / "dit" / "model_config.json").read_text())
  assert meta["objective"] == "gaussian" and meta["time_scale"] == 1000.0
  assert meta["diffusion"] == gaussian.DIFFUSION_DEFAULTS
  assert checkpoint.load_objective(str(tmp_path / "dit"))["objective"] == "gaussian"
  convert.main([str(src), str(tmp_path / "sit"), "--num_heads", "2"])  # no flag, neutral name
  assert "objective=transport (from the file name" in capsys.readouterr().out
  assert checkpoint.load_objective(str(tmp_path / "sit"))["objective"] == "transport"
  dit_named = tmp_path / "DiT-tiny.npz"
  dit_named.write_bytes(src.read_bytes())
  assert checkpoint.load_objective(str(dit_named))["objective"] == "gaussian"
  with pytest.raises(ValueError, match="--diffusion_steps applies to --objective gaussian only "
                     r"\(this run: transport\)"):
    convert.main([str(src), str(tmp_path / "x"), "--diffusion_steps", "50", "--num_heads", "2"])
  assert not (tmp_path / "x").exists()


def test_docs_diffusion_example_runs():
  import re  # noqa: PLC0415
  text = (ROOT / "docs" / "diffusion.md").read_text()
  example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  example = (example.replace('input_size=32, learn_sigma=True', 'input_size=8, learn_sigma=True, '
                             'depth=1, hidden_size=48, num_heads=2, patch_size=4')
             .replace("num_steps=50", "num_steps=3").replace("(8, 32, 32, 4)", "(8, 8, 8, 4)"))
  scope = {}
  exec(compile(example, "docs/diffusion.md", "exec"), scope)  # noqa: S102
  assert scope["x"].shape == (8, 8, 8, 4) and np.isfinite(np.asarray(scope["x"])).all()
  loss, aux = jax.jit(scope["loss_fn"])(scope["params"], scope["x"], jnp.arange(8),
                                        jax.random.key(3))
  assert np.isfinite(loss) and "vb" in aux


def test_redundancy_analysis_follows_the_gaussian_objective(golden_dir, tmp_path):
  """The evaluation walks the model's own chain: DDIM at the original timesteps for DiT."""
  from edit_jax.eval import redundancy  # noqa: PLC0415
  src = golden_dir / "dit_diffusion" / "state_dict.npz"
  convert.main([str(src), str(tmp_path / "dit"), "--objective", "gaussian", "--num_heads", "2"])
  redundancy.main(["--checkpoint", str(tmp_path / "dit"), "--out", str(tmp_path / "r"),
                   "--timesteps", "3", "--batch", "2"])
  res = json.loads((tmp_path / "r" / "redundancy.json").read_text())
  assert res["objective"] == "gaussian" and res["model_t"] == [999.0, 500.0, 0.0]
  assert res["t"] == pytest.approx([0, 1 / 3, 2 / 3]) and len(res["layers"]) == 3
