"""End-to-end training: convergence on real digits, exact resume after kill -9, SIGTERM, corrupt
checkpoints, non-finite loss, two-process jax.distributed training, config error messages."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import flax.linen as nn
import numpy as np
import pytest

from edit_jax import checkpoint, data, sharding, train

from edit_jax.diffusion import transport

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny experiment used by every end-to-end test here (also written to a config file for the
# subprocesses, so in-process and child runs train exactly the same thing).
CONFIG_PY = '''
from edit_jax.train import default_config

def get_config():
  c = default_config()
  c.model.update(dict(name="", input_size=8, in_channels=1, num_classes=4, patch_size=2,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=True))
  c.data.update(dict(name="synthetic", image_size=8, channels=1, num_classes=4, num_threads=1))
  c.global_batch_size = 8
  c.num_train_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.sample.every = 0
  c.fsdp_min_size = 0
  c.optim.learning_rate = 1e-3
  c.mesh_shape = (4, 2)
  return c
'''


def tiny_config():
  ns = {}
  exec(CONFIG_PY, ns)  # noqa: S102 - our own constant
  return ns["get_config"]()


def child_env(**extra):
  """The parent's environment for a child process. Children cache every compiled program (also
  the many sub-second ones a run compiles: checkpointing, rng, init), so that the next child
  loads them instead of compiling them again (~40 % of a child's CPU time)."""
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  env.update(extra)
  return env


def params_of(result):
  return jax.tree.map(np.asarray, jax.device_get(result["state"].params))


def assert_trees_close(a, b, **tol):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in fa] == [k for k, _ in fb]
  for (k, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(k), **tol)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """4 steps without interruption (checkpoints at 2 and 4)."""
  wd = tmp_path_factory.mktemp("straight")
  r = train.train_and_evaluate(tiny_config(), str(wd))
  assert r["step"] == 4 and r["stopped"] == "done"
  return wd, params_of(r)


# ---------------------------------------------------------------------------------------------


def test_digits_loss_goes_down_and_ema_follows():
  """150 steps on the real digits lower the loss (a small convergence check: the mean of the last
  50 losses is ~0.51x the first 10's, a step that does not learn stays near 1x), and the EMA
  follows the params with decay 0.9."""
  c = train.default_config()
  c.model.update(dict(name="", input_size=32, in_channels=1, num_classes=10, patch_size=8,
                      hidden_size=32, depth=1, num_heads=2, mediator_num=4, learn_sigma=False))
  c.data.update(dict(name="digits", image_size=32, channels=1, num_classes=10, random_flip=False))
  c.optim.update(dict(learning_rate=3e-3, warmup_steps=20, grad_clip=1.0))
  c.ema_decay = 0.9
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  model = train.get_model(c)
  tx, schedule = train.make_optimizer(c)
  pipe = data.make_pipeline(c.data, seed=0, global_batch_size=16)
  rules = sharding.rules_from_config(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(model, tx, mesh, jax.random.key(0), rules)
    step = train.make_train_step(transport.make_loss_fn(model, train.get_transport(c)), tx,
                                 schedule, mesh, shardings, ema_decay=0.9, donate=False)
    bsh = sharding.batch_sharding(mesh)
    losses = []
    for i in range(150):
      prev = state
      state, m = step(state, data.to_global(pipe.batch(i), bsh), jax.random.key(1))
      losses.append(float(m.compute()["loss"]))
  first, last = np.mean(losses[:10]), np.mean(losses[-50:])
  assert np.isfinite(losses).all()
  assert first > 1.0, first           # E|x1 - x0|^2 for digits in [-1, 1]
  assert last < 0.6 * first, (first, last)
  # EMA: ema_t = ema_{t-1} + (1 - 0.9) (params_t - ema_{t-1}).
  k = ("final_layer", "linear", "kernel")
  get = lambda t: np.asarray(t[k[0]][k[1]][k[2]])  # noqa: E731
  np.testing.assert_allclose(get(state.ema_params),
                             get(prev.ema_params) + 0.1 * (get(state.params) - get(prev.ema_params)),
                             rtol=1e-5, atol=1e-7)


KILL_CHILD = '''
import os, signal, sys
from edit_jax import checkpoint, data, train
cfg_ns = {{}}
exec(open({cfg!r}).read(), cfg_ns)
config = cfg_ns["get_config"]()
seen = {{"ckpt": None, "batches": 0}}
orig_save, orig_to_global = checkpoint.Checkpointer.save, data.to_global
def save(self, *a, **k):
  seen["ckpt"] = self
  return orig_save(self, *a, **k)
def to_global(*a, **k):
  seen["batches"] += 1
  if seen["batches"] == 4:          # steps 1-3 ran, checkpoint 2 was started: make sure it is
    seen["ckpt"].wait()             # on disk, then die without any cleanup.
    print("KILLING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  return orig_to_global(*a, **k)
checkpoint.Checkpointer.save, data.to_global = save, to_global
train.train_and_evaluate(config, {wd!r})
'''


def test_resume_after_kill9_is_exact(straight, tmp_path):
  """N steps straight == N/2 (+1) steps, kill -9, resume: same params, same data order."""
  cfg_file = tmp_path / "tiny_config.py"
  cfg_file.write_text(CONFIG_PY)
  wd = tmp_path / "killed"
  script = KILL_CHILD.format(cfg=str(cfg_file), wd=str(wd))
  p = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-3000:]
  assert "KILLING" in p.stdout
  ck = checkpoint.Checkpointer(wd / "checkpoints", read_only=True)
  assert ck.all_steps() == [2]
  assert ck.restore_meta(2)["data_position"] == 2
  r = train.train_and_evaluate(tiny_config(), str(wd))
  assert r["step"] == 4
  assert_trees_close(params_of(r), straight[1], rtol=1e-6, atol=1e-7)


