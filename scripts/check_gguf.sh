#!/usr/bin/env bash
# GGUF export checked by llama.cpp itself: install llama-cpp-python (once; it builds llama.cpp from source,
# 22 minutes here on 2 cores shared with a benchmark), then run benchmarks/gguf_llamacpp.py (logits and greedy
# tokens against transformers for every family with a GGUF path and the pruned SmolLM2, tokenization, and
# llama.cpp speed of the dense and pruned SmolLM2). Not part of scripts/test.sh: the build alone takes longer
# than the suite, and it checks llama.cpp's side, which changes only when llama-cpp-python is upgraded or the
# export changes.
#
#   bash scripts/check_gguf.sh                       correctness and speed (about half an hour on 2 cores)
#   bash scripts/check_gguf.sh --stages correctness  the checks only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$ROOT"
if ! python -c "import llama_cpp" 2>/dev/null; then
    # A native build on a CPU with AMX (Sapphire Rapids and later) compiles ggml's AMX kernels: llama-cpp-python
    # 0.3.36 built so on such a machine segfaulted in every decode of more than one token, the stock SmolLM2 GGUF
    # included, and an AVX2 build did not (compare ggml-org/llama.cpp#20824). There, build for AVX2; a CMAKE_ARGS
    # of your own is kept, and pip builds afresh rather than reuse a wheel of its cache built natively.
    fresh=()
    if [[ -z "${CMAKE_ARGS:-}" ]] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
        export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        fresh=(--no-cache-dir)
        echo "[nirvana-pl] this CPU has AMX: building llama.cpp with CMAKE_ARGS=\"$CMAKE_ARGS\""
    fi
    echo "[nirvana-pl] installing llama-cpp-python (builds llama.cpp from source: tens of minutes on 2 cores) ..."
    pip install "${fresh[@]}" -c constraints-cpu.txt -e ".[llamacpp]" >"$ROOT/.venv/llamacpp-install.log" 2>&1 ||
        { tail -n 40 "$ROOT/.venv/llamacpp-install.log"; exit 1; }
fi
exec python benchmarks/gguf_llamacpp.py "$@"
