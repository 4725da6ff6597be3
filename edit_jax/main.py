"""Command line entry point for training.

    python -m edit_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart
    python -m edit_jax.main --config=configs/sit.py:B2-med64 --workdir=gs://BUCKET/b2 \
        --config.global_batch_size=256 --config.model.dtype=bfloat16

``--config`` takes a config file and an optional preset after ``:``; any field can be overridden
with ``--config.<field>=<value>``. Rerunning the same command in the same workdir resumes from the
newest readable checkpoint (a finished run trains nothing). SIGTERM saves a checkpoint and exits
with status 0; a first Ctrl-C saves and exits with status 130 (a second one stops at once).
Exit status 2: a config/data/mesh/checkpoint error, printed as one line (the message says what to
change; ``--debug`` shows the traceback); 3: the loss became non-finite (the last good
checkpoint is kept). The last line states the step reached (and, on the digits, the share of
the final samples classified as their label).
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
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of configuration, data and "
                           "checkpoint errors (also: EDIT_JAX_DEBUG=1).")
PROG = "python -m edit_jax.main"
flags.mark_flags_as_required(["config", "workdir"])

_NOISY = ("/orbax/", "/grain/", "/tensorstore/", "/etils/")


class _QuietLibraries(logging.Filter):
  """Drops INFO records of checkpointing/data libraries (they log every save in detail) and jax's
  "Unable to initialize backend 'tpu'" note on machines without a TPU."""

  def filter(self, record):
    if record.levelno >= logging.WARNING:
      return True
    if str(record.msg).startswith("Unable to initialize backend"):
      return False
    return not any(n in record.pathname for n in _NOISY)


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
  from edit_jax import cli  # noqa: PLC0415
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except FloatingPointError as e:
    logging.error("%s", e)
    sys.exit(3)
  except cli.user_error_types() as e:
    if _DEBUG.value or cli.debug_requested([]):
      raise
    cli.report(PROG, e)
  logging.info(final_line(summary))
  if summary["stopped"] == "interrupted":
    sys.exit(130)


def final_line(summary: dict) -> str:
  """'done: step 1000/1000 (done); 84% of the 80 sampled digits ...; samples: PATH'."""
  line = f"done: step {summary['step']}/{summary['total']} ({summary['stopped']})"
  if summary.get("digit_accuracy") is not None:
    line += (f"; {100 * summary['digit_accuracy']:.1f}% of the {summary['digit_samples']} "
             f"sampled digits are classified as their label")
  if summary.get("samples"):
    line += f"; samples: {summary['samples']}"
  return line


def run():
  app.run(main)


if __name__ == "__main__":
  run()
