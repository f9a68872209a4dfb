#!/usr/bin/env bash
# Build the CUDA extension HERE (a CPU machine with nvcc) for a lent device machine, so that an A/B call spends no
# device time compiling (a clean build costs 60-100 s of a session's 1800 s there; docs/performance.md's log):
# custom_kernels/setup.py's own compile and link commands (build()), for one architecture and the device's Python
# (the module's file name and Python headers must be its: 3.12 on the lent machines, a pyenv 3.12 here), from a
# tree given as a git revision, optionally with a patch applied (its custom_kernels/ part: a patch may carry tests too).
#   bash bench/prebuild_device_ext.sh OUTDIR [REV (HEAD)] [PATCH]   ->  OUTDIR/_case4_cuda.cpython-312-x86_64-linux-gnu.so
# Env: DEVICE_PY (python3.12 with its headers; default: pyenv's 3.12), ARCH (90a). On the device: copy the file into
# custom_kernels/ and set CASE4_BUILD_EXT=0; libcublas.so.13 comes from the torch already imported, or from
# LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib. The session's clean default build on the device
# (the README's promise) is still its own call: this is for the A/B builds after it.
# Session 32 built with it here (158 s on 2 cores, the branchless patch applied). Session 33 ran four such builds on an
# H100 (docs/performance.md entry 56), each loaded by quick_timing with CASE4_BUILD_EXT=0.
set -euo pipefail
OUTDIR=${1:?usage: bash bench/prebuild_device_ext.sh OUTDIR [REV] [PATCH]}
REV=${2:-HEAD}
PATCH=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICE_PY=${DEVICE_PY:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
[ -x "${DEVICE_PY:-}" ] || { echo "no Python 3.12 for the device's module name and headers: set DEVICE_PY" >&2; exit 2; }
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}  # any Python with pybind11, for its (version-independent) headers
PB=$("$HOST_PY" -c "import pybind11, os; print(os.path.dirname(os.path.dirname(pybind11.__file__)))")
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git -C "$ROOT" archive "$REV" custom_kernels | tar x -C "$SRC"
[ -z "$PATCH" ] || git -C "$SRC" apply --include='custom_kernels/*' "$(realpath "$PATCH")" 2>/dev/null || (cd "$SRC" && patch -p1 -s < "$(realpath "$PATCH")")
mkdir -p "$OUTDIR"
SUFFIX=$("$DEVICE_PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
PYTHONPATH="$PB" "$DEVICE_PY" - "$SRC/custom_kernels" "$(realpath "$OUTDIR")/_case4_cuda$SUFFIX" "$SRC/tmp" "${ARCH:-90a}" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import setup
out = Path(sys.argv[2])
setup.build(out, Path(sys.argv[3]), [sys.argv[4]])
print(f"built {out} ({out.stat().st_size} bytes)")
PY
