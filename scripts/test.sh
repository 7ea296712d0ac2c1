#!/usr/bin/env bash
# Install into ./.venv if needed, then run the whole test suite (unit + integration against real servers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
exec .venv/bin/python -m pytest -q "$@"
