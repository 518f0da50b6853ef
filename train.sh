#!/usr/bin/env bash
# ./train.sh [batch_size] [epochs] [lr] [rank] [lambda_B] [lambda_ortho] [results_dir] [train_real_data.py flags...]
# e.g. ./train.sh 8 20 0.001 128 0.0001 0.001 results --cache_dir feature_cache_real --arch subspace
#      ./train.sh --cache_dir feature_cache_real --arch subspace      (flags only: the positionals keep their defaults)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# python: $PYTHON, else the active virtualenv/conda one, else the .venv that `make` creates beside this script
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python; fi
fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  cat <<'USAGE'
usage: ./train.sh [batch_size] [epochs] [lr] [rank] [lambda_B] [lambda_ortho] [results_dir] [flags...]

Positionals (all optional, in this order), then any flags of train_real_data.py, passed through. A positional
that is not given takes train_real_data.py's default (listed below): the parser is the one source of every default.
Flags alone are fine: ./train.sh --cache_dir feature_cache_real --arch subspace
The python used: $PYTHON, else the active environment's, else the .venv beside this script.

train_real_data.py's own help:
USAGE
  exec "$PY" "$here/train_real_data.py" --help
fi
# the leading arguments that are not flags are the positionals (at most 7)
pos=()
while [ $# -gt 0 ] && [ ${#pos[@]} -lt 7 ] && [[ "$1" != -* || "$1" =~ ^-?[0-9.]+([eE][-+]?[0-9]+)?$ ]]; do
  pos+=("$1"); shift
done
names=(--batch_size --epochs --lr --rank --lambda_B --lambda_ortho --results_dir)
cmd=("$PY" "$here/train_real_data.py")
for i in "${!pos[@]}"; do cmd+=("${names[$i]}" "${pos[$i]}"); done
cmd+=("$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
