# One device call (GPU machine): the official runner (build, pytest -m gpu, JSON report),
# then the user-level runs the issues name, through run_ipc.sh on the cuda backend, and a
# parity check of the cuda backend vs HF transformers. Everything lands in $OUT; the logs
# are packed into one tarball (the device tool returns at most 8 files).
# usage (on the GPU machine):  OUT=dir bash tests/gpu/device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
mkdir -p $OUT/logs $OUT/e2e
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee $OUT/logs/smi.txt
SKIP_BENCH=1 timeout ${GPU_TEST_TIMEOUT:-330} bash tests/run_gpu.sh $OUT/logs > $OUT/logs/run_gpu.log 2>&1
echo "run_gpu rc=$?"; cat $OUT/logs/gpu_tests.json; cp $OUT/logs/gpu_tests.json $OUT/
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/logs/pytest.log | cut -c1-300 | head -20

run() {  # name, then run_ipc.sh arguments
    local name=$1; shift
    echo "== run_ipc.sh $*"
    timeout 240 bash run_ipc.sh "$@" --output-dir $OUT/e2e --run-name $name --quiet > $OUT/logs/$name.log 2>&1
    echo "rc=$?"; tail -4 $OUT/logs/$name.log
}
run none7b synthetic:llama2-7b --backend cuda --graph-mode none --max-tokens 256 --ignore-eos
run exact7b synthetic:llama2-7b --backend cuda --graph-mode exact --precapture 32 --max-tokens 1000 --ignore-eos --trace
run exact7b_calls synthetic:llama2-7b --backend cuda --graph-mode exact --precapture 32 --max-tokens 1000 --ignore-eos --ipc calls
run dyn_dev_smol synthetic:smollm2-135m --backend cuda --graph-mode dynamic --sampling device --max-tokens 1000 --ignore-eos
run exact_smol_trace synthetic:smollm2-135m --backend cuda --graph-mode exact --precapture 16 --max-tokens 1000 --ignore-eos --trace
cp $OUT/e2e/exact7b_trace.png $OUT/ 2>/dev/null
cp $OUT/e2e/exact_smol_trace_trace.png $OUT/ 2>/dev/null
python3 - $OUT/e2e <<'EOF'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*_metrics.json")):
    m = json.load(open(f))
    g = (m.get("server_status") or {}).get("graphs") or {}
    print(f.split("/")[-1], {k: m.get(k) for k in ("decode_tok_s", "ttft_ms", "p50_ms", "p99_ms", "generated", "stop_reason")},
          {k: g.get(k) for k in ("captured", "misses", "live", "capture_ms_p50", "instantiate_ms_p50")})
EOF
echo "== parity: cuda backend vs HF transformers (synthetic smollm2-135m, fp16, step 8)"
timeout 120 python3 scripts/debug_parity_seq8.py --model synthetic:smollm2-135m --backend cuda --dtype float16 2>&1 | tail -4
tar czf $OUT/logs.tgz -C $OUT logs e2e && rm -rf $OUT/logs $OUT/e2e
