#!/usr/bin/env bash
# GGUF export checked by llama.cpp itself: install llama-cpp-python (once; it builds llama.cpp from source,
# about 8 minutes on 2 cores), then run benchmarks/gguf_llamacpp.py (logits and greedy tokens against
# transformers for every family with a GGUF path and the pruned SmolLM2, tokenization, and llama.cpp speed of
# the dense and pruned SmolLM2). Not part of scripts/test.sh: the build alone would take half the suite's time,
# and it checks llama.cpp's side, which changes only when llama-cpp-python is upgraded or the export changes.
#
#   bash scripts/check_gguf.sh                       correctness and speed (about 20 minutes on 2 cores)
#   bash scripts/check_gguf.sh --stages correctness  the checks only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$ROOT"
if ! python -c "import llama_cpp" 2>/dev/null; then
    echo "[nirvana-pl] installing llama-cpp-python (builds llama.cpp from source, about 8 minutes) ..."
    pip install -c constraints-cpu.txt -e ".[llamacpp]" >"$ROOT/.venv/llamacpp-install.log" 2>&1 ||
        { tail -n 40 "$ROOT/.venv/llamacpp-install.log"; exit 1; }
fi
exec python benchmarks/gguf_llamacpp.py "$@"
