#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint (ruff), then run pytest (offline).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$ROOT"
ruff check .
exec python -m pytest "$@"
