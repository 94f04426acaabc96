"""``python -m nirvana_pl.arch``: print the table of supported architectures (as in the README)."""

from . import architectures_table

print(architectures_table(), end="")
