#!/usr/bin/env bash
# The seed's training command: ./train_mm.sh N_STATES [SEED] [--sparse S] [--preset NAME] [--key=value ...]
#   ./train_mm.sh 10                       MM-10, seed 42, our default recipe
#   ./train_mm.sh 100 123 --sparse 75      MM-100 sparse-75, seed 123
#   ./train_mm.sh 100 --wandb_log=True     with Weights & Biases
#   ./train_mm.sh 100 --preset seed        the seed's own recipe (40x gradient accumulation: hours on a CPU)
# Needs the data first: python scripts/mm_generate.py 100 --train 50000 --val 5000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || $# -eq 0 ]]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 0 ]] && exit 2 || exit 0
fi
exec "${PYTHON:-python3}" "$here/train_mm.py" "$@"
