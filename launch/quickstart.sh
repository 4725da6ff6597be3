#!/usr/bin/env bash
# Quickstart: train a small SiT WITH attention mediators on 5,000 real MNIST digits and write a PNG
# grid of class-conditional samples (rows = digits 0..9). About 8 minutes on a 2-core CPU
# (venv + install + ~6 min training + sampling); uses a GPU/TPU when jax finds one.
#
#   bash launch/quickstart.sh                      # -> runs/quickstart/samples/latest.png
#   WORKDIR=/tmp/qs bash launch/quickstart.sh --config.num_train_steps=500   # any config override
#
# Env: PYTHON (default python3.11), WORKDIR (default runs/quickstart; an existing finished run is
# moved aside), ACCEL=auto|cpu|cuda|tpu (auto: installs jax[cuda12] when nvidia-smi works and
# jax[tpu] on TPU VMs).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PYTHON=${PYTHON:-python3.11}
WORKDIR=${WORKDIR:-runs/quickstart}
ACCEL=${ACCEL:-auto}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "== installing requirements and edit_jax"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .

if [ "$ACCEL" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ACCEL=cuda
  elif [ -e /dev/accel0 ] || ls /dev/vfio/[0-9]* >/dev/null 2>&1; then ACCEL=tpu
  else ACCEL=cpu; fi
fi
JAX_SPEC=$(grep -E '^jax[><=]' requirements.txt | head -1 | sed 's/^jax//')
case "$ACCEL" in
  cuda) echo "== GPU found: installing jax[cuda12]"; .venv/bin/python -m pip install -q "jax[cuda12]$JAX_SPEC" ;;
  tpu)  echo "== TPU found: installing jax[tpu]"; .venv/bin/python -m pip install -q "jax[tpu]$JAX_SPEC" ;;
  *)    echo "== no accelerator: training on the CPU" ;;
esac
.venv/bin/python -c "import jax; print('== jax', jax.__version__, 'devices:', jax.devices())"

if [ -f "$WORKDIR/samples/latest.png" ]; then
  OLD="$WORKDIR.$(date +%Y%m%d-%H%M%S)"
  echo "== $WORKDIR holds a finished run: moving it to $OLD"
  mv "$WORKDIR" "$OLD"
fi
echo "== training (TensorBoard: .venv/bin/tensorboard --logdir $WORKDIR/tensorboard, if installed)"
.venv/bin/python -m edit_jax.main --config=configs/quickstart.py --workdir="$WORKDIR" "$@"

PNG="$WORKDIR/samples/latest.png"
if [ ! -f "$PNG" ]; then echo "no sample grid was written (see the log above)" >&2; exit 1; fi
echo "== done in $((SECONDS - START)) s: samples in $PNG (rows: digits 0..9)"
