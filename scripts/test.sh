#!/usr/bin/env bash
# Set up .venv and run every check CI runs: ruff, mypy (strict), then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check protocol discovery node simulations tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
