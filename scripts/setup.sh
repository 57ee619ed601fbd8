#!/usr/bin/env bash
# Create the project's virtual environment with Python 3.12 and install the pinned dependencies.
# Usage: bash scripts/setup.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.venv}
find_python() {
  for cand in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python /usr/bin/python3.12 /usr/local/bin/python3.12 python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 12) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}
if ! py=$(find_python); then
  cat >&2 <<'MSG'
error: Python >= 3.12 not found (megatron-core 0.19 needs it).
  fix: install one (e.g. `pyenv install 3.12`, `apt-get install python3.12-venv`, or `uv python install 3.12`)
       and re-run, or point PYTHON at it: `make setup PYTHON=/path/to/python3.12`
MSG
  exit 2
fi
echo "[setup] using $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip uv
echo "[setup] installing pinned dependencies into $venv"
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" -q --compile-bytecode -e ".[test,quant]"
echo "[setup] applying the patches whose rule matches this machine (patches/rules.toml)"
"$venv/bin/python" -m qnext.patches apply
echo "[setup] done: activate with 'source $venv/bin/activate'"
