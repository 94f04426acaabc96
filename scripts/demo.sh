#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the end-to-end demo (train, prune mid-fit, recover, export).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$ROOT"
exec python recipes/tiny_demo.py "$@"
