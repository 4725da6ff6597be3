"""Training metrics: clu aggregation, throughput/MFU, measured peaks, TensorBoard, progress line.

FLOPs convention. ``edit_jax.flops`` counts a forward in the papers' convention (1 multiply-add =
1 FLOP, batch 1). Training costs ~3 forwards (forward + backward with two matmuls per forward
matmul), so training work per image = 3 x forward multiply-adds; to compare with hardware peaks
(which count a multiply-add as 2 FLOPs, as XLA's cost analysis does) we multiply by 2:

    train_flops_per_image = 2 * 3 * flops.breakdown(model).total
    TFLOP/s per device    = images/s * train_flops_per_image / num_devices / 1e12
    MFU                   = TFLOP/s per device / peak TFLOP/s per device

Rematerialization is not counted (MFU, not HFU). Peak numbers: ``PEAK_TFLOPS`` (dense bf16 for
accelerators) or ``config.peak_tflops_per_device``; on CPU an estimate from the core count and
clock (see ``cpu_peak_tflops``) and MFU there is indicative only. ``measure_matmul_tflops`` and
``measure_bandwidth_gbs`` measure the peaks on the device itself (benchmarks/device_check.py
reports MFU against the measured matmul peak at the training dtype).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def _train_metrics():
  """Per-step metrics of the train step, merged over steps on the host (clu.metrics)."""
  from clu import metrics as clu_metrics  # noqa: PLC0415 - clu only where the trainer logs
  return clu_metrics.Collection.create(
      loss=clu_metrics.Average.from_output("loss"),
      grad_norm=clu_metrics.Average.from_output("grad_norm"),
      learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
      nonfinite=clu_metrics.Average.from_output("nonfinite"))


def __getattr__(name):
  # ``TrainMetrics`` is built on first access, so importing this module needs no clu (the GPU
  # device check imports it on machines without clu).
  if name == "TrainMetrics":
    globals()["TrainMetrics"] = cls = _train_metrics()
    return cls
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Dense peak TFLOP/s per device (one chip / one GPU), bf16 unless noted.
PEAK_TFLOPS = {
    "tpu v2": 45.0, "tpu v3": 123.0, "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0,
    "tpu v5p": 459.0, "tpu v5": 459.0, "tpu v6 lite": 918.0, "tpu v6e": 918.0, "tpu7x": 2307.0,
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "a10g": 70.0, "v100": 125.0,
    "b200": 2250.0, "gh200": 989.0,
}


def cpu_peak_tflops() -> float:
  """Rough fp32 peak of this host: cores x GHz x FLOPs/cycle (32 with AVX2 FMA, 64 with AVX-512).

  All host cores form one jax CPU device. Indicative only (turbo, SMT and shared hosts vary).
  """
  cores = os.cpu_count() or 1
  ghz, per_cycle = 2.5, 16
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)
    if mhz:
      ghz = max(float(m) for m in mhz) / 1000
    flags = re.search(r"flags\s*:(.*)", info)
    flags = flags.group(1).split() if flags else []
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 16
  except OSError:
    pass
  return cores * ghz * per_cycle / 1e3


def peak_tflops_per_device(device=None, override: float = 0.0) -> float | None:
  """Peak TFLOP/s of ``device`` (default: first device), or None when unknown."""
  if override and override > 0:
    return float(override)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak_tflops()
  kind = str(getattr(device, "device_kind", "")).lower()
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_TFLOPS[key]
  return None


def measure_matmul_tflops(dtype="bfloat16", size: int = 8192, chain: int = 8, repeats: int = 5,
                          precision=None) -> dict[str, Any]:
  """Measured dense matmul peak of the default device: TFLOP/s (2 per multiply-add).

  Times one jitted program of ``chain`` dependent (size, size) @ (size, size) products in
  ``dtype`` (f32 accumulation), so launch overhead is amortised; reports the best and the median
  of ``repeats`` runs after a compiling warm-up. ``precision`` is passed to ``jnp.matmul`` (None:
  the default, what the models use; on recent NVIDIA GPUs XLA runs float32 at that precision on
  TF32 tensor cores). This is the peak MFU should be measured against (not a datasheet number).
  Returns {"tflops", "tflops_median", "seconds", "size", "chain", "dtype", "precision"}.
  """
  import jax.numpy as jnp  # noqa: PLC0415
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), jnp.float32).astype(dt)
  # N(0, 1/size) entries keep the chained product's magnitude ~constant (no overflow to inf).
  b = (jax.random.normal(kb, (size, size), jnp.float32) / math.sqrt(size)).astype(dt)

  @jax.jit
  def run(a, b):
    def body(_, x):
      return jnp.matmul(x, b, precision=precision, preferred_element_type=jnp.float32).astype(dt)
    return jax.lax.fori_loop(0, chain, body, a)

  jax.block_until_ready(run(a, b))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(run(a, b))
    times.append(time.perf_counter() - t0)
  flops = 2.0 * size ** 3 * chain
  best, med = min(times), float(np.median(times))
  return {"tflops": flops / best / 1e12, "tflops_median": flops / med / 1e12, "seconds": best,
          "size": size, "chain": chain, "dtype": dt.name,
          "precision": "default" if precision is None else str(precision)}


def measure_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 10) -> dict[str, Any]:
  """Measured device-memory bandwidth of the default device, GB/s (1e9 bytes/s).

  Times a jitted elementwise ``x * a + b`` over a float32 array of ``nbytes`` (one read and one
  write per element: 2 * nbytes moved); best and median of ``repeats`` after a warm-up.
  Returns {"gbs", "gbs_median", "seconds", "bytes_moved"}.
  """
  import jax.numpy as jnp  # noqa: PLC0415
  x = jnp.ones((max(1, nbytes // 4),), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001 + 0.5)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  moved = 2 * x.size * 4
  return {"gbs": moved / min(times) / 1e9, "gbs_median": moved / float(np.median(times)) / 1e9,
          "seconds": min(times), "bytes_moved": moved}


def train_flops_per_image(model) -> float:
  """Hardware FLOPs (2 per multiply-add) of one training example: 2 x 3 x forward multiply-adds."""
  from edit_jax import flops  # noqa: PLC0415
  return 2.0 * flops.train_flops_per_example(model)


def throughput(steps: int, seconds: float, global_batch: int, flops_per_image: float,
               num_devices: int, peak_tflops: float | None) -> dict[str, float]:
  """steps/s, images/s, TFLOP/s per device and MFU (fraction, NaN when the peak is unknown)."""
  sps = steps / max(seconds, 1e-9)
  ips = sps * global_batch
  tflops = ips * flops_per_image / num_devices / 1e12
  mfu = tflops / peak_tflops if peak_tflops else float("nan")
  return {"steps_per_sec": sps, "images_per_sec": ips, "tflops_per_device": tflops, "mfu": mfu}


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(step: int, total: int, scalars: dict[str, float], eta_s: float) -> str:
  """One console line: step, loss, grad norm, lr, throughput, MFU, ETA."""
  parts = [f"step {step}/{total}", f"loss {scalars.get('loss', float('nan')):.4f}"]
  if "grad_norm" in scalars:
    parts.append(f"grad {scalars['grad_norm']:.3f}")
  if "learning_rate" in scalars:
    parts.append(f"lr {scalars['learning_rate']:.2e}")
  if "steps_per_sec" in scalars:
    parts.append(f"{scalars['steps_per_sec']:.2f} steps/s")
    parts.append(f"{scalars['images_per_sec']:.0f} img/s")
    parts.append(f"{scalars['tflops_per_device']:.3g} TFLOP/s/dev")
    if math.isfinite(scalars.get("mfu", float("nan"))):
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  parts.append(f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)


class Writer:
  """TensorBoard event files (tensorboardX) + PNGs, on process 0 only; no-ops elsewhere.

  Every method is local (no collectives), so calling it from process 0 alone never blocks others.
  """

  def __init__(self, logdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = str(logdir)
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # noqa: PLC0415
      if not self.logdir.startswith("gs://"):
        os.makedirs(self.logdir, exist_ok=True)
      self._tb = SummaryWriter(self.logdir, flush_secs=30)

  def scalars(self, step: int, scalars: dict[str, Any]):
    if not self.enabled:
      return
    for k, v in scalars.items():
      v = float(v)
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def text(self, step: int, tag: str, text: str):
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def image(self, step: int, tag: str, img_u8: np.ndarray, png_path: str | None = None):
    """img_u8: (H, W, C) uint8, C in {1, 3}. Also writes ``png_path`` (local or gs://)."""
    if not self.enabled:
      return
    self._tb.add_image(tag, img_u8, step, dataformats="HWC")
    if png_path:
      save_png(png_path, img_u8)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def save_png(path: str, img_u8: np.ndarray):
  """Writes (H, W, C) uint8 to a PNG at a local or gs:// path."""
  import io  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  img = img_u8[..., 0] if img_u8.shape[-1] == 1 else img_u8
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(buf.getvalue())


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8 grid, row-major."""
  n, h, w, c = images.shape
  ncol = nrow
  rows = math.ceil(n / ncol)
  grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  return grid


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8 (the official clamp(127.5 x + 128, 0, 255))."""
  return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def log_parameter_overview(params, max_lines: int = 60):
  """clu parameter overview (shapes, sizes, and stats when the arrays are addressable)."""
  from clu import parameter_overview  # noqa: PLC0415
  stats = all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params))
  try:
    text = parameter_overview.get_parameter_overview(params, include_stats=stats)
  except Exception as e:  # noqa: BLE001 - overview is informative only
    logging.warning("parameter overview failed: %s", e)
    return ""
  lines = text.splitlines()
  shown = lines if len(lines) <= max_lines else lines[:max_lines // 2] + ["..."] + lines[-max_lines // 2:]
  logging.info("parameters:\n%s", "\n".join(shown))
  return text


class Timer:
  """Wall time and steps since the last ``lap``."""

  def __init__(self):
    self.t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    return dt