def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path, caplog):
  import shutil  # noqa: PLC0415
  wd = tmp_path / "corrupt"
  shutil.copytree(straight[0], wd)
  for f in (wd / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 16 and f.parent.name == "d":
      with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
  caplog.set_level("ERROR")
  r = train.train_and_evaluate(tiny_config(), str(wd))
  assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
  assert "falling back to the previous checkpoint" in caplog.text
  assert list((wd / "checkpoints").glob("corrupt-4-*"))
  # Resumed from step 2 and redid steps 3-4: same result as the uninterrupted run.
  assert r["step"] == 4
  assert_trees_close(params_of(r), straight[1], rtol=1e-6, atol=1e-7)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  cfg_file = tmp_path / "tiny_config.py"
  cfg_file.write_text(CONFIG_PY)
  wd = tmp_path / "sigterm"
  cmd = [sys.executable, "-m", "edit_jax.main", f"--config={cfg_file}", f"--workdir={wd}",
         "--config.num_train_steps=1000000", "--config.checkpoint_every=1000000"]
  proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=str(ROOT))
  lines = []
  deadline = time.time() + 300
  try:
    for line in proc.stdout:
      lines.append(line)
      if "step 3/1000000" in line:
        proc.send_signal(signal.SIGTERM)
        break
      assert time.time() < deadline, "".join(lines[-50:])
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = "".join(lines) + out
  assert proc.returncode == 0, text[-3000:]
  assert "stopping at step" in text and "SIGTERM" in text
  steps = checkpoint.Checkpointer(wd / "checkpoints", read_only=True).all_steps()
  assert len(steps) == 1 and 3 <= steps[0] < 1000000
  assert f"stopping at step {steps[0]}" in text


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  c = tiny_config()
  c.checkpoint_every = 1
  c.num_train_steps = 6
  calls = {"n": 0}
  orig = data.to_global

  def poisoned(batch, sh):  # the 3rd batch carries a NaN pixel
    calls["n"] += 1
    if calls["n"] == 3:
      batch = dict(batch, x=batch["x"].copy())
      batch["x"][0, 0, 0, 0] = np.nan
    return orig(batch, sh)

  monkeypatch.setattr(data, "to_global", poisoned)
  with pytest.raises(FloatingPointError, match=r"between steps 2 and 3.*last good checkpoint is "
                     r"step 2"):
    train.train_and_evaluate(c, str(tmp_path / "nan"))
  steps = checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints", read_only=True).all_steps()
  assert steps == [1, 2]


MP_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
import flax.linen as nn
import numpy as np
from edit_jax import checkpoint, sharding, train
import jax
cfg_ns = {{}}
exec(open({cfg!r}).read(), cfg_ns)

def get_config():
  config = cfg_ns["get_config"]()
  config.distributed.update(dict(enabled="true", coordinator_address="127.0.0.1:{port}",
                                 num_processes=2, process_id={pid}))
  config.mesh_shape = (2, 2)
  return config

def save(params, path):
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, jax.device_get(params)))[0]
  np.savez(path, **{{jax.tree_util.keystr(k): v for k, v in flat}})

