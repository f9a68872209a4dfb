#!/usr/bin/env bash
# bash run_ipc.sh [MODEL] [orchestrator flags]
#   MODEL: smollm2 (default, built in), an HF folder, a hub id in the local cache, synthetic:<shape>
#   --nsys: wrap the run in Nsight Systems (nsys on the PATH, or NSYS=/path/to/nsys); report in output/
# The first use creates .venv (scripts/setup_env.sh) and prepares the model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
. scripts/setup_env.sh

MODEL=smollm2
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then MODEL="$1"; shift; fi
USE_NSYS=0
ARGS=()
for a in "$@"; do
    if [ "$a" = "--nsys" ]; then USE_NSYS=1; else ARGS+=("$a"); fi
done
NSYS_BIN="${NSYS:-$(command -v nsys || true)}"

CMD=("$CASE4_PY" orchestrator.py --model "$MODEL" "${ARGS[@]+"${ARGS[@]}"}")
if [ "$USE_NSYS" = 1 ]; then
    if [ -n "$NSYS_BIN" ] && [ -x "$NSYS_BIN" ]; then
        mkdir -p output
        CMD=("$NSYS_BIN" profile --trace=cuda,nvtx,osrt --force-overwrite=true
             -o "output/nsys-$(date +%Y%m%d-%H%M%S)" "${CMD[@]}")
    else
        echo "[case4] --nsys: nsys not found, running without it" >&2
    fi
fi
exec "${CMD[@]}"
