#!/usr/bin/env bash
# The README's demo, end to end: install into ./.venv, build the tiny model, start the server,
# register test_dpo_data.json, train with the seed's DPO request, show progress and the artifacts,
# then train a job that visibly learns and say where its curves picture is.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
