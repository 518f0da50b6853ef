#!/usr/bin/env bash
# ./train.sh [batch_size] [epochs] [lr] [rank] [lambda_B] [lambda_ortho] [results_dir] [extra train_real_data.py flags...]
# e.g. ./train.sh 8 20 0.001 128 0.0001 0.001 results --cache_dir feature_cache_real --arch subspace
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BATCH_SIZE=${1:-8}
EPOCHS=${2:-20}
LR=${3:-0.001}
RANK=${4:-128}
LAMBDA_B=${5:-0.0001}
LAMBDA_ORTHO=${6:-0.001}
RESULTS_DIR=${7:-results}
shift $(( $# < 7 ? $# : 7 ))
# python: $PYTHON, else the active virtualenv/conda one, else the .venv that `make` creates beside this script
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python; fi
fi
cmd=("$PY" "$here/train_real_data.py" --batch_size "$BATCH_SIZE" --epochs "$EPOCHS" --lr "$LR" --rank "$RANK"
     --lambda_B "$LAMBDA_B" --lambda_ortho "$LAMBDA_ORTHO" --results_dir "$RESULTS_DIR" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
