#!/usr/bin/env bash
# GPU runner: build the extension, run `pytest -m gpu`, write a JSON report and logs into
# OUTDIR, then run the decode benchmark if it exists.   usage: bash tests/run_gpu.sh OUTDIR
set -o pipefail
OUT=${1:?usage: bash tests/run_gpu.sh OUTDIR}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== build" | tee "$OUT/build.log"
(cd custom_kernels && $PY setup.py build_ext --inplace) >> "$OUT/build.log" 2>&1
build_rc=$?
tail -3 "$OUT/build.log"
echo "== pytest -m gpu"
# built just above: a failed build must fail the tests (tests/gpu/conftest.py), not be retried by them
CASE4_BUILD_EXT=0 $PY -m pytest -m gpu tests/gpu -q -rs --durations=15 --junitxml="$OUT/pytest.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
test_rc=$?
$PY - "$OUT" "$build_rc" "$test_rc" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
out, build_rc, test_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"build_rc": build_rc, "pytest_rc": test_rc}
try:
    root = ET.parse(f"{out}/pytest.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    for k in ("tests", "failures", "errors", "skipped", "time"):
        summary[k] = float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0))
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:  # noqa: BLE001
    summary["report_error"] = str(e)
try:
    import torch
    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception:  # noqa: BLE001
    pass
json.dump(summary, open(f"{out}/gpu_tests.json", "w"), indent=2)
print(json.dumps(summary))
PYEOF
if [ -f bench/decode.py ] && [ -z "${SKIP_BENCH:-}" ]; then
    echo "== bench/decode.py"
    $PY bench/decode.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
exit $(( build_rc != 0 ? build_rc : test_rc ))
