#!/usr/bin/env bash
# One device call for kernel work: build this tree (and optionally a baseline tree, in
# parallel), time both with bench/quick_timing.py (per-kernel GEMV GB/s per PDL mode, ms/token
# per decode row, first-request TTFT), then the GPU test suite. Logs go into one tarball in $OUT.
# usage (GPU machine): OUT=dir [BASELINE=tree.tar] [ROWS=mode:gemm:pdl,...] [TESTS=0] bash tests/gpu/perf_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH CASE4_CUDA_ARCHS=${CASE4_CUDA_ARCHS:-90a}
ROOT=$(cd "$(dirname "$0")/../.." && pwd); cd "$ROOT"
L=$OUT/logs; mkdir -p $L
ROWS=${ROWS:-dynamic:custom:3,exact:custom:3,none:custom:3,exact:custom:1}
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv > $L/smi.txt 2>&1
t0=$(date +%s)
(cd custom_kernels && python setup.py build_ext --inplace) > $L/build.log 2>&1 &
if [ -n "${BASELINE:-}" ]; then
    rm -rf /tmp/base && mkdir -p /tmp/base && tar xf "$BASELINE" -C /tmp/base
    mkdir -p /tmp/base/bench && cp bench/quick_timing.py /tmp/base/bench/quick_timing.py
    (cd /tmp/base/custom_kernels && python setup.py build_ext --inplace) > $L/build_base.log 2>&1 &
fi
wait
echo "builds done in $(( $(date +%s) - t0 )) s"; tail -2 $L/build.log
if [ -n "${BASELINE:-}" ]; then
    echo "== baseline"
    (cd /tmp/base && python bench/quick_timing.py --out $L/base --steps 256 --rows "$ROWS") > $L/timing_base.log 2>&1
    grep -E "^\{'kernel'" $L/timing_base.log | grep -E "o 7B|down 7B|qkv|gate.up 7B|lm_head 7B" | cut -c1-150
    sed -n '/^shape/,$p' $L/timing_base.log
fi
echo "== this tree"
python bench/quick_timing.py --out $L/new --steps 256 --rows "$ROWS" ${TTFT:+--ttft} > $L/timing_new.log 2>&1
grep -E "^\{'kernel'" $L/timing_new.log | grep -E "o 7B|down 7B|qkv|gate.up 7B|lm_head 7B" | cut -c1-150
grep -E "^\{'warmup'" $L/timing_new.log
sed -n '/^shape/,$p' $L/timing_new.log
echo "timing done at $(( $(date +%s) - t0 )) s"
if [ "${TESTS:-1}" = 1 ]; then
    SKIP_BENCH=1 timeout ${GPU_TEST_TIMEOUT:-330} bash tests/run_gpu.sh $L/gpu > $L/run_gpu.log 2>&1
    echo "run_gpu rc=$?"; cat $L/gpu/gpu_tests.json 2>/dev/null
    grep -E "^(FAILED|ERROR)|passed|failed" $L/gpu/pytest.log | cut -c1-300 | head -20
fi
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "total $(( $(date +%s) - t0 )) s"
