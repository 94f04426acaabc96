"""TextDataModule: fixed-length token windows from text, split into train / held-out, for any LM.

Sources (``source``):

* ``embedded:pydoc`` - Python's own documentation (``pydoc_data.topics``, in every Python install);
* ``embedded:pysrc`` - the source code of the Python standard library's top-level modules (in every install);
* local files: a path or a list of paths (``.txt``/``.md``/``.rst`` whole files, ``.jsonl`` one
  document per line, ``.json``/``.csv``/``.parquet`` read with ``datasets``), or a folder of them;
* a ``datasets`` hub id (``source: wikitext``, ``dataset_name: wikitext-2-raw-v1``) where the
  machine is online (or the dataset is in the local cache).

The text is tokenised once, concatenated (EOS between documents) and cut into non-overlapping
windows of ``seq_len`` tokens (:func:`nirvana_pl.data.token_windows`); a seeded permutation sends
``val_windows`` to validation, ``test_windows`` to test and the rest to training, so the held-out
windows are never trained on and are the same on every run with the same seed.

The tokenizer is ``tokenizer`` when given, else the LightningModule's ``tokenizer`` attribute
(:class:`~nirvana_pl.modules.CausalLMModule` loads the model's own), else an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: Embedded corpora: name -> description. All ship with an installed package, nothing is downloaded.
EMBEDDED_CORPORA = {
    "embedded:pydoc": "Python's documentation topics (pydoc_data, ~460 kB of English)",
    "embedded:pysrc": "the Python standard library's top-level modules (~4 MB of Python source)",
}
FORMATS = ("causal", "seq2seq")
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".jsonl": "json"}


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no special tokens); for random models in demos and tests."""

    vocab_size = 256
    eos_token_id = None
    pad_token_id = None

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": list(texts.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def decode(self, ids: Sequence[int] | torch.Tensor, **_: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def embedded_documents(name: str) -> list[str]:
    """The documents of an embedded corpus (see :data:`EMBEDDED_CORPORA`)."""
    if name == "embedded:pydoc":
        import pydoc_data.topics as topics

        return [topics.topics[k] for k in sorted(topics.topics)]
    if name == "embedded:pysrc":
        import sysconfig

        lib = Path(sysconfig.get_paths()["stdlib"])
        modules = sorted(p for p in lib.glob("*.py") if not p.name.startswith(("_", "test")))
        return [p.read_text(encoding="utf-8", errors="replace") for p in modules]
    raise ValueError(f"source={name!r} is not an embedded corpus; available: {sorted(EMBEDDED_CORPORA)}.")


def load_source(source: str | Sequence[str], text_column: str = "text", dataset_name: str | None = None,
                split: str = "train") -> Any:
    """What :func:`nirvana_pl.data.token_windows` reads: text documents, file paths or a ``datasets.Dataset``."""
    if isinstance(source, (list, tuple)):
        paths = [Path(s) for s in source]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"source: these files do not exist: {missing}.")
        return _load_files(paths, text_column)
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r} must be a file path, a list of paths, a hub dataset id or one of "
                         f"{sorted(EMBEDDED_CORPORA)}.")
    if source.startswith("embedded:"):
        return embedded_documents(source)
    check_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        suffixes = _TEXT_SUFFIXES + tuple(_DATASETS_BUILDERS)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"source={source!r} is a folder without .txt/.md/.jsonl/.json/.csv/.parquet files.")
        return _load_files(files, text_column)
    if path.exists():
        return _load_files([path], text_column)
    check_source(source)
    return _load_hub(source, dataset_name, split)


