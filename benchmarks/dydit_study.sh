#!/usr/bin/env bash
# DyDiT digits study: base quickstart -> DyDiT fine-tunes at lambda 0.7 and 0.5 -> quality and
# speed (benchmarks/results/dydit_digits.json), then the cost side on a larger model with random
# weights (benchmarks/results/dydit_s2_cpu.json). docs/dydit.md shows the numbers.
#   bash benchmarks/dydit_study.sh [RUNS_DIR]        (~40 min on an idle 2-core CPU)
set -euo pipefail
RUNS=${1:-runs}
PY=${PYTHON:-python}
# both trainings resume where they stopped and only report when already finished
$PY -m edit_jax.main --config=configs/quickstart.py --workdir="$RUNS/quickstart"
for LAM in 0.7 0.5; do
  $PY -m edit_jax.main --config=configs/dydit_quickstart.py:$LAM --config.init_from="$RUNS/quickstart" \
    --workdir="$RUNS/dydit_quickstart_$LAM"
done
$PY benchmarks/dydit_speed.py digits --base "$RUNS/quickstart" \
  --dydit 0.7="$RUNS/dydit_quickstart_0.7" --dydit 0.5="$RUNS/dydit_quickstart_0.5" \
  --batch 50 --quality_samples 500 --repeats 3 --bucket 2 --capacity_levels 0 \
  --out benchmarks/results/dydit_digits.json
$PY benchmarks/dydit_speed.py synthetic --name SiT-S/2 --input_size 32 --targets 0.7,0.5 \
  --method euler --num_steps 11 --cfg 1.5 --batch 8 --repeats 3 --out benchmarks/results/dydit_s2_cpu.json
$PY benchmarks/dydit_speed.py render
