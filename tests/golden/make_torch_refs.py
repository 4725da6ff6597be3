"""Makes the reference files that let CI test torch-format loading, the VAE and the FID Inception
without torch or diffusers installed. Run ONCE, in a separate venv that has them:

    python3.11 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 numpy diffusers==0.42.1
    /work/venvs/torch/bin/pip install --no-deps pytorch-fid==0.3.0 torchvision==0.28.0
    /work/venvs/torch/bin/python tests/golden/make_torch_refs.py        # from the repo root

Writes (into tests/golden/):
  mediator_tiny_ckpt.pt      torch.save of an official-style training checkpoint built from
                             mediator_tiny_state_dict.npz ("ema" = the golden weights; "model" =
                             the same with final_layer.linear.bias + 1; "args" an
                             argparse.Namespace; "opt" with a strided view, bf16, int64 tensors).
  vae_tiny_state_dict.bin    torch.save of that VAE's state_dict (the `.bin` format).
  vae_tiny_ref.npz           diffusers AutoencoderKL (block_out_channels (8, 16), layers_per_block 1,
                             norm_num_groups 4) on seeded weights: its state dict ("sd/<name>"),
                             input x (2, 3, 16, 16) NCHW in [-1, 1], encoder posterior mean and
                             logvar, decode(mean), all NCHW float32.
  inception_fid_ref.npz      pytorch-fid's FID InceptionV3 (fid_inception_v3, FID patches) with
                             the weights of `inception_weights()` below, on 2 images 75x75 given in
                             [0, 255] and fed as (x - 128) / 128 (the TF graph's normalisation; no
                             resize): pool (2, 2048), Mixed_6d.branch1x1 output first 7 channels
                             (NHWC flattened, 2, 63) and pool @ fc.weight^T (2, 1008).

The helpers above `main()` use numpy only: the tests import `inception_weights` to rebuild the
same Inception weights instead of storing 95 MB.
"""
from __future__ import annotations

import pathlib
import zlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def inception_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic FID-Inception weights for {torch name: shape}; each tensor from its own
  PCG64 stream (seed, crc32(name)), so the order of names does not matter.

  conv weights N(0, 2 / fan_in) (He: activations keep their scale through 94 layers), BN weight
  U(0.8, 1.2), BN bias and running_mean N(0, 0.1^2), running_var U(0.5, 1.5), fc N(0, 0.02^2).
  """
  out = {}
  for name in sorted(shapes):
    s = tuple(shapes[name])
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(s[1:]))
      a = rng.standard_normal(s) * np.sqrt(2.0 / fan_in)
    elif name.endswith("bn.weight"):
      a = rng.uniform(0.8, 1.2, s)
    elif name.endswith("running_var"):
      a = rng.uniform(0.5, 1.5, s)
    elif name.endswith(("bn.bias", "running_mean")):
      a = 0.1 * rng.standard_normal(s)
    else:  # fc.weight, fc.bias
      a = 0.02 * rng.standard_normal(s)
    out[name] = a.astype(np.float32)
  return out


def weights_fingerprint(sd: dict[str, np.ndarray]) -> np.ndarray:
  """(sum, sum of squares) over all tensors in sorted-name order, float64: detects a changed
  random stream (e.g. a numpy release that alters Generator output)."""
  return np.array([sum(float(sd[k].astype(np.float64).sum()) for k in sorted(sd)),
                   sum(float((sd[k].astype(np.float64) ** 2).sum()) for k in sorted(sd))])


def make_pt(torch):
  import argparse  # noqa: PLC0415
  import collections  # noqa: PLC0415
  sd = dict(np.load(HERE / "mediator_tiny_state_dict.npz"))
  ema = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
  model = collections.OrderedDict(ema)
  model["final_layer.linear.bias"] = ema["final_layer.linear.bias"] + 1.0
  w = ema["blocks.0.mlp.fc1.weight"]
  opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg_t": w.t(),  # a strided view
                       "bf16": torch.arange(6, dtype=torch.float32).reshape(2, 3).bfloat16(),
                       "ids": torch.arange(5, dtype=torch.int64)}},
         "param_groups": [{"lr": 1e-4, "params": [0]}]}
  ckpt = {"model": model, "ema": ema, "opt": opt,
          "args": argparse.Namespace(model="SiT-tiny", image_size=128, global_batch_size=256),
          "train_steps": 3}
  torch.save(ckpt, HERE / "mediator_tiny_ckpt.pt")


def make_vae(torch):
  from diffusers import AutoencoderKL  # noqa: PLC0415
  torch.manual_seed(0)
  m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                    layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()
  with torch.no_grad():
    for p in m.parameters():  # GroupNorm scales are 1 and biases 0 at init: perturb everything
      p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = m.encode(x).latent_dist
    dec = m.decode(post.mean).sample
  torch.save(m.state_dict(), HERE / "vae_tiny_state_dict.bin")  # diffusers' pre-safetensors format
  out = {f"sd/{k}": v.numpy() for k, v in m.state_dict().items()}
  out.update(x=x.numpy(), mean=post.mean.numpy(), logvar=post.logvar.numpy(), decoded=dec.numpy())
  np.savez_compressed(HERE / "vae_tiny_ref.npz", **out)


def make_inception(torch):
  from pytorch_fid import inception as pf  # noqa: PLC0415
  # fid_inception_v3() builds torchvision's Inception3, swaps in the FID blocks, then loads the
  # released weights from a URL: record the network it builds and hand it our weights instead.
  built, holder = {}, {}
  orig_build = pf._inception_v3  # noqa: SLF001

  def build(*a, **k):
    built["net"] = orig_build(*a, **k)
    return built["net"]

  def fake_download(*a, **k):  # noqa: ARG001
    shapes = {n: tuple(v.shape) for n, v in built["net"].state_dict().items()
              if not n.endswith("num_batches_tracked")}
    holder["sd"] = inception_weights(shapes)
    return {n: torch.from_numpy(v) for n, v in holder["sd"].items()}

  pf._inception_v3, pf.load_state_dict_from_url = build, fake_download  # noqa: SLF001
  fid = pf.fid_inception_v3().eval()
  sd = holder["sd"]
  rng = np.random.default_rng(123)
  imgs = rng.integers(0, 256, (2, 75, 75, 3)).astype(np.uint8)
  x = torch.from_numpy(((imgs.astype(np.float32) - 128.0) / 128.0).transpose(0, 3, 1, 2))
  seen = {}
  fid.Mixed_6d.branch1x1.register_forward_hook(lambda mod, i, o: seen.setdefault("b1", o))
  with torch.no_grad():
    h = x
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c", "avgpool"):
      h = getattr(fid, name)(h)
    pool = torch.flatten(h, 1)
    logits = pool @ fid.fc.weight.T
  b1 = seen["b1"].numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)
  np.savez_compressed(HERE / "inception_fid_ref.npz", images=imgs, pool=pool.numpy(),
                      spatial=b1, logits=logits.numpy(), fingerprint=weights_fingerprint(sd))
  print("inception pool: mean %.4f std %.4f" % (pool.mean(), pool.std()))


def main():
  import sys  # noqa: PLC0415
  import types  # noqa: PLC0415
  # The PyPI torchvision wheel's compiled ops need a CUDA torch; only its model code is used
  # (pytorch-fid's network, and diffusers imports torchvision when present).
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
  import torch  # noqa: PLC0415
  torch.set_num_threads(2)
  make_pt(torch)
  make_vae(torch)
  make_inception(torch)
  import diffusers  # noqa: PLC0415
  print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
  main()