def check_source(source: str | Sequence[str]) -> None:
    """Fail early on a source that cannot be right: an unknown embedded corpus or a missing local file."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError("source=[] names no text; give a file, a list of files, a hub dataset id or embedded:pydoc.")
    for item in sources:
        if not isinstance(item, str) or not item:
            raise ValueError(f"source={source!r}: each entry must be a non-empty string (a path or a name).")
        if item.startswith("embedded:"):
            if item not in EMBEDDED_CORPORA:
                raise ValueError(f"source={item!r} is not an embedded corpus; available: {sorted(EMBEDDED_CORPORA)}.")
            continue
        path = Path(item).expanduser()
        if path.exists():
            continue
        looks_local = (
            not isinstance(source, str)
            or path.suffix.lower() in _TEXT_SUFFIXES + tuple(_DATASETS_BUILDERS)
            or item.startswith((".", "/", "~"))
        )
        if looks_local:
            raise FileNotFoundError(
                f"source={item!r}: no such file or folder; give an existing path, a hub dataset id (e.g. wikitext), "
                f"or one of {sorted(EMBEDDED_CORPORA)}."
            )


def _load_files(paths: list[Path], text_column: str) -> Any:
    by_suffix = {p.suffix.lower() for p in paths}
    builders = {_DATASETS_BUILDERS[s] for s in by_suffix if s in _DATASETS_BUILDERS and s != ".jsonl"}
    if not builders:
        return list(paths)  # .txt whole files and .jsonl rows: read directly by token_windows
    if len(builders) > 1 or by_suffix - set(_DATASETS_BUILDERS):
        raise ValueError(
            f"source: cannot mix file types {sorted(by_suffix)} in one source; convert them to one format."
        )
    import datasets

    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in paths], split="train")


def _load_hub(source: str, dataset_name: str | None, split: str) -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(f"source={source!r} looks like a hub dataset id; that needs `pip install datasets`.") from err
    try:
        return datasets.load_dataset(source, dataset_name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, missing config: all one message
        raise ValueError(
            f"source={source!r} (dataset_name={dataset_name!r}, split={split!r}) could not be loaded as a hub dataset "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, use a local file or "
            f"{', '.join(sorted(EMBEDDED_CORPORA))}."
        ) from err


class WindowDataset(Dataset):
    """Rows of a ``LongTensor[N, T]`` as batches for a causal LM (``input_ids``) or a seq2seq LM."""

    def __init__(self, windows: torch.Tensor, fmt: str = "causal"):
        self.windows, self.fmt = windows, fmt

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.windows[i]
        if self.fmt == "seq2seq":
            half = row.shape[0] // 2  # the encoder reads the first half, the decoder predicts the second
            return {"input_ids": row[:half], "labels": row[half:]}
        return {"input_ids": row}


class EpochShuffleSampler(Sampler[int]):
    """A seeded permutation of ``range(num_samples)`` per epoch: epoch ``e`` is ``randperm`` seeded with ``seed + e``.

    Each epoch's order follows from ``(seed, epoch)`` alone, not from a generator carried from epoch to
    epoch, so a fit resumed in a fresh process draws the same order as the uninterrupted one (Lightning
    calls :meth:`set_epoch` at the start of every epoch, as for ``DistributedSampler``).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if not (isinstance(num_samples, int) and num_samples >= 0):
            raise ValueError(f"num_samples={num_samples!r} must be an integer >= 0.")
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved in Lightning checkpoints.

    Lightning stores the train loader's :meth:`state_dict` in every checkpoint and, when a fit restarts
    mid-epoch, calls :meth:`load_state_dict` before iterating. The state is the sampler's epoch and the
    number of batches this loader has handed out in it; the first iteration after loading drops that many
    batches when it iterates the same epoch (a state saved in an earlier epoch, e.g. at its end, is
    ignored). The order of an epoch must be reproducible from the epoch number (:class:`EpochShuffleSampler`,
    or the ``DistributedSampler`` Lightning puts around it under DDP). The dropped batches are loaded and
    discarded, which works for any sampler and any ``num_workers`` and costs little for in-memory windows.

    The count is of batches handed to the training loop, which trains each batch before asking for the
    next one: Lightning does not prefetch from a loader with a length, and worker read-ahead happens below
    this count.
    """

    _resume: dict[str, Any] | None = None  # a loaded state, applied by the next iteration
    _epoch: int | None = None  # the epoch of the iteration in progress
    _served: int = 0  # batches handed out by the iteration in progress

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs (no permutation drawn, no worker started) until the first batch is asked
        # for, which Lightning does after `set_epoch`, so a resumed fit iterates the resumed epoch's order
        # even with worker processes, whose read-ahead starts as soon as the inner iterator exists.
        epoch = getattr(self.sampler, "epoch", None)
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._epoch, self._served = epoch, 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # loaded but not iterated yet: still the position to resume from
            return dict(self._resume)
        epoch = self._epoch if self._epoch is not None else getattr(self.sampler, "epoch", None)
        return {"epoch": epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        batches = state_dict.get("batches") if isinstance(state_dict, dict) else None
        if not (isinstance(batches, int) and batches >= 0) or "epoch" not in state_dict:
            raise ValueError(
                f"ResumableDataLoader.load_state_dict: state_dict={state_dict!r} is not a state of this loader "
                "(expected {'epoch': int | None, 'batches': int >= 0}); was the checkpoint written with another "
                "train dataloader?"
            )
        self._resume = {"epoch": state_dict["epoch"], "batches": batches}


class TextDataModule(pl.LightningDataModule):
    """Token windows of text for training and held-out evaluation of a language model.

    Args:
        source: ``embedded:pydoc``, a file / list of files / folder, or a ``datasets`` hub id.
        tokenizer: tokenizer name or folder, or ``bytes``; default: the LightningModule's ``tokenizer``.
        seq_len: tokens per window.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_windows: windows held out for validation (the perplexity reports use them).
        test_windows: windows held out for test.
        max_train_windows: use at most this many training windows (None: all the rest).
        text_column: the text column of a dataset / ``.jsonl`` file.
        dataset_name: the configuration name of a hub dataset (e.g. ``wikitext-2-raw-v1``).
        split: the split of a hub dataset to read.
        format: ``causal`` (``input_ids``) or ``seq2seq`` (first half of each window -> second half).
        seed: seed of the train/held-out split and of the training order (epoch ``e`` is shuffled with
            ``seed + e``; the position in the epoch is saved in checkpoints, so a resumed fit is exact).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        source: str | list[str] = "embedded:pydoc",
        tokenizer: str | None = None,
        seq_len: int = 256,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_windows: int = 16,
        test_windows: int = 0,
        max_train_windows: int | None = None,
        text_column: str = "text",
        dataset_name: str | None = None,
        split: str = "train",
        format: str = "causal",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                                 ("val_windows", val_windows, 0), ("test_windows", test_windows, 0),
                                 ("num_workers", num_workers, 0)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if eval_batch_size is not None and not (isinstance(eval_batch_size, int) and eval_batch_size >= 1):
            raise ValueError(f"eval_batch_size={eval_batch_size!r} must be a positive integer or null.")
        if max_train_windows is not None and not (isinstance(max_train_windows, int) and max_train_windows >= 1):
            raise ValueError(f"max_train_windows={max_train_windows!r} must be a positive integer or null (all).")
        if format not in FORMATS:
            raise ValueError(f"format={format!r} must be one of {list(FORMATS)}.")
        check_source(source)
        self.source = source
        self.tokenizer_name = tokenizer
        self.tokenizer: Any = None
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_windows, self.test_windows, self.max_train_windows = val_windows, test_windows, max_train_windows
        self.text_column, self.dataset_name, self.split = text_column, dataset_name, split
        self.format, self.seed, self.num_workers = format, seed, num_workers
        self.splits: dict[str, torch.Tensor] | None = None
        #: what the text is for, in error messages (``nirvana-pl eval`` sets "evaluation")
        self.purpose = "training"

    # ---------------------------------------------------------------- set-up
    def _resolve_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            from .modules import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name)
        else:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(
                "TextDataModule has no tokenizer: set data tokenizer= (a name, a folder or 'bytes'), or use a "
                "LightningModule with a `tokenizer` attribute (CausalLMModule loads the model's own)."
            )
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from .data import token_windows

        tokenizer = self._resolve_tokenizer()
        max_positions = None
        module = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(getattr(module, "model", None), "config", None)
        if config is not None and not getattr(config, "is_encoder_decoder", False):
            max_positions = getattr(config, "max_position_embeddings", None)
        data = load_source(self.source, self.text_column, self.dataset_name, self.split)
        windows = token_windows(data, tokenizer, self.seq_len, text_column=self.text_column,
                                max_positions=max_positions, purpose=self.purpose)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and int(windows.max()) >= vocab:
            raise ValueError(
                f"the tokenizer produces ids up to {int(windows.max())} but the model's vocab_size is {vocab}; "
                "use the model's own tokenizer (or a model with a larger vocabulary)."
            )
        n_eval = self.val_windows + self.test_windows
        if windows.shape[0] <= n_eval:
            raise ValueError(
                f"source {self.source!r} gives {windows.shape[0]} windows of seq_len={self.seq_len}, not more than "
                f"val_windows + test_windows = {n_eval}; give more text or lower seq_len / the held-out counts."
            )
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(self.seed))
        windows = windows[order]
        train = windows[n_eval:]
        if self.max_train_windows is not None:
            train = train[: self.max_train_windows]
        self.splits = {
            "val": windows[: self.val_windows],
            "test": windows[self.val_windows : n_eval],
            "train": train,
        }

    # ---------------------------------------------------------------- loaders
    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        dataset = WindowDataset(self.splits[name], self.format)
        if not shuffle:  # held-out splits: a fixed order, nothing to resume
            return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers)
        # Training: a permutation per epoch from (seed, epoch) and the position in the epoch in the checkpoint,
        # so that a fit resumed from any checkpoint, mid-epoch included, trains on the same batches.
        return ResumableDataLoader(
            dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), self.seed), drop_last=True,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.test_windows:
            raise ValueError("TextDataModule(test_windows=0) has no test split; set test_windows > 0 to test.")
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def held_out_of(self, source: str | list[str]) -> list[dict[str, torch.Tensor]]:
        """``val_windows`` windows of other text (``source`` as this module's), never trained on, cut and batched
        like the validation windows (this tokenizer, ``seq_len``, ``eval_batch_size``, ``format``, ``seed``)."""
        from .data import token_windows

        check_source(source)
        config = getattr(getattr(self.trainer.lightning_module if self.trainer is not None else None, "model", None),
                         "config", None)  # fmt: skip
        max_positions = None
        if config is not None and not getattr(config, "is_encoder_decoder", False):
            max_positions = getattr(config, "max_position_embeddings", None)
        data = load_source(source, self.text_column)
        windows = token_windows(data, self._resolve_tokenizer(), self.seq_len, num_windows=max(self.val_windows, 1),
                                seed=self.seed, text_column=self.text_column, max_positions=max_positions,
                                purpose=f"held-out text {source!r} (val_windows windows)")  # fmt: skip
        return list(DataLoader(WindowDataset(windows, self.format), batch_size=self.eval_batch_size))

    def held_out_batches(self, split: str = "val") -> list[dict[str, torch.Tensor]]:
        """The held-out windows of ``split`` as a list of batches (for evaluation outside a Trainer)."""
        if split not in ("val", "test", "train"):
            raise ValueError(f"split={split!r} must be 'val', 'test' or 'train'.")
        return list(self._loader(split, self.eval_batch_size, shuffle=False))


