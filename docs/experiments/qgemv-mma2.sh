# Where the tensor-core quantized gemv's time goes (performance entry 48's open question), for a GPU call:
#   OUT=dir bash docs/experiments/qgemv-mma2.sh      (repo root of a device copy at 22e45e3 or later; ~4 min on an H100)
# Applies qgemv-mma2.patch to this copy (CASE4_QGEMV=mma next to the default fp32 kernel), builds, times the 7B
# decode rows and the per-kernel rows of both kernels, then ncu's speed-of-light, occupancy, scheduler and warp-state
# sections for one QKV launch (7B shape, int4 G128 and int8 per row) of each.
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
git apply docs/experiments/qgemv-mma2.patch || { echo "patch does not apply"; exit 1; }
(cd custom_kernels && python setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -20 $OUT/build.log; exit 1; }
for k in mma f32; do
  CASE4_QGEMV=$k timeout 150 python bench/quick_timing.py --out $OUT/qt_$k --shapes llama2-7b --rows skip \
    --kernel-pdl 3 --quant int4:128,int8:0 --quant-modes dynamic > $OUT/qt_$k.log 2>&1
  echo "== $k"; grep -E "^\{'kernel'|^llama2|copy" $OUT/qt_$k.log | cut -c1-160
done
cat > /tmp/one_qkv.py <<'PY'
import math, sys, torch
sys.path.insert(0, ".")
from custom_kernels.ext import load_extension
from server.model.quant import empty_quant, random_quant
mode, N, K = sys.argv[1], 12288, 4096
ext = load_extension()
g = torch.Generator(device="cuda").manual_seed(0)
ql = random_quant(empty_quant(N, K, mode, 128 if mode == "int4" else K, "cuda"), 1 / math.sqrt(K), g)
x, nw = torch.randn(K, device="cuda").half(), torch.ones(K, device="cuda").half()
out = torch.zeros(N, device="cuda", dtype=torch.float16)
for _ in range(3):  # the third launch is the profiled one (--launch-skip 2)
    ext.qgemv(ql.q.data_ptr(), ql.scale.data_ptr(), ql.minv.data_ptr() if ql.minv is not None else 0,
              4 if mode == "int4" else 8, ql.group, N, K, x.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(), 0, 0,
              torch.cuda.current_stream().cuda_stream, 1, 132 * 4, pdl=1)
torch.cuda.synchronize()
PY
for k in mma f32; do for m in int4 int8; do
  echo "== ncu $k $m"
  CASE4_QGEMV=$k timeout 120 ncu --kernel-name regex:qgemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
    python /tmp/one_qkv.py $m > $OUT/ncu_${k}_$m.log 2>&1
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Eligible Warps|Stall|Warp Cycles Per Issued" $OUT/ncu_${k}_$m.log | head -20
done; done
