#!/usr/bin/env bash
# scripts/board-venv.sh PYTHON DIR: a venv with rkort's core install (onnxruntime, onnx, numpy, ...)
# and nothing of the converter: what a board runs. rkort is installed (editable) from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
"$1" -m venv --clear "$2"
"$2/bin/python" -m pip --disable-pip-version-check install -q -U pip
"$2/bin/python" -m pip --disable-pip-version-check install -q -e .