def _selector_base() -> type:
    from .calibration import CalibrationSelector

    return CalibrationSelector


class TextCalibrationSelector(_selector_base()):  # type: ignore[misc]
    """KL-divergence calibration selection (:class:`nirvana_pl.CalibrationSelector`) with its pool read from text.

    For configs: ``calibration: {class_path: nirvana_pl.datamodule.TextCalibrationSelector, init_args:
    {source: ..., tokenizer: ...}}`` on :class:`~nirvana_pl.NirvanaPruningCallback`. The pool is cut
    from ``source`` as windows of ``seq_len`` tokens; the other arguments are those of
    ``CalibrationSelector``.

    Args:
        source: the text (as :class:`TextDataModule`): ``embedded:pydoc``, files, or a hub dataset id.
        tokenizer: the model's tokenizer: a name or folder, ``embedded:smollm2``, or ``bytes``.
        seq_len: tokens per pool window.
        pool_windows: a seeded random choice of this many windows as the pool (None: all).
        num_candidates: K candidate calibration sets.
        samples_per_candidate: windows per candidate set.
        probe_windows: probe windows the KL is measured on (disjoint from every candidate).
        probe_seq_len: tokens per probe window.
        mode: ``sets`` or ``samples`` (see ``CalibrationSelector``).
        seed: seed of the pool choice, the probe split and the draws.
        batch_size: windows per batch when scoring and probing.
        chunk_tokens: positions per KL chunk (memory).
        text_column: text column of a dataset source.
        dataset_name: configuration of a hub dataset.
    """

    def __init__(
        self,
        source: str | list[str] = "embedded:pydoc",
        tokenizer: str = "bytes",
        seq_len: int = 128,
        pool_windows: int | None = 256,
        num_candidates: int = 8,
        samples_per_candidate: int = 32,
        probe_windows: int = 128,
        probe_seq_len: int | None = 64,
        mode: str = "sets",
        seed: int = 0,
        batch_size: int = 8,
        chunk_tokens: int = 256,
        text_column: str = "text",
        dataset_name: str | None = None,
    ) -> None:
        from .data import token_windows
        from .modules import load_tokenizer

        tok = load_tokenizer(tokenizer)
        pool = token_windows(load_source(source, text_column, dataset_name), tok, seq_len, num_windows=pool_windows,
                             seed=seed, text_column=text_column)
        super().__init__(
            pool=pool, num_candidates=num_candidates, samples_per_candidate=samples_per_candidate,
            probe_windows=probe_windows, probe_seq_len=probe_seq_len, mode=mode, seed=seed, batch_size=batch_size,
            chunk_tokens=chunk_tokens,
        )
        self.source, self.tokenizer_name = source, tokenizer


__all__ = [
    "ByteTokenizer",
    "EMBEDDED_CORPORA",
    "EpochShuffleSampler",
    "ResumableDataLoader",
    "TextCalibrationSelector",
    "TextDataModule",
    "WindowDataset",
    "load_source",
]
