# Prepared in session 33, not run (its device time ran out: five start attempts got no machine). One call (~4-5 min on
# an H100 with the build prebuilt): the tree with docs/experiments/qgemv-tc-int8-default.patch applied (int8 on fp16
# models on the tensor-core kernel, whose loop becomes session 29's branchless one; entry 56 measured it once: 7B int8
# 2.656 against 2.962 ms/token); its quant-kernel tests and the GGUF GPU tests (the GPU's round-to-nearest equal to
# the CPU's, since quant.py divides by tensors); the branchless tc kernel's outputs bitwise against main's tc kernel
# (tests/gpu/qgemv_outputs.py --quick, main's build prebuilt: .dev/cx/main.so.xz); then the 7B quantized rows, main's
# build against this one, alternating (ROUNDS, default 2; 0: none).
#   here:   git apply docs/experiments/qgemv-tc-int8-default.patch && git commit ...;
#           bash bench/prebuild_device_ext.sh .dev/c/new && xz -c .dev/c/new/*.so > .dev/cx/new.so.xz
#           bash bench/prebuild_device_ext.sh .dev/c/main HEAD~1 && xz -c .dev/c/main/*.so > .dev/cx/main.so.xz
#   device: OUT=$OUT bash docs/experiments/s33-verify.sh      (carry .dev/a/site, .dev/cx/main.so.xz and, to skip the
#   build, .dev/cx/new.so.xz); if it passes, the whole quant file's opt-in runs and the real-GGUF test (two_calls.sh B)
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/gg/site${PYTHONPATH:+:$PYTHONPATH}
unset CASE4_CUDA_ARCHS CASE4_QGEMV
OUT=${OUT:?}
T0=$(date +%s); t() { echo "$(( $(date +%s) - T0 )) s"; }
SO=_case4_cuda.cpython-312-x86_64-linux-gnu.so
mkdir -p /tmp/gg /tmp/so && cp -r .dev/a/site /tmp/gg/ && xz -dc .dev/cx/main.so.xz > /tmp/so/main.so || exit 3
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/smi.txt
if [ -f .dev/cx/new.so.xz ]; then  # built on the CPU machine (bench/prebuild_device_ext.sh): no device time compiling
    xz -dc .dev/cx/new.so.xz > /tmp/so/new.so && cp /tmp/so/new.so custom_kernels/$SO; echo "prebuilt rc=$? $(t)"
else
    (cd custom_kernels && rm -rf build ./*.so && python setup.py build_ext --inplace > $OUT/build.log 2>&1)
    echo "clean default build rc=$? $(t)"
    cp custom_kernels/$SO /tmp/so/new.so
fi
export CASE4_BUILD_EXT=0
PT="python -m pytest -m gpu -q -rs -p no:cacheprovider"
timeout 220 $PT tests/gpu/test_quant_kernels.py -k 'not builtin_gguf and not opt_in' > $OUT/quant.log 2>&1 & p1=$!
timeout 220 $PT tests/gpu/test_gguf_gpu.py > $OUT/gguf.log 2>&1 & p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
echo "quant rc=$r1, gguf rc=$r2 $(t): $(tail -1 $OUT/quant.log) | $(tail -1 $OUT/gguf.log)"
grep -hE "^(FAILED|ERROR|SKIPPED)" $OUT/quant.log $OUT/gguf.log | cut -c1-250 | head -12
for v in new main; do
    cp /tmp/so/$v.so custom_kernels/$SO
    CASE4_QGEMV=tc timeout 60 python tests/gpu/qgemv_outputs.py save /tmp/so/$v.pt --quick > $OUT/outputs_$v.log 2>&1
    echo "outputs $v rc=$? $(t)"
done
timeout 60 python tests/gpu/qgemv_outputs.py compare /tmp/so/main.pt /tmp/so/new.pt > $OUT/compare.log 2>&1
echo "compare rc=$? $(t): $(tail -2 $OUT/compare.log | tr '\n' ' ')"
QT="--shapes llama2-7b --rows skip --kernel-pdl 3 --quant int4:128,int8:0 --quant-modes dynamic"
for r in $(seq ${ROUNDS:-2}); do for v in main new; do  # ROUNDS=0: no timing
    cp /tmp/so/$v.so custom_kernels/$SO
    timeout 60 python bench/quick_timing.py --out $OUT/qt_${v}_$r $QT > $OUT/qt_${v}_$r.log 2>&1
    echo "== $v round $r rc=$? $(t)"
    grep -E "^llama2-7b|'(int4 G=128|int8 G=4096|int8 G=11008) " $OUT/qt_${v}_$r.log | sed -E "s/'pdl': 3, //" | cut -c1-120
done; done
cp /tmp/so/new.so custom_kernels/$SO
echo "total $(t)"
