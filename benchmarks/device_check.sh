#!/usr/bin/env bash
# The prepared GPU check in one command (see benchmarks/device_check.py and docs/benchmarks.md).
#
#   bash benchmarks/device_check.sh [device_check.py options, e.g. --sections model,train]
#
# Writes device_check.json, device_check.md and device_check.log to $OUT (the device tool's output
# folder) or, when $OUT is unset, to benchmarks/results/device_check/. The script's budget is
# DEVICE_CHECK_BUDGET_S seconds (default 420, compiles included); a hard stop sends SIGTERM 45 s
# after that (the JSON written so far is kept and marked "terminated") and SIGKILL 15 s later, so
# the whole command ends within 8 minutes. Needs jax[cuda], flax, optax, numpy: nothing else.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT_DIR="${OUT:-benchmarks/results/device_check}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-420}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT_DIR"

# Persistent compilation cache in an ignored folder: a second call on the same warm machine skips
# most compiles. No preallocation surprises: XLA may take 90 % of the GPU memory.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export PYTHONUNBUFFERED=1

{
  echo "# device_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), budget ${BUDGET} s"
  echo "# python: $PY ($("$PY" --version 2>&1)); git: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
      2>&1 | sed 's/^/# nvidia-smi: /'
  else
    echo "# nvidia-smi: not found"
  fi
} | tee "$OUT_DIR/device_check.log"

timeout -s TERM -k 15 "$((${BUDGET%.*} + 45))" \
  "$PY" -u benchmarks/device_check.py --out "$OUT_DIR" --budget-s "$BUDGET" "$@" 2>&1 \
  | tee -a "$OUT_DIR/device_check.log"
rc=${PIPESTATUS[0]}
echo "# device_check.py exit status $rc (0 all passed, 1 some item failed or errored, 124/143 stopped)" \
  | tee -a "$OUT_DIR/device_check.log"
exit "$rc"
