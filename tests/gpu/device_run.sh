# One device call: the official runner (build, pytest -m gpu, JSON report), the graph/step
# tests again under CASE4_PDL=3, the quick timing, and a short bench/decode.py run.
# usage (on the GPU machine): OUT=dir bash tests/gpu/device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
SKIP_BENCH=1 PYTEST_ARGS="-s" timeout 330 bash tests/run_gpu.sh $OUT > $OUT/run_gpu.log 2>&1
echo "run_gpu rc=$?"; cat $OUT/gpu_tests.json
grep -E "rel err|agreement|greedy identical|stress:|overlapping|^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | cut -c1-300 | head -40
echo "== CASE4_PDL=3 graph + step tests"
CASE4_PDL=3 timeout 120 python -m pytest -m gpu tests/gpu/test_graphs.py tests/gpu/test_step.py -q -x -p no:cacheprovider \
    -k "equal_eager or greedy or stress or dynamic_k or device_sampling" 2>&1 | tail -3
timeout 150 python tests/gpu/quick_timing.py --out $OUT --steps 256 > $OUT/timing.txt 2>&1
grep -A40 "^shape" $OUT/timing.txt || grep "'mode'" $OUT/timing.txt | cut -c1-220
grep "kernel" $OUT/timing.txt | cut -c1-150
tail -3 $OUT/timing.txt | grep -i error
echo "== bench/decode.py --quick"
timeout 170 python bench/decode.py --out $OUT/bench --quick --budget-s 140 > $OUT/bench.txt 2>&1; echo "bench rc=$?"
tail -25 $OUT/bench.txt | cut -c1-250
# at most 8 files come back: drop what gpu_tests.json / the logs above already summarize
rm -f $OUT/pytest.xml $OUT/nvidia-smi.txt $OUT/build.log $OUT/bench/*.png
