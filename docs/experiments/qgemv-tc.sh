# Ran in session 28 (performance entry 50, against main 29a7c5c, the only tree it applies to): tc landed as the int4 default.
# The tensor-core quantized gemv of session 27 (performance entry 49: designed and compiled, not yet run on a GPU),
# for one device call (~7 min on an H100: build ~80 s, rows ~90 s, tests ~150 s, ncu ~90 s; the repo root of a device
# copy of main at 89bd93e or later):
#   OUT=dir bash docs/experiments/qgemv-tc.sh
# Applies qgemv-tc.patch (CASE4_QGEMV=tc and tcb next to the default fp32 kernel, the fp32 kernel's group index
# without an integer division, the opt-in float64 test for tc and tcb), builds with default flags, prints the SASS
# counts of the int4 QKV instance, takes the 7B per-kernel and decode rows of f32, tc and tcb (one process each),
# runs tc and tcb through every test of tests/gpu/test_quant_kernels.py (the real-GGUF test too where the gguf
# package and the built-in GGUF are on PYTHONPATH), then ncu raw metrics of one QKV and one down launch of each.
# CPU check done before it: qgemv-tc-simulate.py (the whole kernel, its operand mapping included, lane by lane, on
# small shapes).
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
unset CASE4_CUDA_ARCHS
git apply docs/experiments/qgemv-tc.patch || { echo "patch does not apply"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
(cd custom_kernels && python setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -20 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
SO=$(ls custom_kernels/*.so | head -1)
for f in "ILi0ELb1ELi4ELb0E tc" "ILi0ELb1ELi4ELb1E tcb"; do set -- $f
  cuobjdump -sass -fun "_ZN5case415qgemv_tc_kernel${1}EEvNS_9QGemvArgsE" $SO > /tmp/$2.sass 2>&1
  echo "SASS $2 (QKV int4): $(grep -cE '^\s+/\*[0-9a-f]{4}\*/' /tmp/$2.sass) instructions; HMMA $(grep -c HMMA /tmp/$2.sass), LDG $(grep -c LDG /tmp/$2.sass), LDS $(grep -c LDS /tmp/$2.sass), LOP3 $(grep -c LOP3 /tmp/$2.sass), HADD2/HFMA2 $(grep -cE 'HADD2|HFMA2' /tmp/$2.sass)"
done
for k in f32 tc tcb; do
  CASE4_QGEMV=$k timeout 100 python bench/quick_timing.py --out $OUT/qt_$k --shapes llama2-7b --rows skip \
    --kernel-pdl 3 --quant int4:128,int8:0 --quant-modes dynamic > $OUT/qt_$k.log 2>&1
  echo "== $k rc=$?"; grep -E "^\{'kernel': 'int|^llama2" $OUT/qt_$k.log | grep -v "G=32" | sed -E "s/, 'bytes': [0-9]+//; s/'pdl': 3, //; s/'kernel': //" | cut -c1-100
done
t0=$(date +%s)
for k in tc tcb; do
  CASE4_QGEMV=$k timeout 300 python -m pytest -q -m gpu -rs -p no:cacheprovider -k "not opt_in_kernel and not variants_bitwise" tests/gpu/test_quant_kernels.py > $OUT/${k}_tests.log 2>&1 &
done
wait
echo "tests $(( $(date +%s) - t0 )) s"
for k in tc tcb; do echo "== $k: $(grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" $OUT/${k}_tests.log | cut -c1-300 | head -6)"; done
cat > /tmp/one_q.py <<'PY'
import math, sys, torch
sys.path.insert(0, ".")
from custom_kernels.ext import load_extension
from server.model.quant import empty_quant, random_quant
mode, N, K, gm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ext = load_extension()
g = torch.Generator(device="cuda").manual_seed(0)
qls = [random_quant(empty_quant((2 if gm == 2 else 1) * N, K, mode, 128 if mode == "int4" else K, "cuda"),
                    1 / math.sqrt(K), g) for _ in range(3)]
x, nw = torch.randn(K, device="cuda").half(), torch.ones(K, device="cuda").half()
out = torch.zeros(N, device="cuda", dtype=torch.float32 if gm == 3 else torch.float16)
for ql in qls:  # the third launch is the profiled one
    ext.qgemv(ql.q.data_ptr(), ql.scale.data_ptr(), ql.minv.data_ptr() if ql.minv is not None else 0,
              4 if mode == "int4" else 8, ql.group, N, K, x.data_ptr(), nw.data_ptr() if gm in (0, 2, 3) else 0, 1e-5,
              out.data_ptr(), gm, 0, torch.cuda.current_stream().cuda_stream, 1, 132 * 4, pdl=1)
torch.cuda.synchronize()
PY
M=gpu__time_duration.avg,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,launch__grid_size,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__warps_active.avg.per_cycle_active,smsp__warps_eligible.avg.per_cycle_active,sm__cycles_active.avg,sm__cycles_active.max
for r in long_scoreboard short_scoreboard wait math_pipe_throttle barrier lg_throttle mio_throttle not_selected; do
  M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio; done
for k in f32 tc tcb; do for shp in "12288 4096 0 qkv" "4096 11008 1 down"; do set -- $shp
  CASE4_QGEMV=$k timeout 100 ncu --kernel-name regex:qgemv --launch-skip 2 --launch-count 1 --csv --page raw --metrics $M \
    python /tmp/one_q.py int4 $1 $2 $3 > $OUT/ncu_${k}_$4.csv 2>&1
  python - $OUT/ncu_${k}_$4.csv $k $4 <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if len(rows) < 3: print(sys.argv[2], sys.argv[3], "no ncu rows"); sys.exit()
d = dict(zip(rows[0], rows[-1]))
print(f"ncu {sys.argv[2]} {sys.argv[3]}: " + " ".join(f"{k.split('__')[-1].replace('_per_issue_active.ratio','')}={v}" for k, v in d.items() if "__" in k))
PY
done; done
