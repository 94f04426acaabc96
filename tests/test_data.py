"""data.token_windows: every source type, seeding, and the errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nirvana_pl.data import as_batches, token_windows


@pytest.fixture(scope="module")
def texts() -> list[str]:
    import pydoc_data.topics as topics  # offline English text shipped with Python

    return [topics.topics[k] for k in sorted(topics.topics)[:6]]


@pytest.fixture(scope="module")
def tok(texts):
    """A word-level fast tokenizer built in code (no download), with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def _stream(tok, docs: list[str]) -> torch.Tensor:
    """The expected stream: documents without special tokens, EOS between them."""
    out: list[int] = []
    for i, d in enumerate(docs):
        out += tok(d, add_special_tokens=False)["input_ids"]
        if i + 1 < len(docs):
            out.append(tok.eos_token_id)
    return torch.tensor(out)


def _windows(stream: torch.Tensor, T: int) -> torch.Tensor:
    n = stream.numel() // T
    return stream[: n * T].view(n, T)


# ---------------------------------------------------------------------------- sources
def test_plain_string(tok, texts):
    w = token_windows(texts[0], tok, seq_len=16)
    assert w.dtype == torch.long and w.shape[1] == 16
    assert torch.equal(w, _windows(_stream(tok, texts[:1]), 16))


def test_list_of_texts_separated_by_eos(tok, texts):
    w = token_windows(texts[:3], tok, seq_len=32)
    assert torch.equal(w, _windows(_stream(tok, texts[:3]), 32))
    assert (w == tok.eos_token_id).sum() == 2


def test_dataset_text_column(tok, texts):
    from datasets import Dataset

    ds = Dataset.from_dict({"body": texts[:3], "id": [0, 1, 2]})
    w = token_windows(ds, tok, seq_len=32, text_column="body")
    assert torch.equal(w, _windows(_stream(tok, texts[:3]), 32))


def test_dataset_input_ids_column_needs_no_tokenizer():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [list(range(10)), list(range(10, 25))]})
    w = token_windows(ds, seq_len=5)
    assert torch.equal(w, torch.arange(25).view(5, 5))


def test_iterable_dataset_rows(tok, texts):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts[:2]}).to_iterable_dataset()
    assert torch.equal(token_windows(ds, tok, seq_len=32), token_windows(texts[:2], tok, seq_len=32))


def test_load_dataset_text_files(tok, texts, tmp_path):
    from datasets import load_dataset

    path = tmp_path / "a.txt"
    path.write_text("\n".join(texts[:2]))
    ds = load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    lines = [line for line in ds["text"] if line]
    w = token_windows(ds, tok, seq_len=32)
    assert torch.equal(w, _windows(_stream(tok, lines), 32))


def test_text_files_as_str_path_and_list(tok, texts, tmp_path):
    paths = []
    for i, t in enumerate(texts[:2]):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(t)
    expected_one = _windows(_stream(tok, texts[:1]), 16)
    assert torch.equal(token_windows(paths[0], tok, seq_len=16), expected_one)
    assert torch.equal(token_windows(str(paths[0]), tok, seq_len=16), expected_one)
    both = token_windows([paths[0], str(paths[1])], tok, seq_len=16)
    assert torch.equal(both, _windows(_stream(tok, texts[:2]), 16))


def test_jsonl_file(tok, texts, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(texts[:2])) + "\n")
    assert torch.equal(token_windows(path, tok, seq_len=16), _windows(_stream(tok, texts[:2]), 16))


def test_dataloader_of_tensors_and_dicts_drops_padding():
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.arange(48).view(6, 8)
    loader = DataLoader(TensorDataset(ids), batch_size=4)  # yields [tensor] lists
    assert torch.equal(token_windows(loader, seq_len=8), ids)
    assert torch.equal(token_windows(DataLoader(ids, batch_size=4), seq_len=12), torch.arange(48).view(4, 12))

    mask = torch.ones(6, 8, dtype=torch.long)
    mask[:, 6:] = 0  # right padding: the last two positions are not text
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(6)]
    w = token_windows(DataLoader(rows, batch_size=3), seq_len=6)
    assert torch.equal(w, ids[:, :6])


