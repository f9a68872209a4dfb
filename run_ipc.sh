#!/usr/bin/env bash
# bash run_ipc.sh [MODEL] [orchestrator flags]
# bash run_ipc.sh serve [MODEL] [serve flags]   (an OpenAI-compatible HTTP server, docs/serve.md)
#   MODEL: smollm2 (default, built in), an HF folder, a hub id in the local cache, synthetic:<shape>
#   --nsys: wrap the run in Nsight Systems (nsys on the PATH, or NSYS=/path/to/nsys); the report
#           <output-dir>/nsys-<time>.nsys-rep (summary: python scripts/nsys_summary.py REPORT)
#   PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True where unset, as the seed runs (fewer fragmented blocks
#           beside the graph pools); a value already set is kept
# The first use creates .venv (scripts/setup_env.sh) and prepares the model; on a GPU machine with nvcc
# the first run also builds the CUDA extension (custom_kernels/ext.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# no cd: a relative model folder or --output-dir means the caller's directory, as with any command
. "$ROOT/scripts/setup_env.sh"

SUB=()
if [ $# -gt 0 ] && [ "$1" = serve ]; then SUB=(serve); shift; fi
MODEL=smollm2
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then MODEL="$1"; shift; fi
USE_NSYS=0
OUT_DIR=output
ARGS=()
prev=
for a in "$@"; do
    if [ "$a" = "--nsys" ]; then USE_NSYS=1; else ARGS+=("$a"); fi
    if [ "$prev" = "--output-dir" ]; then OUT_DIR="$a"; fi
    case "$a" in --output-dir=*) OUT_DIR="${a#--output-dir=}" ;; esac
    prev="$a"
done
NSYS_BIN="${NSYS:-$(command -v nsys || true)}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

CMD=("$CASE4_PY" "$ROOT/orchestrator.py" "${SUB[@]+"${SUB[@]}"}" --model "$MODEL" "${ARGS[@]+"${ARGS[@]}"}")
if [ "$USE_NSYS" = 1 ]; then
    if [ -n "$NSYS_BIN" ] && [ -x "$NSYS_BIN" ]; then
        mkdir -p "$OUT_DIR"
        PREFIX="$OUT_DIR/nsys-$(date +%Y%m%d-%H%M%S)"
        # cuda + nvtx only: osrt traced every poll/futex of the processes' queue waits and made a 2.3 GB
        # raw capture for 100 SmolLM2 tokens; no CPU sampling or context switches for the same reason.
        # Graph kernels one by one (node), so that scripts/nsys_summary.py sees the replay stream's kernels.
        rc=0
        "$NSYS_BIN" profile --trace=cuda,nvtx --sample=none --cpuctxsw=none --cuda-graph-trace=node \
            --force-overwrite=true -o "$PREFIX" "${CMD[@]}" || rc=$?
        # a stripped nsys stops at PREFIX.qdstrm: import it here (or say in one line what is missing)
        "$CASE4_PY" "$ROOT/scripts/nsys_import.py" "$NSYS_BIN" "$PREFIX" || { [ "$rc" != 0 ] || rc=1; }
        exit "$rc"
    fi
    echo "[case4] --nsys: nsys not found (put it on the PATH or set NSYS=/path/to/nsys), running without it" >&2
fi
exec "${CMD[@]}"
