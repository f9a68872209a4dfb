# Ran in session 28 (performance entry 50): dequant rate +2 %, the 512-token int4 TTFT unchanged (1.317x -> 1.327x): rejected.
# The prefill's dequantization without integer divisions (dequant-magic.patch, session 27, performance entry 49:
# compiled, the division identity checked on the CPU over 21 M cases, not yet run on a GPU), for one device call
# (~4 min on an H100; the repo root of a device copy of main at 89bd93e or later, built):
#   OUT=dir bash docs/experiments/dequant-magic.sh
# main's kernel first (its rate and the int4 512-token TTFT A/B against fp16), then the patch: the bitwise test
# against the layout's dequantization, the same rate and TTFT rows. Issue 26's TTFT target: int4 <= 1.3x fp16.
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 CASE4_BUILD_EXT=0
unset CASE4_CUDA_ARCHS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_rows() {  # $1: label
  timeout 90 python bench/dequant_rate.py --out $OUT/dq_$1.json > $OUT/dq_$1.log 2>&1; echo "dequant_rate $1 rc=$?"
  python -c "import json; d=json.load(open('$OUT/dq_$1.json'))['summary']; print(' ', {k: v['of_copy'] for k, v in d['per_layer_set'].items()})"
  timeout 150 python bench/ttft_ab.py --quant int4:128 --repeats 7 > $OUT/ttft_$1.log 2>&1; echo "ttft_ab $1 rc=$?"; tail -4 $OUT/ttft_$1.log
}
(cd custom_kernels && python setup.py build_ext --inplace > $OUT/build_main.log 2>&1) || { tail -20 $OUT/build_main.log; exit 1; }
run_rows main
git apply docs/experiments/dequant-magic.patch || { echo "patch does not apply"; exit 1; }
(cd custom_kernels && python setup.py build_ext --inplace > $OUT/build_magic.log 2>&1) || { tail -20 $OUT/build_magic.log; exit 1; }
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider -k "dequant or prefill_dequant" tests/gpu/test_quant_kernels.py > $OUT/dq_tests.log 2>&1
echo "dequant tests rc=$?: $(tail -1 $OUT/dq_tests.log)"
run_rows magic
