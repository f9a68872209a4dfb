# The prepared next step for issue 26 (sessions 28-29, performance entries 51-52), for one device call (~7 min on an
# H100; the repo root of a device copy of main at 421b8de or later; the patch was regenerated for that tree):
#   OUT=dir bash docs/experiments/qgemv-tc-next.sh
# 1. main, clean default build: 7B int4 G128 / int8 rows (auto), and int8 under CASE4_QGEMV=tc (session 29 measured
#    it at 3.013 against the fp32 kernel's 2.993 ms, entry 52);
# 2. ncu of the int8 QKV launch, fp32 kernel and tensor-core kernel (why tc's int8 streams at ~2.2 TB/s where the
#    fp32 kernel reaches 2.6 on gate|up and lm_head), and of the int4 QKV launch (tensor-core kernel) with the
#    scheduler and warp-state sections: entry 52 ruled out the prologue's waits and the L2 look-ahead, so is the
#    int4 kernel issue-bound (~1,700 instructions a warp, 32 warps a SM: 6.9 us of issue at 4 a cycle for a
#    14 us launch)?
# 3. qgemv-tc-branchless.patch applied and rebuilt: the same rows, then every test of tests/gpu/test_quant_kernels.py
#    (the real-GGUF one needs the gguf package and the built-in GGUF on PYTHONPATH).
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
unset CASE4_CUDA_ARCHS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
build() { (cd custom_kernels && rm -rf build *.so && python setup.py build_ext --inplace > $OUT/build_$1.log 2>&1) || { tail -20 $OUT/build_$1.log; exit 1; }; }
rows() { grep -E "^\{'kernel': 'int|^llama2|copy GB" $1 | grep -v "G=32" | sed -E "s/, 'bytes': [0-9]+//; s/'pdl': 3, //; s/'kernel': //" | cut -c1-120; }
QT="--shapes llama2-7b --rows skip --kernel-pdl 3 --quant int4:128,int8:0 --quant-modes dynamic"
build main
for k in auto tc; do CASE4_QGEMV=$k timeout 120 python bench/quick_timing.py --out $OUT/qt_main_$k $QT > $OUT/qt_main_$k.log 2>&1; echo "== main $k rc=$?"; rows $OUT/qt_main_$k.log; done
cat > /tmp/one_q8.py <<'PY'
import math, sys, torch
sys.path.insert(0, ".")
from custom_kernels.ext import load_extension
from server.model.quant import empty_quant, random_quant
N, K, gm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ext = load_extension()
g = torch.Generator(device="cuda").manual_seed(0)
qls = [random_quant(empty_quant((2 if gm == 2 else 1) * N, K, "int8", K, "cuda"), 1 / math.sqrt(K), g) for _ in range(3)]
x, nw = torch.randn(K, device="cuda").half(), torch.ones(K, device="cuda").half()
out = torch.zeros(N, device="cuda", dtype=torch.float16)
for ql in qls:
    ext.qgemv(ql.q.data_ptr(), ql.scale.data_ptr(), 0, 8, ql.group, N, K, x.data_ptr(), nw.data_ptr(), 1e-5,
              out.data_ptr(), gm, 0, torch.cuda.current_stream().cuda_stream, 1, 132 * 4, pdl=1)
torch.cuda.synchronize()
PY
for k in f32 tc; do
  CASE4_QGEMV=$k timeout 100 ncu --kernel-name regex:qgemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis python /tmp/one_q8.py 12288 4096 0 > $OUT/ncu_int8_$k.txt 2>&1
  echo "== ncu int8 QKV $k: $(grep -E "Duration|DRAM Throughput|Achieved Occupancy|Registers Per" $OUT/ncu_int8_$k.txt | tr -s ' ' | tr '\n' ';' | cut -c1-300)"
done
sed -i 's/"int8", K, "cuda")/MODE, G, "cuda")/; s/, 0, 8, ql.group,/, QP, 8 if MODE == "int8" else 4, ql.group,/' /tmp/one_q8.py
sed -i 's/^N, K, gm = .*/&\nMODE, G = sys.argv[4], int(sys.argv[5])/' /tmp/one_q8.py
sed -i 's/^for ql in qls:/&\n    QP = ql.minv.data_ptr() if ql.minv is not None else 0/' /tmp/one_q8.py
CASE4_QGEMV=tc timeout 100 ncu --kernel-name regex:qgemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
  --section SchedulerStats --section WarpStateStats --section InstructionStats python /tmp/one_q8.py 12288 4096 0 int4 128 > $OUT/ncu_int4_tc.txt 2>&1
echo "== ncu int4 QKV tc: $(grep -E "Duration|DRAM Throughput|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued" $OUT/ncu_int4_tc.txt | tr -s ' ' | tr '\n' ';' | cut -c1-400)"
git apply docs/experiments/qgemv-tc-branchless.patch || { echo "patch does not apply"; exit 1; }
build branchless
for k in auto tc; do CASE4_QGEMV=$k timeout 120 python bench/quick_timing.py --out $OUT/qt_bl_$k $QT > $OUT/qt_bl_$k.log 2>&1; echo "== branchless $k rc=$?"; rows $OUT/qt_bl_$k.log; done
timeout 300 python -m pytest -q -m gpu -rs -p no:cacheprovider tests/gpu/test_quant_kernels.py > $OUT/bl_tests.log 2>&1
echo "== branchless tests rc=$?: $(tail -1 $OUT/bl_tests.log)"; grep -E "^(FAILED|ERROR|SKIPPED)" $OUT/bl_tests.log | head -5 | cut -c1-200