# 1. Only the state a fresh run with init_from starts from (no training), in its own workdir.
config = get_config()
train.maybe_initialize_distributed(config)
config.init_from = {init_from!r}
model = train.get_model(config)
tx, _ = train.make_optimizer(config)
mesh = sharding.make_mesh(config.mesh_shape)
rules = sharding.rules_from_config(config)
ck = checkpoint.Checkpointer({init_wd!r}, read_only=True)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  state, _, _ = train._restore_or_init(config, model, tx, mesh, rules, ck, jax.random.key(0))
save(state.params, {init_out!r})
save(state.ema_params, {init_out!r} + ".ema.npz")
print("INIT DONE", flush=True)
# 2. Resume the step-2 checkpoint in {wd!r} and train to the end.
r = train.train_and_evaluate(get_config(), {wd!r})
save(r["state"].params, {out!r})
print("RESULT", json.dumps({{"step": r["step"], "process": jax.process_index(),
                            "count": jax.process_count(), "devices": jax.device_count()}}))
"""


@pytest.fixture(scope="module")
def two_processes(straight, tmp_path_factory):
  """MP_CHILD on 2 local processes x 2 CPU devices (jax.distributed on 127.0.0.1), started once
  for both multi-process tests: each process first builds the init_from state of a fresh run
  from an official-format state dict (the source weights: random, saved here), then resumes the
  8-device run's step-2 checkpoint on a (2, 2) mesh and trains to step 4.
  Returns a dict: outputs (stdout + stderr of each process), init_files / files (the
  init_from params and the trained params of each process, .npz), src, src_params, num_tensors,
  mp_workdir."""
  import shutil  # noqa: PLC0415
  from edit_jax import convert, models  # noqa: PLC0415
  tmp = tmp_path_factory.mktemp("two_processes")
  shutil.copytree(straight[0], tmp / "mp")
  shutil.rmtree(tmp / "mp" / "checkpoints" / "4")
  model = train.get_model(tiny_config())
  leaves, tree = jax.tree_util.tree_flatten(models.init_params(model, jax.random.key(7)))
  src_params = jax.tree_util.tree_unflatten(tree, [
      np.asarray(a) + 0.1 * np.random.default_rng(i).standard_normal(a.shape).astype(np.float32)
      for i, a in enumerate(leaves)])
  src = tmp / "official.npz"
  np.savez(src, **convert.params_to_state_dict(src_params, model))
  cfg_file = tmp / "tiny_config.py"
  cfg_file.write_text(CONFIG_PY)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # The parent's compile-speed flags (conftest.py), with 2 devices per process.
  env = child_env(XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+",
                                  "--xla_force_host_platform_device_count=2",
                                  os.environ["XLA_FLAGS"]))
  procs = []
  for pid in range(2):
    script = MP_CHILD.format(cfg=str(cfg_file), port=port, pid=pid, wd=str(tmp / "mp"),
                             out=str(tmp / f"params{pid}.npz"), init_from=str(src),
                             init_wd=str(tmp / "fresh"), init_out=str(tmp / f"init{pid}.npz"))
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  return {"outputs": outs, "files": [str(tmp / f"params{i}.npz") for i in range(2)],
          "init_files": [str(tmp / f"init{i}.npz") for i in range(2)], "src": src,
          "src_params": src_params, "num_tensors": len(leaves), "mp_workdir": tmp / "mp"}


def test_two_processes_train_and_agree(straight, two_processes):
  """Two processes x 2 CPU devices resume the 8-device run's step-2 checkpoint on a (2, 2) mesh,
  each reading half of every batch, and reach the same params as the uninterrupted run."""
  outs, files = two_processes["outputs"], two_processes["files"]
  p0, p1 = (dict(np.load(f)) for f in files)
  res = [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o in outs]
  assert sorted(r["process"] for r in res) == [0, 1]
  assert all(r["count"] == 2 and r["devices"] == 4 and r["step"] == 4 for r in res)
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k])
  # Both processes restored the step-2 checkpoint (each logs it), and the runs match the
  # single-process 8-device run (same global batches and rngs).
  assert all("resumed from" in o and "step 2" in o.split("resumed from", 1)[1].splitlines()[0]
             for o in outs), [o[-1500:] for o in outs]
  ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(straight[1])[0]}
  for k in ref:
    np.testing.assert_allclose(p0[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The two processes wrote one checkpoint together.
  ck = checkpoint.Checkpointer(two_processes["mp_workdir"] / "checkpoints", read_only=True)
  assert ck.all_steps() == [2, 4]


def test_two_processes_init_from_official_weights(two_processes):
  """Multi-host init_from: both processes load an official-format state dict onto their shards of
  a (2, 2) mesh; params and EMA are exactly the source weights on both, and both log the load."""
  src = two_processes["src"]
  for o in two_processes["outputs"]:
    init_log = o.split("INIT DONE", 1)[0]
    assert (f"init_from official checkpoint {src}: loaded {two_processes['num_tensors']} tensors"
            in init_log), o[-2000:]
  want = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(two_processes["src_params"])[0]}
  files = two_processes["init_files"]
  for f in files + [f + ".ema.npz" for f in files]:
    got = dict(np.load(f))
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{f} {k}")


def test_cli_nonfinite_loss_exits_3(tmp_path):
  """A learning rate of 1e38 (valid: finite and > 0) moves the params to ~1e38 in the first step,
  so the next loss overflows to inf/NaN. The CLI stops with exit status 3, one error line, no
  traceback, and saves nothing."""
  cfg_file = tmp_path / "tiny_config.py"
  cfg_file.write_text(CONFIG_PY)
  wd = tmp_path / "nan"
  p = subprocess.run([sys.executable, "-m", "edit_jax.main", f"--config={cfg_file}",
                      f"--workdir={wd}", "--config.optim.learning_rate=1e38"], env=child_env(),
                     capture_output=True, text=True, timeout=300, cwd=str(ROOT))
  assert p.returncode == 3, p.stderr[-3000:]
  assert "loss became non-finite (nan/inf) between steps 1 and 2" in p.stderr
  assert "The last good checkpoint is none" in p.stderr
  assert "Traceback" not in p.stderr
  assert not (wd / "checkpoints").exists() or not list((wd / "checkpoints").iterdir())


@pytest.mark.parametrize("overrides,exc,msg", [
    (dict(mesh_shape=(3, 1)), sharding.MeshError, "needs 3 devices but 8 are available"),
    (dict(global_batch_size=12), sharding.MeshError, "not divisible by the 8 devices"),
    (dict(mesh_shape=(-1, 3)), sharding.MeshError, "not divisible by the fixed axes' product 3"),
    (dict(data__name="latents", data__path="/nonexistent/latents"), data.DataError,
     "python -m edit_jax.prepare"),
    (dict(model__input_size=16), train.ConfigError, "set --config.model.input_size=8"),
    (dict(model__num_classes=7), train.ConfigError, "set --config.model.num_classes=4"),
    (dict(model__mediator_num=5), train.ConfigError, "perfect square"),
])
def test_config_errors(tmp_path, overrides, exc, msg):
  c = tiny_config()
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  with pytest.raises(exc, match=msg):
    train.train_and_evaluate(c, str(tmp_path / "bad"))


def _load_config_file(name):
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("preset,res,n,batch", [
    ("S2", 256, 0, 256), ("S2-med64", 256, 64, 256), ("S2-med4", 256, 4, 256),
    ("B2-med64", 256, 64, 256), ("XL2", 256, 0, 256), ("XL2-med64", 256, 64, 256),
    ("B2-med64-512", 512, 64, 64), ("XL2-med64-512", 512, 64, 64), ("B2-med64-1024", 1024, 64, 16),
])
def test_sit_presets_build(preset, res, n, batch):
  c = _load_config_file("sit").get_config(preset)
  model = train.get_model(c)
  assert model.input_size == res // 8 and model.mediator_num == n and model.in_channels == 4
  assert c.global_batch_size == batch and c.optim.learning_rate == 1e-4
  assert c.optim.weight_decay == 0.0 and c.ema_decay == 0.9999 and c.data.name == "latents"
  assert model.class_dropout_prob == 0.1
  if res > 256:
    assert c.init_from_grid == res // 16 // model.patch_size
  data_shape = data.example_shape(c.data)
  assert data_shape == (model.input_size, model.input_size, 4)


def test_quickstart_config_and_bad_preset():
  c = _load_config_file("quickstart").get_config()
  model = train.get_model(c)
  assert model.mediator_num == 16 and c.data.name == "digits"
  assert data.example_shape(c.data) == (32, 32, 1)
  with pytest.raises(ValueError, match="unknown preset 'Z9'"):
    _load_config_file("sit").get_config("Z9")


def test_cli_reports_settings_errors_without_traceback(tmp_path):
  cfg_file = tmp_path / "tiny_config.py"
  cfg_file.write_text(CONFIG_PY)
  p = subprocess.run([sys.executable, "-m", "edit_jax.main", f"--config={cfg_file}",
                      f"--workdir={tmp_path / 'wd'}", "--config.data.name=latents",
                      "--config.data.path=/nonexistent/latents"], env=child_env(),
                     capture_output=True, text=True, timeout=120, cwd=str(ROOT))
  assert p.returncode == 2, p.stderr[-2000:]
  assert "DataError: data.path '/nonexistent/latents'" in p.stderr
  assert "Traceback" not in p.stderr
