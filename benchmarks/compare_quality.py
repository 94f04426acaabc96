"""Compare the zero-shot results of two runs of ``benchmarks/quality.py`` (e.g. before and after a refactor).

    python benchmarks/compare_quality.py OLD.json NEW.json [--out benchmarks/results/zero_shot_compare.md]

For every zero-shot cell present in both files (estimator | gamma | sparsity): whether the plans are the same
(plan fingerprint) and whether every perplexity is the same float; also the dense and warm-up numbers. Prints a
markdown report and writes it to ``--out`` when given. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(old: dict, new: dict) -> tuple[list[str], bool]:
    """Markdown lines of the comparison, and whether everything compared is identical."""
    zo, zn = old.get("zero_shot", {}), new.get("zero_shot", {})
    keys = [k for k in zo if k in zn]
    rows, same = [], True
    for key in keys:
        a, b = zo[key], zn[key]
        plan = a.get("fingerprint") == b.get("fingerprint")
        ppl = a.get("ppl") == b.get("ppl")
        same &= plan and ppl
        shown = ", ".join(f"{d} {b['ppl'][d]:.4f}" for d in sorted(b.get("ppl") or {}))
        cell = key.replace("|", " / ")  # (a pipe would split the table's cell)
        rows.append(f"| {cell} | {'same' if plan else 'DIFFERENT'} | {'same' if ppl else 'DIFFERENT'} | {shown} |")
    dense = old.get("dense") == new.get("dense")
    warmup = (old.get("warmup") or {}).get("losses") == (new.get("warmup") or {}).get("losses")
    same &= dense and warmup
    lines = [
        "# Zero-shot results, two runs compared",
        "",
        f"Cells compared: {len(keys)} (only in the first run: {len(set(zo) - set(zn))}, only in the second: "
        f"{len(set(zn) - set(zo))}); identical plan and perplexities: "
        f"{sum(r.count('| same | same |') for r in rows)}. Dense perplexities {'identical' if dense else 'DIFFER'}; "
        f"warm-up losses {'identical' if warmup else 'DIFFER'}.",
        "",
        "| cell (estimator, gamma, sparsity) | plan fingerprint | perplexities | perplexities (second run) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    return lines, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines, same = compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()))
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
