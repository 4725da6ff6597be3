#!/usr/bin/env bash
# Train edit_jax on a Cloud TPU VM slice (single host like v4-8 or multi-host like v4-32/v5p-64).
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=sit-v4-32 ACCELERATOR_TYPE=v4-32
#   export BUCKET=gs://my-bucket              # workdir (checkpoints, TensorBoard, samples) on GCS
#   bash launch/tpu.sh create                 # create the slice (add SPOT=1 for spot capacity)
#   bash launch/tpu.sh setup                  # copy this repo to every worker, install it
#   CONFIG=configs/sit.py:XL2-med64 RUN=xl2-med64 \
#     bash launch/tpu.sh train --config.data.path=/mnt/latents --config.sample.vae_path=/mnt/vae
#   bash launch/tpu.sh logs                   # follow worker 0's log
#   bash launch/tpu.sh stop | delete
#
# Every command runs on all workers (`gcloud compute tpus tpu-vm ssh --worker=all`): a multi-host
# slice needs one process per host, and jax.distributed.initialize() (EDIT_JAX_DISTRIBUTED=1) must
# run on all of them or it hangs. Each host reads only its slice of every global batch. The workdir
# must be shared by all hosts (GCS). Rerunning `train` after a preemption resumes from the newest
# checkpoint; SIGTERM (`stop`, or a spot preemption notice) saves a checkpoint first.
# Data: the latents written by `python -m edit_jax.prepare` must be readable on every host at
# data.path (a local copy per host, or a gcsfuse mount); the VAE file only for decoded sample grids.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/sit.py:S2-med64}
RUN=${RUN:-$(basename "${CONFIG%%:*}" .py)-${CONFIG##*:}}
WORKDIR=${WORKDIR:-${BUCKET:?set BUCKET (gs://...) or WORKDIR}/edit_jax/$RUN}
REMOTE_DIR=${REMOTE_DIR:-edit_jax}

all() {  # run a command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${SPOT:+--spot} ;;
  setup)
    # jax[tpu] from the same version range as requirements.txt (never "whatever is newest").
    JAX_SPEC=$(grep -E '^jax[><=]' requirements.txt | head -1 | sed 's/^jax//')
    TARBALL=$(mktemp "${TMPDIR:-/tmp}/edit_jax_src.XXXXXX.tgz")
    tar --exclude=.venv --exclude=.git --exclude=runs --exclude=.jax_cache -czf "$TARBALL" .
    gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME":/tmp/ --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    REMOTE_TGZ=/tmp/$(basename "$TARBALL")
    rm -f "$TARBALL"
    all "set -e; command -v python3.11 >/dev/null || (sudo apt-get update -qq \
      && sudo apt-get install -y -qq python3.11 python3.11-venv); mkdir -p ~/$REMOTE_DIR \
      && tar -xzf $REMOTE_TGZ -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR \
      && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip \
      && .venv/bin/pip install -q -r requirements.txt $(printf %q "jax[tpu]$JAX_SPEC") \
         google-cloud-storage gcsfs \
      && .venv/bin/pip install -q --no-deps -e . \
      && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'" ;;
  train)
    EXTRA=""
    if [ "$#" -gt 0 ]; then EXTRA=$(printf ' %q' "$@"); fi
    all "cd ~/$REMOTE_DIR && EDIT_JAX_DISTRIBUTED=1 nohup .venv/bin/python -m edit_jax.main \
      $(printf %q "--config=$CONFIG") $(printf %q "--workdir=$WORKDIR")$EXTRA \
      > train.log 2>&1 < /dev/null &
      echo started on \$(hostname): workdir $(printf %q "$WORKDIR")" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 100 -f ~/$REMOTE_DIR/train.log" ;;
  stop)   # SIGTERM: every host saves its part of a checkpoint at the same step, then exits
    all "pkill -TERM -f 'edit_jax.main' || true" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    sed -n '2,22p' "$0"; exit 1 ;;
esac
