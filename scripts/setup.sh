#!/usr/bin/env bash
# Builds the development environment in .venv: rkort (editable) with the converter and its
# simulator, onnxruntime, the Hugging Face integration and the test tools, from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip
C=(-c scripts/constraints.txt)
# 1. A CPU build of torch first, so nothing later pulls the toolkit's CUDA torch<=2.4.
"${PIP[@]}" install "${C[@]}" torch==2.13.0
# 2. The converter without its declared deps, then those deps by hand.
"${PIP[@]}" install --no-deps rknn-toolkit2==2.5.0
"${PIP[@]}" install "${C[@]}" -r scripts/toolkit-deps.txt
# 3. rkort itself with the optimum integration and the dev tools.
"${PIP[@]}" install "${C[@]}" -e ".[hf,dev]"
.venv/bin/python -c "import rkort, rknn.api, onnxruntime; print('rkort', rkort.__version__, 'ready in .venv')"
