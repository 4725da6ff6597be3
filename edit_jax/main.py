"""Command line entry point for training.

    python -m edit_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart
    python -m edit_jax.main --config=configs/sit.py:B2-med64 --workdir=gs://BUCKET/b2 \
        --config.global_batch_size=256 --config.model.dtype=bfloat16

``--config`` takes a config file and an optional preset after ``:``; any field can be overridden
with ``--config.<field>=<value>``. Rerunning the same command in the same workdir resumes from the
newest readable checkpoint. SIGTERM saves a checkpoint and exits with status 0. Exit status 2: a
config/data/mesh/checkpoint error (the message says what to change); 3: the loss became
non-finite (the last good checkpoint is kept).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/quickstart.py or configs/sit.py:XL2-med64.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                               "TensorBoard logs and sample grids.")
_LIB_LOGS = flags.DEFINE_bool("library_logs", False, "Show INFO logs of orbax/grain/absl "
                              "internals (hidden by default; warnings are always shown).")
flags.mark_flags_as_required(["config", "workdir"])

_NOISY = ("/orbax/", "/grain/", "/tensorstore/", "/etils/")


class _QuietLibraries(logging.Filter):
  """Drops INFO records of checkpointing/data libraries (they log every save in detail)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _LIB_LOGS.value:
    for h in logging.getLogger().handlers:
      h.addFilter(_QuietLibraries())
  # jax.distributed must be initialized before any other JAX call touches the backend.
  from edit_jax import train  # noqa: PLC0415
  train.maybe_initialize_distributed(_CONFIG.value)
  import jax  # noqa: PLC0415
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  from edit_jax import checkpoint, data, sharding  # noqa: PLC0415
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, sharding.MeshError, data.DataError, checkpoint.CheckpointError) as e:
    logging.error("%s: %s", type(e).__name__, e)   # a settings problem: no traceback needed
    sys.exit(2)
  except FloatingPointError as e:
    logging.error("%s", e)
    sys.exit(3)
  logging.info("done: step %d, %s", summary["step"], summary["stopped"])


def run():
  app.run(main)


if __name__ == "__main__":
  run()
