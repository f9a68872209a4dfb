#!/usr/bin/env bash
# bash run_ipc.sh [MODEL] [orchestrator flags]
#   MODEL: smollm2 (default, built in), an HF folder, a hub id in the local cache, synthetic:<shape>
#   --nsys: wrap the run in Nsight Systems (when nsys exists); the report goes to output/
# The first use creates .venv (scripts/setup_env.sh) and prepares the model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
. scripts/setup_env.sh

MODEL=smollm2
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then MODEL="$1"; shift; fi
NSYS=0
ARGS=()
for a in "$@"; do
    if [ "$a" = "--nsys" ]; then NSYS=1; else ARGS+=("$a"); fi
done

CMD=(python orchestrator.py --model "$MODEL" "${ARGS[@]+"${ARGS[@]}"}")
if [ "$NSYS" = 1 ]; then
    if command -v nsys >/dev/null 2>&1; then
        mkdir -p output
        CMD=(nsys profile --trace=cuda,nvtx,osrt --force-overwrite=true
             -o "output/nsys-$(date +%Y%m%d-%H%M%S)" "${CMD[@]}")
    else
        echo "[case4] --nsys: nsys not found, running without it" >&2
    fi
fi
exec "${CMD[@]}"
