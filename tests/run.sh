#!/usr/bin/env bash
# Installs the pinned test environment into .venv (Python 3.11) and runs the whole test suite.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -r requirements.txt pytest pytest-xdist
.venv/bin/python -m pip install -q --no-deps -e .
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
# Three workers on a 2-core machine (the suite is compile-bound and partly waits on subprocesses,
# so a third worker fills idle time); each test file sets up its own fake CPU devices (conftest.py).
exec .venv/bin/python -m pytest -n 3 --dist loadfile "$@" tests
