#!/usr/bin/env bash
# Create ./.venv with Python >= 3.12 (llama-stack 0.7 needs it) and install the package with its test and ray extras.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  # pyenv installs (the bare python3.12 shim fails unless pyenv is told which version to use)
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V); do
      prefix=$(pyenv prefix "$version" 2>/dev/null) && [ -x "$prefix/bin/python3" ] && { echo "$prefix/bin/python3"; return; }
    done
  fi
  echo "no Python >= 3.12 found; set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[test,ray]"
.venv/bin/python - <<'PY'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("llama-stack", "llama-stack-client", "trl", "transformers", "peft", "datasets", "torch", "ray")))
PY
