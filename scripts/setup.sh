#!/usr/bin/env bash
# Create .venv with Starmesh and its dev tools. Idempotent; safe to run again.
# torch is pinned to the CPU wheel first so that the range in pyproject.toml is already
# satisfied (an unpinned install would pull a multi-GB CUDA build). Users with GPUs
# install their own CUDA build of torch before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
