# Sourced by the experiment scripts here (on a lent device machine): the prebuilt extension's environment (no build:
# CASE4_BUILD_EXT=0, cuBLAS from the toolkit's lib), $OUT required, t() for the seconds since the start, the card named.
set -o pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
OUT=${OUT:?set OUT to the folder whose files come back}
T0=$(date +%s); t() { echo "$(( $(date +%s) - T0 )) s"; }
SO=_case4_cuda.cpython-312-x86_64-linux-gnu.so
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/smi.txt
