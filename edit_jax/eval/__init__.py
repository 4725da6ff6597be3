"""Evaluation: SD-VAE, the ADM metric suite (FID, sFID, IS, precision/recall) and a digits metric.

Modules (import the one you need; nothing is imported eagerly):
  vae        diffusers AutoencoderKL (SD-VAE) in Flax; encode_to_latents / decode_latents.
  inception  the FID InceptionV3 (pool_3, mixed_6/conv spatial features, IS logits).
  metrics    Frechet distance, streamed statistics, Inception Score, precision/recall.
  fid        the ADM evaluator over .npz files, and its CLI (`python -m edit_jax.eval.fid`).
  digits     a small CNN trained on the embedded MNIST digits: Frechet digit distance and
             conditional accuracy for the offline quickstart.
  weights    local weight files (never downloaded) and PyTorch -> Flax state-dict conversion.
  redundancy attention-redundancy analysis of a trained model (model-dependent).

Model-dependent analyses belong in their own modules beside these, reusing `metrics` and
`fid.compute_activations`. See docs/evaluation.md.
"""

__all__ = ["digits", "fid", "inception", "metrics", "redundancy", "vae", "weights"]