def test_list_of_1d_and_2d_tensors_and_eos_from_tokenizer(tok):
    parts = [torch.arange(5), torch.arange(5, 15).view(2, 5)]
    assert torch.equal(token_windows(parts, seq_len=3), torch.arange(15)[:15].view(5, 3))
    with_eos = token_windows(parts, tok, seq_len=1)
    eos = tok.eos_token_id
    assert with_eos.view(-1).tolist() == [0, 1, 2, 3, 4, eos, 5, 6, 7, 8, 9, eos, 10, 11, 12, 13, 14]
    assert torch.equal(token_windows(torch.arange(12), seq_len=4), torch.arange(12).view(3, 4))


def test_seeded_random_choice(tok, texts):
    every = token_windows(texts, tok, seq_len=16)
    a = token_windows(texts, tok, seq_len=16, num_windows=10, seed=1)
    b = token_windows(texts, tok, seq_len=16, num_windows=10, seed=1)
    c = token_windows(texts, tok, seq_len=16, num_windows=10, seed=2)
    assert a.shape == (10, 16) and torch.equal(a, b) and not torch.equal(a, c)
    rows = {tuple(r) for r in every.tolist()}
    assert all(tuple(r) in rows for r in a.tolist())
    assert len({tuple(r) for r in a.tolist()}) == 10  # windows are chosen without replacement


def test_as_batches():
    w = torch.arange(70).view(7, 10)
    batches = as_batches(w, 3)
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), w)
    with pytest.raises(ValueError, match="batch_size"):
        as_batches(w, 0)


# ---------------------------------------------------------------------------- errors
def test_too_little_text_says_how_many_windows(tok, texts):
    available = token_windows(texts[0], tok, seq_len=16).shape[0]
    with pytest.raises(ValueError, match=rf"{available} windows.*lower num_windows to <= {available}"):
        token_windows(texts[0], tok, seq_len=16, num_windows=available + 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows("just a few words", tok, seq_len=128)


def test_seq_len_longer_than_model(tok, texts):
    with pytest.raises(ValueError, match=r"seq_len=128.*max_position_embeddings=64.*seq_len <= 64"):
        token_windows(texts[0], tok, seq_len=128, max_positions=64)
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(texts[0], tok, seq_len=0)
    with pytest.raises(ValueError, match="num_windows"):
        token_windows(texts[0], tok, seq_len=8, num_windows=0)


def test_missing_and_empty_columns_list_the_available_ones(tok):
    from datasets import Dataset

    ds = Dataset.from_dict({"content": ["a b c"], "label": [1]})
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content', 'label'\].*text_column="):
        token_windows(ds, tok, seq_len=2)
    empty = Dataset.from_dict({"text": ["", ""], "other": ["x", "y"]})
    with pytest.raises(ValueError, match=r"column 'text' is empty.*available: \['text', 'other'\]"):
        token_windows(empty, tok, seq_len=2)
    with pytest.raises(ValueError, match="dataset is empty"):
        token_windows(Dataset.from_dict({"text": []}), tok, seq_len=2)
    with pytest.raises(ValueError, match=r"available columns: \['labels'\]"):
        token_windows([{"labels": torch.zeros(4)}], seq_len=2)


def test_text_without_tokenizer(texts):
    from datasets import Dataset

    for source in (texts[0], [texts[0]], Dataset.from_dict({"text": texts[:1]})):
        with pytest.raises(ValueError, match="tokenizer=None; pass the model's tokenizer"):
            token_windows(source, None, seq_len=8)


def test_bad_sources(tok, tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(FileNotFoundError, match="does not exist"):
        token_windows(str(tmp_path / "missing.txt"), tok, seq_len=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        token_windows(Path(tmp_path / "missing"), tok, seq_len=8)
    dd = DatasetDict({"train": Dataset.from_dict({"text": ["a"]})})
    with pytest.raises(ValueError, match=r"splits \['train'\].*source\['train'\]"):
        token_windows(dd, tok, seq_len=8)
    with pytest.raises(ValueError, match="integer tensor"):
        token_windows([torch.rand(4, 4)], seq_len=2)
    with pytest.raises(ValueError, match="yielded no tokens"):
        token_windows([torch.zeros(0, dtype=torch.long)], seq_len=2)
    with pytest.raises(ValueError, match="source is None"):
        token_windows(None, seq_len=2)
