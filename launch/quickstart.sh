#!/usr/bin/env bash
# Quickstart: train a small SiT WITH attention mediators on 5,000 real MNIST digits and write a PNG
# grid of class-conditional samples (rows = digits 0..9). The step budget of configs/quickstart.py
# is the contract, not the clock: a slower machine takes longer (the progress lines show the ETA;
# docs/training.md gives the measured times). Uses a GPU/TPU when jax finds one.
#
#   bash launch/quickstart.sh                      # -> runs/quickstart/samples/latest.png
#   WORKDIR=/tmp/qs bash launch/quickstart.sh --config.num_train_steps=500   # any config override
#
# Re-running continues where the last run stopped (Ctrl-C saves a checkpoint first); a finished run
# is not trained again, only reported. The last line states the step reached and the share of the
# sampled digits that the offline classifier assigns to their label.
#
# Env: PYTHON (default python3.11), WORKDIR (default runs/quickstart), ACCEL=auto|cpu|cuda|tpu
# (auto: installs jax[cuda12] when nvidia-smi works and jax[tpu] on TPU VMs).
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

if [ -d "$WORKDIR/checkpoints" ]; then
  echo "== $WORKDIR holds a run: continuing it (a finished run is only reported)"
fi
echo "== training (TensorBoard: .venv/bin/tensorboard --logdir $WORKDIR/tensorboard, if installed)"
.venv/bin/python -m edit_jax.main --config=configs/quickstart.py --workdir="$WORKDIR" "$@"

.venv/bin/python - "$WORKDIR" "$((SECONDS - START))" <<'PY'
import json, pathlib, sys
wd, secs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
try:
  s = json.loads((wd / "samples" / "latest.json").read_text())
except (OSError, ValueError):
  sys.exit(f"no sample grid was written in {wd} (see the log above)")
acc = s.get("digit_accuracy")
score = (f"{100 * acc:.1f}% of the {s['num_samples']} sampled digits are classified as their label"
         if acc is not None else "no digit score")
print(f"== done in {secs // 60}m{secs % 60:02d}s: step {s['step']} of {s.get('num_train_steps', '?')}, "
      f"{score}; samples in {s['png']} (rows: digits 0..9)")
PY
