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
exec nirvana-pl fit --config recipes/smollm2_pydoc.yaml "$@"
