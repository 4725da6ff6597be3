"""One way for every command line tool to report a user error: one line on stderr, exit status 2.

    def main(argv=None):            # raises on bad input (library style; tests call it directly)
      ...
    if __name__ == "__main__":
      cli.run(main, "python -m edit_jax.sample")

``run`` calls ``main(argv)``; an exception of a ``USER_ERRORS`` type (bad arguments, missing or
unreadable files, checkpoints that do not fit, config errors) becomes

    python -m edit_jax.sample: error: <message on one line> (--debug shows the traceback)

and ``sys.exit(2)``. Anything else is a bug and keeps its traceback. ``--debug`` (anywhere in argv,
or ``EDIT_JAX_DEBUG=1``) re-raises user errors too. Parsers call ``add_debug_flag(parser)`` so
``--help`` lists it; ``main`` ignores the flag. Ctrl-C exits with status 130 without a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "EDIT_JAX_DEBUG"
EXIT_USER_ERROR = 2


def user_error_types() -> tuple[type[BaseException], ...]:
  """Exception types whose message is meant for the user (the library's errors subclass these)."""
  # ConfigError, DataError, MeshError (ValueError) and CheckpointError (RuntimeError subclass) are
  # covered by their bases or listed explicitly; imported lazily so `cli` stays cheap to import.
  from edit_jax.checkpoint import CheckpointError  # noqa: PLC0415
  return (ValueError, OSError, ImportError, CheckpointError)


def one_line(err: BaseException) -> str:
  """``Type: message`` on a single line (multi-line messages are joined with '; ')."""
  msg = "; ".join(s.strip() for s in str(err).splitlines() if s.strip())
  if isinstance(err, KeyError) and msg.startswith("'") and msg.endswith("'"):
    msg = msg[1:-1]
  name = type(err).__name__
  return f"{name}: {msg}" if msg else name


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument(DEBUG_FLAG, action="store_true",
                      help="show the full traceback of errors (also: EDIT_JAX_DEBUG=1)")
  return parser


def report(prog: str, err: BaseException, code: int = EXIT_USER_ERROR):
  """Prints the one-line error for ``prog`` and exits with ``code``."""
  print(f"{prog}: error: {one_line(err)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr,
        flush=True)
  sys.exit(code)


def run(main: Callable, prog: str, argv: Sequence[str] | None = None):
  """Runs ``main(argv)`` turning user errors into one line on stderr and exit status 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  try:
    return main(argv)
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except user_error_types() as e:
    if debug:
      raise
    report(prog, e)
