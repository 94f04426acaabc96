#!/usr/bin/env bash
# The main job: set up .venv if needed, then prune a real LLM inside its fine-tuning run (offline, CPU).
#
#   bash scripts/demo.sh             SmolLM2-135M fine-tuned on Python's documentation: warm-up, prune
#                                    30% of attention+MLP mid-fit, recover; held-out perplexity of
#                                    dense / just pruned / recovered, pruned model folder, reports.
#                                    (recipes/smollm2_pydoc.yaml; 7 to 20 minutes on 2 CPU cores)
#   bash scripts/demo.sh --tiny ...  the quick demo: a tiny byte-level Llama (recipes/tiny_demo.py,
#                                    2-3 minutes; `--tiny --help` lists its options)
#   bash scripts/demo.sh ARGS...     extra `nirvana-pl fit` options for the SmolLM2 run, e.g.
#                                    --trainer.callbacks.init_args.sparsity 0.4 --trainer.max_steps 80
#   bash scripts/demo.sh --help      this text
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$ROOT"
case "${1:-}" in
    -h|--help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    --tiny)
        shift
        exec python recipes/tiny_demo.py "$@"
        ;;
esac
# The recipe computes in bf16 autocast; on a CPU without native bf16 that is many times slower than fp32.
slow_bf16=$(python -c 'from nirvana_pl.hardware import slow_bf16_message as m; print(m("bf16-mixed", True, "demo") or "")')
if [ -n "$slow_bf16" ]; then
    echo "$slow_bf16" >&2
    echo "demo: so the recipe runs in fp32 here (--trainer.precision 32-true; pass --trainer.precision bf16-mixed" \
         "to keep bf16). Its numbers then differ a little from the bf16 ones in README.md." >&2
    set -- --trainer.precision 32-true "$@"
fi
exec nirvana-pl fit --config recipes/smollm2_pydoc.yaml "$@"
