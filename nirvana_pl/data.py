"""Calibration data from where users keep it: token windows of a fixed length, seeded.

:func:`token_windows` turns text or token ids into a ``LongTensor[N, T]`` of non-overlapping
windows cut from one concatenated token stream (documents separated by the tokenizer's
EOS token when it has one), optionally a seeded random choice of ``num_windows`` of them.
:func:`as_batches` groups windows into the ``[B, T]`` batches that saliency estimators take.

Accepted sources:

* ``datasets.Dataset`` / ``IterableDataset``: a text column (``text_column``) or a column of
  token ids (``input_ids``);
* local text files: a ``pathlib.Path``, a ``str`` naming an existing file, or a list of them
  (``.txt`` and anything else: the whole file is one document; ``.jsonl``: one document per
  line, read from ``text_column`` or ``input_ids``);
* a ``torch.utils.data.DataLoader`` (or any iterable) yielding tensors, dicts with
  ``input_ids`` (padding dropped via ``attention_mask``), tuples starting with a tensor, or rows
  of a dataset;
* a list of 1-D / 2-D token tensors (each row a document), or a single such tensor;
* a plain ``str`` of text (or a list of texts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence, Union

import torch

#: Documents are tokenised this many at a time (the fast tokenizers batch internally).
_TOKENIZE_BATCH = 1000
#: A ``str`` this short, on one line and ending like a file name, is taken to be a path.
_PATH_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".csv", ".tsv", ".log")

Source = Union[str, Path, Sequence[Any], torch.Tensor, Iterable[Any], Any]
Document = Union[str, torch.Tensor]  # raw text, or a 1-D LongTensor of token ids


def token_windows(
    source: Source,
    tokenizer: Any | None = None,
    seq_len: int = 128,
    num_windows: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    max_positions: int | None = None,
    purpose: str = "calibration",
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from ``source``, as ``LongTensor[N, seq_len]``.

    Documents are tokenised without special tokens, concatenated with ``tokenizer.eos_token_id``
    between them (when the tokenizer has one; token-id sources without a tokenizer are
    concatenated as they are) and cut into windows; the tail shorter than ``seq_len`` is dropped.
    With ``num_windows`` a seeded random choice of that many windows is returned (in stream
    order); without it, all windows. The same source, tokenizer and seed give the same tensor.

    ``max_positions`` (the model's ``config.max_position_embeddings``) makes a too-long
    ``seq_len`` fail here rather than inside the model. ``purpose`` names what the data is for in
    error messages (``"calibration"``, ``"training"``, ...).
    """
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer (tokens per window, e.g. 128).")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's max_position_embeddings={max_positions}; "
            f"use seq_len <= {max_positions}."
        )
    if num_windows is not None and not (isinstance(num_windows, int) and num_windows >= 1):
        raise ValueError(f"num_windows={num_windows!r} must be a positive integer or None (all windows).")

    docs = _documents(source, text_column, purpose)
    token_docs = _tokenize(docs, tokenizer, purpose)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stream = _concatenate(token_docs, eos)
    if stream.numel() == 0:
        files = _source_files(source)
        if files and all(f.is_file() and f.stat().st_size == 0 for f in files):
            raise ValueError(
                f"the {purpose} data ({_describe(source)}) is empty (0 bytes); give a file with text in it."
            )
        raise ValueError(
            f"the {purpose} data ({_describe(source)}) yielded no tokens; give it non-empty text or token ids."
        )

    available = stream.numel() // seq_len
    if available == 0:
        raise ValueError(
            f"the {purpose} data ({_describe(source)}) has {stream.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}; give more text or lower seq_len to <= {stream.numel()}."
        )
    if num_windows is not None and num_windows > available:
        raise ValueError(
            f"num_windows={num_windows} but the {purpose} data ({_describe(source)}) has {stream.numel()} "
            f"tokens = {available} windows of seq_len={seq_len}; give more text, lower num_windows to "
            f"<= {available} or lower seq_len."
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    if num_windows is None:
        return windows.clone()
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=gen)[:num_windows].sort().values
    return windows[chosen].clone()


