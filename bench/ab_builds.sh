#!/usr/bin/env bash
# One device call that checks a change of the decode path against the build before it (GPU machine):
#   1. this tree from clean with the default flags, built by its first run (`bash run_ipc.sh` must take the
#      cuda backend with no manual step), while a baseline tree (BASELINE: a tarball of an earlier commit,
#      `git archive C | gzip`) builds beside it;
#   2. `pytest -m gpu` on this tree (counts of passed / failed / skipped in the log);
#   3. bench/quick_timing.py on both builds in alternation (ROUNDS), then each decode row's ms/token side by
#      side and whether the two builds produced the same greedy tokens.
# usage: OUT=dir BASELINE=base.tar.gz [BASE_ARCHS=90a] [ROWS=dynamic:custom:3,exact:custom:3]
#        [SHAPES=smollm2-135m,llama2-7b] [ROUNDS=1] [TESTS=1] bash bench/ab_builds.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
unset CASE4_CUDA_ARCHS
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
L=$OUT/logs; mkdir -p "$L"
ROWS=${ROWS:-dynamic:custom:3,exact:custom:3}
SHAPES=${SHAPES:-smollm2-135m,llama2-7b}
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv | tee "$L/smi.txt"

QT_BASE=
if [ -n "${BASELINE:-}" ]; then
    rm -rf /tmp/base && mkdir -p /tmp/base && tar xzf "$BASELINE" -C /tmp/base
    QT_BASE=$(ls /tmp/base/bench/quick_timing.py /tmp/base/tests/gpu/quick_timing.py 2>/dev/null | head -1)
    sed -i 's/toks = r.pop("tokens")$/toks = r.get("tokens")/' "$QT_BASE"  # older versions dropped the tokens
    # older trees' default arch list did not build (sm_80 PTX): the baseline builds for BASE_ARCHS
    (cd /tmp/base/custom_kernels && CASE4_CUDA_ARCHS=${BASE_ARCHS:-90a} python setup.py build_ext --inplace) \
        > "$L/build_base.log" 2>&1 &
    BASE_PID=$!
fi

rm -rf custom_kernels/build custom_kernels/_case4_cuda*.so
timeout 420 bash run_ipc.sh synthetic:smollm2-135m --prompt-len 16 --max-tokens 32 --ignore-eos --quiet \
    --output-dir "$L/first" --run-name first > "$L/first_run.log" 2>&1
echo "first run rc=$? at $(el)"; grep -iE "build|backend|error" "$L/first_run.log" | cut -c1-200 | head -6

if [ "${TESTS:-1}" = 1 ]; then
    CASE4_BUILD_EXT=0 timeout "${GPU_TEST_TIMEOUT:-330}" python -m pytest -m gpu tests/gpu -q -rs --durations=10 \
        --junitxml="$L/pytest.xml" > "$L/pytest.log" 2>&1
    echo "pytest rc=$? at $(el)"; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$L/pytest.log" | cut -c1-250 | tail -15
fi
if [ -n "${BASE_PID:-}" ]; then
    wait "$BASE_PID"; echo "baseline build rc=$? at $(el)"
fi

for r in $(seq "${ROUNDS:-1}"); do
    if [ -n "$QT_BASE" ]; then
        (cd /tmp/base && python "$QT_BASE" --out "$L/base$r" --kernel-pdl "" --steps 256 --rows "$ROWS" \
            --shapes "$SHAPES") > "$L/timing_base$r.log" 2>&1
    fi
    python bench/quick_timing.py --out "$L/new$r" --kernel-pdl "" --steps 256 --rows "$ROWS" --shapes "$SHAPES" \
        > "$L/timing_new$r.log" 2>&1
    echo "round $r done at $(el)"
done

python - "$L" "${ROUNDS:-1}" <<'EOF' | tee "$L/ab.txt"
import json, sys
from pathlib import Path
L, rounds = Path(sys.argv[1]), int(sys.argv[2])
def rows(p):
    try:
        d = json.loads(p.read_text())
    except Exception as e:
        return None, {}
    return d.get("device"), {(r["shape"], r["mode"], r.get("options", "default")): r for r in d["decode"]}
print(f"{'round':5s} {'shape':14s} {'mode':8s} {'base ms':>8s} {'new ms':>8s} {'new/base':>8s} tokens-equal")
for i in range(1, rounds + 1):
    dev_b, b = rows(L / f"base{i}" / "quick_timing.json")
    dev_n, n = rows(L / f"new{i}" / "quick_timing.json")
    for k, rn in n.items():
        rb = b.get(k, {})
        mb, mn = rb.get("ms_per_token"), rn.get("ms_per_token")
        ratio = f"{mn / mb:8.4f}" if mb and mn else "       -"
        same = rb.get("tokens") == rn.get("tokens") if rb.get("tokens") and rn.get("tokens") else None
        print(f"{i:<5d} {k[0]:14s} {k[1]:8s} {mb or 0:8.4f} {mn or 0:8.4f} {ratio} {same}  {rn.get('error', '')}")
    print(f"device: base {dev_b}, new {dev_n}")
EOF
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
echo "total $(el)"
