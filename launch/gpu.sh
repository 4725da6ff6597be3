#!/usr/bin/env bash
# Train edit_jax on GPUs: one process per node drives all of the node's GPUs.
#
#   bash launch/gpu.sh setup              # venv + jax[cuda12|cuda13] (from nvidia-smi) + edit_jax
#   CONFIG=configs/sit.py:B2-med64 WORKDIR=runs/b2-med64 \
#     bash launch/gpu.sh train --config.data.path=/data/latents256 --config.model.dtype=bfloat16
#
# Multi-node: run the same `train` command on every node with
#   NUM_NODES=4 NODE_RANK=<0..3> COORDINATOR=<node0 host>:1234
# (or under SLURM with `srun --ntasks-per-node=1 bash launch/gpu.sh train ...`: jax.distributed
# reads the SLURM variables itself). The workdir must be on a filesystem every node sees.
# Ctrl-C / SIGTERM saves a checkpoint; rerunning the command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/sit.py:S2-med64}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG%%:*}" .py)-${CONFIG##*:}}
PYTHON=${PYTHON:-python3.11}
cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    # The CUDA wheels must match the driver: nvidia-smi reports the newest CUDA it supports.
    if ! command -v nvidia-smi >/dev/null; then
      echo "gpu.sh setup: nvidia-smi not found: this machine has no NVIDIA driver (for CPU use" \
           "bash launch/quickstart.sh or pip install -r requirements.txt)" >&2
      exit 2
    fi
    CUDA_MAJOR=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -1)
    case "$CUDA_MAJOR" in
      12) CUDA_EXTRA=cuda12 ;;
      1[3-9]) CUDA_EXTRA=cuda13 ;;
      *) echo "gpu.sh setup: the NVIDIA driver supports CUDA '${CUDA_MAJOR:-unknown}'; jax needs" \
              "CUDA 12 or 13: update the driver" >&2
         exit 2 ;;
    esac
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    # jax[cuda] from the same version range as requirements.txt (never "whatever is newest").
    JAX_SPEC=$(grep -E '^jax[><=]' requirements.txt | head -1 | sed 's/^jax//')
    .venv/bin/pip install -q -r requirements.txt "jax[$CUDA_EXTRA]$JAX_SPEC"
    .venv/bin/pip install -q --no-deps -e .
    .venv/bin/python -c "import jax; print(jax.devices())" ;;
  train)
    DIST=()
    if [ -n "${NUM_NODES:-}" ] && [ "${NUM_NODES}" -gt 1 ]; then
      : "${NODE_RANK:?set NODE_RANK}" "${COORDINATOR:?set COORDINATOR=host:port}"
      DIST=(--config.distributed.enabled=true --config.distributed.coordinator_address="$COORDINATOR"
            --config.distributed.num_processes="$NUM_NODES" --config.distributed.process_id="$NODE_RANK")
    elif [ -n "${SLURM_NTASKS:-}" ] && [ "${SLURM_NTASKS}" -gt 1 ]; then
      DIST=(--config.distributed.enabled=true)
    fi
    # Let XLA use most of the GPU memory up front (the default 75% is fine too).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
    exec .venv/bin/python -m edit_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${DIST[@]}" "$@" ;;
  *)
    sed -n '2,13p' "$0"; exit 1 ;;
esac
