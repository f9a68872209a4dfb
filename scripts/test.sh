#!/usr/bin/env bash
# The CPU test suite (what CI runs): set up the environment from nothing if needed, then
#   python -m pytest -m "not gpu" -q tests
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k sampler).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
exec "$CASE4_PY" -m pytest -m "not gpu" -q tests "$@"
