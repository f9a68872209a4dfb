# Session 33, one device call (~5 min on an H100, no build): what holds the int4 tensor-core kernel's stream at ~2.1-2.3
# TB/s (entry 52's fit; its lm_head alone: 2085 GB/s for 69.6 MB, where the fp32 kernel's int8 lm_head reaches 2699)?
# Three probes of qgemv_tc_kernel, each wrong in its values on purpose and right in its bytes, timed against main and
# against the branchless loop of session 29 (qgemv-tc-branchless.patch), from extensions built on the CPU machine:
#   pA  qgemv-tc-probe-layout.patch     a tile's step read as one contiguous 512 B (the 8 rows x 64 B of the real layout
#                                       scattered over 8 rows): does the access pattern cost the stream?
#   pB  qgemv-tc-probe-nocompute.patch  no unpack, no mma, no B loads (the loads folded by one xor): is it the loop's work?
#   pAB both
#   pC  qgemv-tc-probe-nostage.patch    no staging or norm of the input (a barrier only): what does the prologue cost?
# here:   for v in main:'' bl:docs/experiments/qgemv-tc-branchless.patch pA:...; do
#             bash bench/prebuild_device_ext.sh .dev/c/$v HEAD $patch; done; then xz each .so into .dev/cx/$v.so.xz
# device: OUT=$OUT bash docs/experiments/s33-probes.sh      (carry .dev/cx, ~35 MB)
#         or after tests/gpu/two_calls.sh A in the same call, main being A's build: VARIANTS='main bl pA pB pC' ROUNDS=1
# ABL70=1 adds, with main, llama2-70b int4 G128 priced kernel kind by kind (quick_timing's step_skip ablation, dynamic
# graph, 64 steps; bits: 1 QKV, 2 attention, 4 O, 8 gate|up, 16 down, 32 lm_head), prepared in session 32, run in session 34 (performance.md
# entry 59, the same options run directly on that session's build):
# 70B runs at 0.623 of its floor although its matrices are ~7x 7B's, and entry 52's 7B fit (3.1 us + bytes / 2.30 TB/s a
# kernel) predicts ~17.3 ms against 19.5 measured (entry 53); at the copy rate a layer's kinds would cost QKV ~14.4 us,
# O ~11.5, gate|up ~80.7, down ~40.4 and lm_head ~44 us: the ablation says which kind holds the rest.
# Every variant runs with CASE4_QGEMV=tc (int4 and int8 on the tensor-core kernel); main once more with the default
# kernels (int8 on the fp32 kernel). Rows: 7B dynamic graph, device greedy, 256 steps; per kernel qgemv_bw (pdl 3).
. "$(dirname "$0")/device_env.sh"
mkdir -p /tmp/so && for f in .dev/cx/*.so.xz; do xz -dc $f > /tmp/so/$(basename $f .xz); done
# main: this call's own build of the tree (call A's, tests/gpu/two_calls.sh) where no prebuilt one came; restored after
[ -f custom_kernels/$SO ] && cp custom_kernels/$SO /tmp/so/built.so
[ -f /tmp/so/main.so ] || cp /tmp/so/built.so /tmp/so/main.so
use() { cp /tmp/so/$1.so custom_kernels/$SO; }
QT="--shapes llama2-7b --rows skip --kernel-pdl 3 --quant int4:128,int8:0 --quant-modes dynamic"
run() {  # run NAME VARIANT [ENV...]
    local n=$1 v=$2; shift 2
    use $v
    env "$@" timeout 100 python bench/quick_timing.py --out $OUT/qt_$n $QT > $OUT/qt_$n.log 2>&1
    echo "== $n ($v $*) rc=$? $(t)"
    grep -E "^llama2-7b|'(int4 G=128|int8 G=4096|int8 G=11008) " $OUT/qt_$n.log | sed -E "s/'pdl': 3, //" | cut -c1-150
}
run main_default main
for r in $(seq ${ROUNDS:-2}); do
    for v in ${VARIANTS:-main bl pA pB pAB pC}; do run ${v}_$r $v CASE4_QGEMV=tc; done
done
if [ -n "${ABL70:-}" ]; then
    use main
    QO=default,step_skip=1,step_skip=2,step_skip=4,step_skip=8,step_skip=16,step_skip=32
    timeout 240 python bench/quick_timing.py --out $OUT/qt70 --shapes llama2-70b --rows skip --kernel-pdl '' \
        --quant int4:128 --quant-modes dynamic --quant-options $QO --steps 64 > $OUT/qt70.log 2>&1
    echo "70B ablation rc=$? $(t)"; grep -E "^llama2-70b|copy GB" $OUT/qt70.log | cut -c1-200
fi
if [ -f /tmp/so/built.so ]; then use built; else use main; fi
echo "total $(t)"
