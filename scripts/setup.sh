#!/usr/bin/env bash
# Builds the development environment in .venv: rkort (editable) with the converter and its
# simulator, onnxruntime, the Hugging Face integration and the test tools, from the package index.
# Also, for every other Python a board may run (3.9, 3.10, 3.12) found on this machine, a small
# venv in .venv-board/ with rkort's board runtime path only (no converter), which the tests use.
# Each step's pip output goes to .venv-setup.log; a failing step prints its tail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
LOG=$PWD/.venv-setup.log
: >"$LOG"

step() {
  local what=$1
  shift
  printf '%s ... ' "$what"
  echo "== $what: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    echo ok
  else
    echo "failed; the last lines of $LOG:"
    tail -n 30 "$LOG"
    exit 1
  fi
}

PIP=(.venv/bin/python -m pip --disable-pip-version-check)
C=(-c scripts/constraints.txt)
step "creating .venv with $("$PY" --version 2>&1)" "$PY" -m venv .venv
step "updating pip" "${PIP[@]}" install -U pip
# 1. A CPU build of torch first, so nothing later pulls the toolkit's CUDA torch<=2.4.
step "installing torch 2.13.0 (CPU build)" "${PIP[@]}" install "${C[@]}" torch==2.13.0
# 2. The converter without its declared deps (they pin torch<=2.4), then those deps by hand.
step "installing rknn-toolkit2 2.5.0 (without its pins)" "${PIP[@]}" install --no-deps rknn-toolkit2==2.5.0
step "installing the toolkit's other dependencies" "${PIP[@]}" install "${C[@]}" -r scripts/toolkit-deps.txt
# 3. rkort itself with the optimum integration and the dev tools.
step "installing rkort (editable) with optimum and the test tools" "${PIP[@]}" install "${C[@]}" -e ".[hf,dev]"
step "checking that rkort, the converter and onnxruntime import" \
  .venv/bin/python -c "import rkort, rknn.api, onnxruntime"

# Board Pythons: rkort's core install only (what a board without the converter has).
find_python() { # the interpreter of Python $1 on this machine, if any (pyenv's too)
  if "python$1" -c "" 2>/dev/null; then
    echo "python$1"
  elif command -v pyenv >/dev/null; then
    ls -d "$(pyenv root)/versions/$1".*/bin/"python$1" 2>/dev/null | tail -n 1
  fi
}
for v in 3.9 3.10 3.12; do
  board_py=$(find_python "$v")
  if [ -n "$board_py" ]; then
    step "board runtime venv for Python $v (.venv-board/py$v)" scripts/board-venv.sh "$board_py" ".venv-board/py$v"
  else
    echo "no Python $v here: its board runtime venv is skipped"
  fi
done
echo "rkort $(.venv/bin/python -c 'import rkort; print(rkort.__version__)') is ready in .venv" \
  "(rknn-toolkit2 2.5.0 runs here with torch 2.13.0; pip's notes about its torch<=2.4 pin are in $LOG)"
