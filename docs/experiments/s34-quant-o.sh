# Prepared in session 34, not run (no device time left). docs/experiments/quant-o-fusion.patch: the quantized step's
# O projection inside attention, as the fp16 step's (attn_o_parts > 0: H <= 1024, so SmolLM2 and the built-in GGUF, not
# 7B), on by default with EngineOptions.o_in_attention: attention's o_tail reads the quantized W_o (int4 word or int8
# pair, the group's scale and minimum, before the wait) through a per-layer descriptor (AttnKArgs' ctx union), and the
# quantized gate|up and down gemvs take the O sum and the residual as gemv.cu's do (QGemvArgs at exactly 128 bytes).
# Compiled on the CPU machine (ptxas: the new D = 64 tails 124 registers, no spill; D = 128 12 bytes spilled, the fp16
# fused kernel 24), its GPU tests written (test_quant_o_fused_matches_o_qgemv: fused against O as its own qgemv, int4
# G32/G64 and int8 per row/G32 on SmolLM2's shape at T = 700, eager, exact and dynamic, graphs bitwise equal eager, one
# launch a layer fewer; test_quant_o_fused_mixed_dense). Expected (performance.md "SmolLM2's own GGUF"): ~0.42 -> ~0.37 ms.
#   here:   git apply docs/experiments/quant-o-fusion.patch     (kernels, tests, kernels.md)
#           bash bench/prebuild_device_ext.sh .dev/c/qof HEAD docs/experiments/quant-o-fusion.patch &&
#           xz -c .dev/c/qof/*.so > .dev/cx/qof.so.xz       (before the apply, or with HEAD~0 after a commit of it)
#   device: OUT=$OUT bash docs/experiments/s34-quant-o.sh    (carry .dev/cx/qof.so.xz; the real-GGUF test also needs
#           the built-in GGUF: tests/gpu/two_calls.sh's A/B carry, /tmp/gg)   ~4 min on an H100
. "$(dirname "$0")/device_env.sh"
export PYTHONPATH=/tmp/gg/site${PYTHONPATH:+:$PYTHONPATH}
xz -dc .dev/cx/qof.so.xz > custom_kernels/$SO || exit 3
PT="python -m pytest -m gpu -q -rs -p no:cacheprovider"
timeout 300 $PT tests/gpu/test_quant_kernels.py -k "not opt_in" > $OUT/quant.log 2>&1 & p1=$!
timeout 300 $PT tests/gpu/test_step.py tests/gpu/test_kernels.py > $OUT/step.log 2>&1 & p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
echo "quant rc=$r1, step+kernels rc=$r2 $(t): $(tail -1 $OUT/quant.log) | $(tail -1 $OUT/step.log)"
grep -hE "^(FAILED|ERROR|SKIPPED)" $OUT/quant.log $OUT/step.log | cut -c1-250 | head -12
O=o_in_attention
timeout 120 python bench/quick_timing.py --out $OUT/qt --shapes smollm2-135m --rows skip --kernel-pdl '' \
    --quant int4:32,int8:0 --quant-modes dynamic --quant-options default,$O=0,default,$O=0 > $OUT/qt.log 2>&1
echo "SmolLM2 rows rc=$? $(t)"; grep -E "^smollm2|copy GB" $OUT/qt.log | cut -c1-200
timeout 90 python bench/quick_timing.py --out $OUT/tl --shapes smollm2-135m --rows skip --timeline smollm2-135m \
    --timeline-quant int4:32 --options default,$O=0 > $OUT/tl.log 2>&1
echo "SmolLM2 timelines rc=$? $(t)"; grep -E "^== timeline|^attention|^qgemv" $OUT/tl.log | cut -c1-200
