#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 interpreter found on this machine and installs glmjax with its test extra.
# The system python3 may be older (jax 0.12 needs 3.12), so look for one explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local cands=("${PYTHON:-}" python3.13 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | sort -rV); do cands+=("$(pyenv root)/versions/$v/bin/python"); done
  fi
  for d in /root/.pyenv/versions/*/bin/python /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do cands+=("$d"); done
  cands+=(python3)
  for p in "${cands[@]}"; do
    [ -n "$p" ] || continue
    command -v "$p" >/dev/null 2>&1 || [ -x "$p" ] || continue
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "setup: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "setup: using $PY ($("$PY" --version))"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
