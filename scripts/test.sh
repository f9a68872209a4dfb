#!/usr/bin/env bash
# The CPU test suite (what CI runs): set up the environment from nothing if needed, then
#   python -m pytest -m "not gpu" -q tests
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k sampler). Arguments that name test files or
# folders (tests/test_serve.py, tests/test_serve.py::test_x) run those alone instead of the whole tests/ folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
targets=(tests)
for a in "$@"; do
    case "$a" in
        -*) ;;
        *) if [ -e "${a%%::*}" ]; then targets=(); fi ;;
    esac
done
exec "$CASE4_PY" -m pytest -m "not gpu" -q "${targets[@]}" "$@"