def as_batches(windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Split ``LongTensor[N, T]`` windows into ``[B, T]`` batches (the last may be smaller)."""
    if not (isinstance(windows, torch.Tensor) and windows.dim() == 2):
        raise ValueError(
            f"windows must be a LongTensor[N, T] (e.g. from token_windows); got {_describe(windows)}."
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


# ---------------------------------------------------------------------------------------
# sources -> documents
# ---------------------------------------------------------------------------------------
def _documents(source: Source, text_column: str, purpose: str = "calibration") -> list[Document]:
    """Every document of ``source`` in order: raw strings or 1-D token tensors."""
    if source is None:
        raise ValueError(f"the {purpose} source is None; pass a dataset, file path(s), DataLoader, tensors or text.")
    kind = type(source).__module__.split(".")[0] + "." + type(source).__name__
    if kind == "datasets.DatasetDict" or kind == "datasets.IterableDatasetDict":
        raise ValueError(
            f"the {purpose} source is a {type(source).__name__} with splits {sorted(source.keys())}; pick one, "
            f"e.g. source[{sorted(source.keys())[0]!r}]."
        )
    if kind == "datasets.Dataset":
        return _dataset_documents(source, text_column, purpose)
    if isinstance(source, Path):
        return _file_documents(source, text_column, purpose)
    if isinstance(source, str):
        return _file_documents(Path(source), text_column, purpose) if _is_path_like(source, purpose) else [source]
    if isinstance(source, torch.Tensor):
        return _tensor_documents(source, None, "source", purpose)
    if isinstance(source, Mapping):
        return _row_documents(source, text_column, "source", purpose)
    if isinstance(source, Iterable):
        docs: list[Document] = []
        for i, item in enumerate(source):
            docs.extend(_item_documents(item, text_column, f"item {i}", purpose))
        return docs
    raise ValueError(
        f"cannot read {purpose} data from a {type(source).__name__}; pass a datasets.Dataset, file path(s), "
        "a DataLoader of token ids, a list of LongTensors, or text."
    )


def _item_documents(item: Any, text_column: str, where: str, purpose: str = "calibration") -> list[Document]:
    """One element of a list / DataLoader / iterable dataset."""
    if isinstance(item, Path):
        return _file_documents(item, text_column, purpose)
    if isinstance(item, str):
        return _file_documents(Path(item), text_column, purpose) if _is_path_like(item, purpose) else [item]
    if isinstance(item, torch.Tensor):
        return _tensor_documents(item, None, where, purpose)
    if isinstance(item, Mapping):
        return _row_documents(item, text_column, where, purpose)
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        return _tensor_documents(item[0], None, where, purpose)  # (input_ids, labels, ...) batches
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
        return [torch.tensor(item, dtype=torch.long)] if item else []
    raise ValueError(
        f"{purpose} {where} is a {type(item).__name__}; expected token ids (a tensor, a dict with 'input_ids', "
        f"a list of ints), text (a str or a dict with {text_column!r}) or a file path."
    )


def _row_documents(
    row: Mapping[str, Any], text_column: str, where: str, purpose: str = "calibration"
) -> list[Document]:
    """A dataset row or a DataLoader dict batch: text in ``text_column`` or token ids in ``input_ids``."""
    if text_column in row and row[text_column] is not None:
        value = row[text_column]
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)  # a collated batch of texts
        if text_column != "input_ids":
            raise ValueError(
                f"{purpose} {where}: column {text_column!r} holds {type(value).__name__}, not text; name the text "
                "column with text_column=... or give token ids in 'input_ids'."
            )
    if "input_ids" in row:
        ids, mask = row["input_ids"], row.get("attention_mask")
        if isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], int):
            # A batch of rows of possibly different lengths (no padding collator): row by row.
            masks = mask if mask is not None else [None] * len(ids)
            return [
                d for r, m in zip(ids, masks) for d in _tensor_documents(_as_long(r, where, purpose), m, where, purpose)
            ]
        return _tensor_documents(_as_long(ids, where, purpose), mask, where, purpose)
    raise ValueError(
        f"{purpose} {where} has no column {text_column!r} and no 'input_ids'; available columns: "
        f"{sorted(row.keys())}. Pass text_column=<one of them>."
    )


def _tensor_documents(ids: torch.Tensor, mask: Any, where: str, purpose: str = "calibration") -> list[Document]:
    """Rows of a 1-D/2-D token tensor as documents, padding (``mask == 0``) dropped."""
    if ids.dim() not in (1, 2) or (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise ValueError(
            f"{purpose} {where}: token ids must be an integer tensor of shape [T] or [B, T]; got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}."
        )
    if ids.numel() == 0:
        return []
    rows = ids.reshape(-1, ids.shape[-1]).to("cpu", torch.long)
    if mask is not None:
        mask = _as_long(mask, where, purpose).reshape(rows.shape).to("cpu").bool()
        return [r[m] for r, m in zip(rows, mask)]
    return list(rows)


def _as_long(value: Any, where: str, purpose: str = "calibration") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{purpose} {where}: input_ids of ragged lengths or non-integers cannot be read in one piece "
            f"({exc}); give one document per row or a list of 1-D tensors."
        ) from exc


def _dataset_documents(ds: Any, text_column: str, purpose: str = "calibration") -> list[Document]:
    columns = list(ds.column_names)
    column = _dataset_column(columns, text_column)
    if len(ds) == 0:
        raise ValueError(f"the dataset is empty (0 rows); column {column!r} holds no {purpose} data.")
    docs: list[Document] = []
    for start in range(0, len(ds), _TOKENIZE_BATCH):
        # Column access of a slice stays in Arrow until here: cheap on large datasets.
        for value in ds[start : start + _TOKENIZE_BATCH][column]:
            doc = _cell_document(value, column)
            if doc is not None:
                docs.append(doc)
    if not any(len(d) for d in docs):
        raise ValueError(
            f"dataset column {column!r} is empty (all {len(ds)} rows are empty); choose another column with "
            f"text_column=... (available: {columns})."
        )
    return docs


def _dataset_column(columns: list[str], text_column: str) -> str:
    """The column to read: ``text_column``, else token ids in ``input_ids``."""
    if text_column in columns:
        return text_column
    if "input_ids" in columns:
        return "input_ids"
    raise ValueError(
        f"the dataset has no column {text_column!r} (and no 'input_ids'); available columns: {columns}. "
        "Pass text_column=<one of them>."
    )


def _cell_document(value: Any, column: str) -> Document | None:
    """One dataset cell as a document (text as is, token ids as a tensor); None for a missing or empty cell."""
    if isinstance(value, str):
        return value
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) for t in value):
        return torch.tensor(value, dtype=torch.long) if value else None
    raise ValueError(
        f"dataset column {column!r} holds {type(value).__name__} values, neither text nor lists of "
        "token ids; pass text_column=<the text column>."
    )


def _is_path_like(text: str, purpose: str = "calibration") -> bool:
    """Whether a ``str`` names a file rather than being text itself."""
    if "\n" in text or len(text) > 4096:
        return False
    if os.path.isfile(text):
        return True
    if text.strip() == text and " " not in text and text.lower().endswith(_PATH_SUFFIXES):
        # Looks like a file name but is not there: better an error than calibrating on the name.
        raise FileNotFoundError(
            f"{purpose} file {text!r} does not exist; check the path (or pass the text itself inside a list)."
        )
    return False


def _file_documents(path: Path, text_column: str, purpose: str = "calibration") -> list[Document]:
    if not path.is_file():
        raise FileNotFoundError(f"{purpose} file {str(path)!r} does not exist; check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{purpose} file {str(path)!r} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
            f"{err.start} cannot be decoded); give a text file (.txt, .md, .jsonl) saved as UTF-8, e.g. convert it "
            "with `iconv -t UTF-8`, or leave binary files out of the source."
        ) from None
    if "\x00" in text:
        raise ValueError(
            f"{purpose} file {str(path)!r} holds NUL bytes: it is a binary file, not text; give a text file "
            "(.txt, .md, .jsonl) or leave it out of the source."
        )
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs: list[Document] = []
    for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: JSON strings may hold U+2028)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{purpose} file {str(path)!r} line {n} is not JSON ({err.msg}); a .jsonl file holds one JSON object "
                f"per line, e.g. {{\"{text_column}\": \"...\"}} (or rename a plain text file to .txt)."
            ) from None
        if not isinstance(row, Mapping):
            raise ValueError(
                f"{purpose} file {str(path)!r} line {n} is a JSON {type(row).__name__}, not an object; each line of a "
                f".jsonl file is one object such as {{\"{text_column}\": \"...\"}}."
            )
        docs.extend(_row_documents(row, text_column, f"{path.name} line {n}", purpose))
    return docs


# ---------------------------------------------------------------------------------------
# documents -> one token stream
# ---------------------------------------------------------------------------------------
def _tokenize(docs: list[Document], tokenizer: Any | None, purpose: str = "calibration") -> list[torch.Tensor]:
    """Token ids of every document, in order; texts are tokenised in batches."""
    texts = [i for i, d in enumerate(docs) if isinstance(d, str)]
    if texts and tokenizer is None:
        raise ValueError(
            f"the {purpose} source holds text but tokenizer=None; pass the model's tokenizer, e.g. "
            "tokenizer=AutoTokenizer.from_pretrained(<model>), or give token ids instead."
        )
    out: list[torch.Tensor | None] = [d if isinstance(d, torch.Tensor) else None for d in docs]
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        idx = texts[start : start + _TOKENIZE_BATCH]
        for i, ids in zip(idx, _encode(tokenizer, [docs[i] for i in idx])):
            out[i] = torch.tensor(ids, dtype=torch.long)
    return [t for t in out if t is not None and t.numel()]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # Special tokens are left out: the stream is cut at arbitrary points, so a BOS would land
    # mid-window anyway; documents are separated by EOS in _concatenate instead.
    if hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "batch_decode"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    if callable(tokenizer):
        # verbose=False: whole files are one document, longer than model_max_length on purpose.
        return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
    raise ValueError(
        f"tokenizer is a {type(tokenizer).__name__}; pass a transformers tokenizer (AutoTokenizer.from_pretrained) "
        "or a tokenizers.Tokenizer."
    )


def _concatenate(docs: list[torch.Tensor], eos: int | None) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    for i, d in enumerate(docs):
        parts.append(d)
        if eos is not None and i + 1 < len(docs) and int(d[-1]) != eos:
            parts.append(torch.tensor([eos], dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _source_files(source: Any) -> list[Path]:
    """The files ``source`` names, when it is a path or a list of paths only (else [])."""
    items = source if isinstance(source, (list, tuple)) else [source]
    files = []
    for item in items:
        names_a_file = isinstance(item, str) and "\n" not in item and len(item) <= 4096 and os.path.isfile(item)
        if isinstance(item, Path) or names_a_file:
            files.append(Path(item))
        else:
            return []
    return files


def _describe(source: Any) -> str:
    if isinstance(source, torch.Tensor):
        return f"tensor of shape {tuple(source.shape)}"
    files = _source_files(source)
    if files:  # the whole path: a truncated one may hide the file's name
        names = ", ".join(repr(str(f)) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return f"file{'s' if len(files) > 1 else ''} {names}"
    if isinstance(source, (str, Path)):
        text = str(source)
        return repr(text[:40] + "..." if len(text) > 40 else text)
    if isinstance(source, (list, tuple)):
        return f"{type(source).__name__} of {len(source)} items"
    return type(source).__name__
