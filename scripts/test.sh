#!/usr/bin/env bash
# Install into ./.venv if needed, then run the whole test suite (unit + integration against real servers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
# Two test files at a time (pytest-xdist; each file stays on one worker, with its servers): most tests wait on
# servers starting and worker processes importing torch, which a second file's work fills in. TEST_WORKERS=0: serial.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
