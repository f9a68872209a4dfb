#!/usr/bin/env bash
# NOTE (session 24): qgemv-ring.patch applies to custom_kernels/ as of commit 552287c only (entry 45 moved the fp32
# kernel's staging and epilogue into shared functions); check that tree out (git archive 552287c custom_kernels)
# over this one before running, or rebase the patch.
# Two device calls for the qgemv ring experiment (docs/performance.md entry 43), from the repository root on the GPU
# machine, back to back (the second reuses the first's build in /tmp/ring while the machine stays warm):
#   OUT=dir PHASE=check bash docs/experiments/qgemv-ring.sh     # steps 1-3 (~6 min)
#   OUT=dir PHASE=time bash docs/experiments/qgemv-ring.sh      # step 4 (~6-8 min with ROUNDS=1)
#   1. a copy of this tree with docs/experiments/qgemv-ring.patch applied, built with the default flags;
#   2. its outputs with CASE4_QGEMV=regs (today's kernel) and =ring, bitwise compared (tests/gpu/qgemv_outputs.py);
#   3. the quantized-kernel and quantized-step GPU tests with CASE4_QGEMV=ring (float64 oracle, reference backend);
#   4. bench/quick_timing.py's per-kernel GB/s rows (--kernel-pdl 3: the qgemv at 7B shapes beside the fp16 gemv) and
#      quantized 7B and SmolLM2 decode rows, regs and ring alternately (ROUNDS, default 1).
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
unset CASE4_CUDA_ARCHS
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/smi.txt"
export CASE4_BUILD_EXT=0
if [ "${PHASE:-check}" = check ]; then
rm -rf /tmp/ring && mkdir -p /tmp/ring && tar cf - --exclude=./.dev --exclude=./output --exclude=./custom_kernels/build . \
    | tar xf - -C /tmp/ring
cd /tmp/ring && rm -f custom_kernels/_case4_cuda*.so
patch -p1 < docs/experiments/qgemv-ring.patch > "$OUT/patch.log" 2>&1 || { echo "patch failed"; cat "$OUT/patch.log"; exit 1; }
(cd custom_kernels && python setup.py build_ext --inplace) > "$OUT/build.log" 2>&1
echo "build rc=$? at $(el)"; grep -iE "error|registers" "$OUT/build.log" | head -5
CASE4_QGEMV=regs timeout 120 python tests/gpu/qgemv_outputs.py save /tmp/regs.pt > "$OUT/out_regs.log" 2>&1
CASE4_QGEMV=ring timeout 120 python tests/gpu/qgemv_outputs.py save /tmp/ring.pt > "$OUT/out_ring.log" 2>&1
tail -1 "$OUT/out_regs.log" "$OUT/out_ring.log"
python tests/gpu/qgemv_outputs.py compare /tmp/regs.pt /tmp/ring.pt | tee "$OUT/compare.txt" | tail -13
echo "compare at $(el)"
CASE4_QGEMV=ring timeout 240 python -m pytest -m gpu tests/gpu/test_quant_kernels.py tests/gpu/test_architectures_gpu.py \
    -q -rs --deselect tests/gpu/test_quant_kernels.py::test_builtin_gguf_on_cuda_matches_dequant_oracle \
    > "$OUT/pytest_ring.log" 2>&1
echo "pytest (ring) rc=$? at $(el)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_ring.log" | cut -c1-200 | tail -8
exit 0
fi
cd /tmp/ring || { echo "no /tmp/ring: run PHASE=check first on this machine"; exit 1; }
for r in $(seq "${ROUNDS:-1}"); do
    for v in regs ring; do
        CASE4_QGEMV=$v timeout 280 python bench/quick_timing.py --out "$OUT/qt_${v}_$r" --shapes smollm2-135m,llama2-7b \
            --rows dynamic:custom:3 --kernel-pdl 3 --quant int8:0,int4:128,int4:32 \
            > "$OUT/qt_${v}_$r.log" 2>&1
        echo "timing $v round $r rc=$? at $(el)"; grep -E "^(smollm2|llama2)|qgemv" "$OUT/qt_${v}_$r.log" | cut -c1-160
    done
done
