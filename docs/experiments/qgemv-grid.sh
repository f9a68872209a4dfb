#!/usr/bin/env bash
# One device call (~6 min) for the qgemv grid experiment (docs/performance.md section 5, after entry 45), from the
# repository root on the GPU machine:  OUT=dir bash docs/experiments/qgemv-grid.sh
#   1. a copy of this tree with docs/experiments/qgemv-grid.patch applied, built with the default flags;
#   2. its outputs with CASE4_QGEMV_GRID=x4 (main's grid: 4 blocks a SM) and =resident (at most the blocks that
#      fit at once), bitwise compared (tests/gpu/qgemv_outputs.py: they must be equal, a row is one warp's);
#   3. quick_timing's quantized 7B and SmolLM2 decode rows and the per-kernel rows, x4 and resident alternately.
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH CASE4_BUILD_EXT=0
unset CASE4_CUDA_ARCHS CASE4_QGEMV
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/smi.txt"
rm -rf /tmp/grid && mkdir -p /tmp/grid && tar cf - --exclude=./.dev --exclude=./output --exclude=./custom_kernels/build . \
    | tar xf - -C /tmp/grid
cd /tmp/grid && rm -f custom_kernels/_case4_cuda*.so
patch -p1 < docs/experiments/qgemv-grid.patch > "$OUT/patch.log" 2>&1 || { echo "patch failed"; cat "$OUT/patch.log"; exit 1; }
(cd custom_kernels && python setup.py build_ext --inplace) > "$OUT/build.log" 2>&1
echo "build rc=$? at $(el)"
for v in x4 resident; do
    CASE4_QGEMV_GRID=$v timeout 120 python tests/gpu/qgemv_outputs.py save /tmp/$v.pt > "$OUT/out_$v.log" 2>&1
done
python tests/gpu/qgemv_outputs.py compare /tmp/x4.pt /tmp/resident.pt | tee "$OUT/compare.txt" | tail -5
echo "compare at $(el)"
for r in 1 2; do
    for v in x4 resident; do
        CASE4_QGEMV_GRID=$v timeout 150 python bench/quick_timing.py --out "$OUT/qt_${v}_$r" --shapes llama2-7b,smollm2-135m \
            --rows dynamic:custom:3 --kernel-pdl "$([ $r = 1 ] && echo 3)" --quant int8:0,int4:128,int4:32 > "$OUT/qt_${v}_$r.log" 2>&1
        echo "timing $v round $r rc=$? at $(el)"; grep -E "^(smollm2|llama2)|int[48] G" "$OUT/qt_${v}_$r.log" | cut -c1-160
    done
done
