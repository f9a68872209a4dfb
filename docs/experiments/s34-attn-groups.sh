# Prepared in session 34, not run (its device time ran out: the machine would not start again after entry 59's 70B
# ablation and timeline). Entry 59's timeline put 70B's attention at 20.3 us a layer at T = 32 (~1.6 ms of a 19.1 ms
# int4 token; step_skip=2 saved 1.95 ms): groups of more than 4 (70B: 64 query heads over 8 KV heads) take one block
# per KV head, 8 blocks of 8 heads. docs/experiments/attn-group-heads.patch adds EngineOptions.attn_group_heads (query
# heads a block for such groups: the largest divisor of the group up to it; 8, the default, is the old rule) and its
# kernel tests (test_attention_group_heads: 16/2, 64/8 and 28/4 heads against float64, group_heads 1, 2, 4). One call,
# one prebuilt extension: the new kernel tests; 70B int4 G128 rows (dynamic graph, device greedy, 256 steps) for 8, 1,
# 2, 4 and 8 again; timelines at T = 32 and 2000 for 8, 1 and 2. A default other than 8 needs both: the rows faster and
# T = 2000 not slower (the per-head blocks read a KV head's rows G times, mostly from L2).
#   here:   bash bench/prebuild_device_ext.sh .dev/c/grp HEAD docs/experiments/attn-group-heads.patch &&
#           xz -c .dev/c/grp/*.so > .dev/cx/grp.so.xz;  git apply docs/experiments/attn-group-heads.patch (its test)
#   device: OUT=$OUT bash docs/experiments/s34-attn-groups.sh     (carry .dev/cx/grp.so.xz)   ~3-4 min on an H100
. "$(dirname "$0")/device_env.sh"
xz -dc .dev/cx/grp.so.xz > custom_kernels/$SO || exit 3
timeout 150 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu/test_kernels.py -k attention \
    > $OUT/attn_tests.log 2>&1
echo "attention tests rc=$? $(t): $(tail -1 $OUT/attn_tests.log)"; grep -E "^(FAILED|ERROR|SKIPPED)" $OUT/attn_tests.log | head
G=attn_group_heads
timeout 150 python bench/quick_timing.py --out $OUT/qt70 --shapes llama2-70b --rows skip --kernel-pdl '' \
    --quant int4:128 --quant-modes dynamic --quant-options default,$G=1,$G=2,$G=4,default > $OUT/qt70.log 2>&1
echo "70B rows rc=$? $(t)"; grep -E "^llama2-70b|copy GB" $OUT/qt70.log | cut -c1-200
timeout 150 python bench/quick_timing.py --out $OUT/tl70 --shapes llama2-70b --rows skip --timeline llama2-70b \
    --timeline-quant int4:128 --timeline-prompts 32,2000 --max-seq 4096 --options default,$G=1,$G=2 > $OUT/tl70.log 2>&1
echo "70B timelines rc=$? $(t)"; grep -E "^== timeline|^attention" $OUT/tl70.log | cut -c1-200
