"""``python -m nirvana_pl.arch``: print the table of supported architectures; ``--readme README.md`` writes it into
that file between its ``<!-- architectures-table -->`` markers (a test checks the README against the registry)."""

import argparse
from pathlib import Path

from . import architectures_table

START, END = "<!-- architectures-table -->\n", "<!-- /architectures-table -->"

parser = argparse.ArgumentParser(prog="python -m nirvana_pl.arch", description=__doc__)
parser.add_argument("--readme", type=Path, default=None, help="write the table into this markdown file")
args = parser.parse_args()
table = architectures_table()
if args.readme is None:
    print(table, end="")
else:
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme}: no {START.strip()} ... {END} markers to write the table between.")
    head, rest = text.split(START, 1)
    args.readme.write_text(head + START + table + END + rest.split(END, 1)[1])
    print(f"wrote the table of {table.count(chr(10)) - 2} architectures into {args.readme}")
