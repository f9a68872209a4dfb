# Prepared in session 32 for the next lease, not run (its device time went on start attempts that got no machine):
# one call on a machine that has run tests/gpu/two_calls.sh A (its clean default build and /tmp/gg), ~4 min on an
# H100. Two measurements issue 26 lacks:
# 1. llama2-70b int4 G128 priced kernel kind by kind (quick_timing's step_skip ablation, dynamic graph, 64 steps):
#    70B runs at 0.623 of its floor although its matrices are ~7x 7B's, so the fixed cost a launch (entry 52: ~3.1 us)
#    should matter ~7x less there than on 7B (0.584). Entry 52's 7B fit (3.1 us + bytes / 2.30 TB/s a kernel) gives
#    ~16.9 ms for 70B's 321 quantized gemvs, ~17.3 with attention, against 19.5 measured (entry 53). At the copy rate a
#    layer's kinds would cost QKV ~14.4 us, O ~11.5, gate|up ~80.7, down ~40.4 (147 us; x 80 = 11.8 ms) and lm_head
#    ~44 us; the ablation says which kind holds the rest (down, K = 28672: 57 KB of staged input a block?).
# 2. qgemv-tc-branchless.patch (prepared in session 29) against main, 7B int4 G128 and int8 rows, two rounds
#    alternating, from extensions built on the CPU machine (bench/prebuild_device_ext.sh) so that no device time goes
#    on compiling:
#      here:   bash bench/prebuild_device_ext.sh .dev/c/main && \
#              bash bench/prebuild_device_ext.sh .dev/c/bl HEAD docs/experiments/qgemv-tc-branchless.patch
#      device: OUT=$OUT bash docs/experiments/s33-70b-ablation.sh        (carry .dev/c, 28 MB)
set -o pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
OUT=${OUT:?}
T0=$(date +%s); t() { echo "$(( $(date +%s) - T0 )) s"; }
SO=_case4_cuda.cpython-312-x86_64-linux-gnu.so
use() { cp .dev/c/$1/$SO custom_kernels/$SO; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/smi.txt
use main
QO=default,step_skip=1,step_skip=2,step_skip=4,step_skip=8,step_skip=16,step_skip=32
timeout 240 python bench/quick_timing.py --out $OUT/qt70 --shapes llama2-70b --rows skip --kernel-pdl '' --quant int4:128 \
    --quant-modes dynamic --quant-options $QO --steps 64 > $OUT/qt70.log 2>&1
echo "70B ablation rc=$? $(t)"; grep -E "^llama2-70b|copy GB" $OUT/qt70.log | cut -c1-200
QT="--shapes llama2-7b --rows skip --kernel-pdl '' --quant int4:128,int8:0 --quant-modes dynamic"
for r in 1 2; do for v in main bl; do
    use $v
    eval "timeout 100 python bench/quick_timing.py --out $OUT/qt_${v}_$r $QT" > $OUT/qt_${v}_$r.log 2>&1
    echo "== $v round $r rc=$? $(t)"; grep -E "^llama2-7b" $OUT/qt_${v}_$r.log | cut -c1-160
done; done
use main
