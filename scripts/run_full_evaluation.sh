#!/usr/bin/env bash
# The seed's whole evaluation of one run, then the report over its chain's runs:
#   scripts/run_full_evaluation.sh SCALE [SEED]        e.g.  100 42,  100-sparse-75 123
# evaluates trainings/MM/MM-SCALE/MM-SCALE-SEED/ckpt.pt, then reports on trainings/MM/MM-SCALE.
# Set PYTHON to choose the interpreter (default python3).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "error: usage: $0 SCALE [SEED] (e.g. $0 100 42)" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
scale="$1"
seed="${2:-42}"
base="trainings/MM/MM-${scale}"

"$python" "$here/mm_eval.py" --ckpt_path "${base}/MM-${scale}-${seed}/ckpt.pt"
"$python" "$here/aggregate_metrics.py" "$base"
