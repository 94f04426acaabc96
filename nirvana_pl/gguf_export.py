"""Write a (pruned) decoder model as one GGUF file that llama.cpp, and the tools built on it (llama-cpp-python,
Ollama, LM Studio), load and run.

The model's architecture adapter says how llama.cpp reads it (:meth:`~nirvana_pl.arch.Architecture.gguf_target`):
a model whose layers differ in width becomes llama.cpp's ``deci`` architecture, which builds every layer with its
own head counts and MLP width; a uniform one keeps its family's own architecture. This module writes that
description, the tokenizer (:mod:`nirvana_pl.gguf_vocab`) and the weights, one tensor at a time, in fp32, fp16,
bf16 or Q8_0, into a temporary file that replaces the target only when it is complete.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .gguf_layout import GGUFTarget, GGUFTensor
from .gguf_vocab import tokenizer_metadata

log = logging.getLogger(__name__)

#: the weight types ``save_pruned(format="gguf", gguf_dtype=...)`` writes (norms, biases and rope factors stay fp32)
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFExport:
    """What :func:`write_gguf` wrote: the file, llama.cpp's architecture, the weight type, what the export did to
    fit llama.cpp's graph (``notes``), and the matrices written in fp16 because their rows do not fill Q8_0 blocks
    (``not_quantized``)."""

    path: Path
    arch: str
    dtype: str
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)
    not_quantized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB"
        lines = [f"GGUF ({self.arch}, {self.dtype}, {size}) -> {self.path}"]
        if self.not_quantized:
            lines.append(f"  {len(self.not_quantized)} matrices in f16: their rows are not a multiple of 32 values "
                         f"(e.g. {self.not_quantized[0]})")  # fmt: skip
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def write_gguf(
    model: nn.Module, path: str | Path, *, tokenizer: Any, dtype: str = "f16", name: str | None = None,
    progress: bool = True,
) -> GGUFExport:  # fmt: skip
    """Write ``model`` (a causal LM of a family with a GGUF layout, or a peft model around one) to the file ``path``.

    ``tokenizer``: a transformers fast tokenizer with a byte-level BPE vocabulary, or the path of a GGUF file
    whose tokenizer is copied (the file the model was loaded from, or one llama.cpp's converter wrote for the
    dense model). ``dtype``: one of :data:`GGUF_DTYPES`. ``name``: ``general.name`` (default: the model's
    ``name_or_path``).
    """
    try:
        from gguf import GGUFWriter
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'nirvana-pl[gguf]' (or gguf).") from None

    from .arch import architecture_of
    from .export import exportable
    from .lora import base_state_dict, has_lora

    path = _check_inputs(Path(path), tokenizer, dtype)
    model = exportable(model)
    state = base_state_dict(model, merge=True) if has_lora(model) else model.state_dict()
    target = architecture_of(model).gguf_target(model, state)
    vocab = tokenizer_metadata(tokenizer, int(model.config.vocab_size))

    qtype, file_type = _types(dtype)
    plans = [(t, _tensor_type(t, qtype)) for t in target.tensors]
    not_quantized = [t.name for t, kind in plans if t.matrix and kind != qtype and dtype == "q8_0"]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.writing"
    writer = GGUFWriter(None, target.arch)
    try:
        _add_metadata(writer, target, vocab, name or _model_name(model), file_type, quantized=dtype == "q8_0")
        for tensor, kind in plans:
            shape, np_dtype, nbytes, raw = _stored(tensor.shape, kind)
            writer.add_tensor_info(tensor.name, shape, np_dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, kind in _progress(plans, progress, path.name):
            writer.write_tensor_data(_encode(tensor, kind))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    result = GGUFExport(path, target.arch, dtype, len(plans), path.stat().st_size, target.notes, not_quantized)
    log.info(result.summary())
    return result


def vocabulary_source(name: str) -> Any:
    """What ``tokenizer=`` of :func:`write_gguf` takes, from a name: a ``.gguf`` path as it is (its tokenizer is
    copied), ``embedded:smollm2`` as the SmolLM2 GGUF file it comes from, anything else loaded as a transformers
    tokenizer (a folder or hub id)."""
    from .modules import EMBEDDED_MODELS, load_tokenizer

    if name in EMBEDDED_MODELS:
        from .embedded import smollm2_gguf_path

        return smollm2_gguf_path()
    if str(name).endswith(".gguf"):
        return Path(name)
    return load_tokenizer(name)


def _check_inputs(path: Path, tokenizer: Any, dtype: str) -> Path:
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"gguf_dtype={dtype!r}: choose one of {', '.join(GGUF_DTYPES)}.")
    if tokenizer is None:
        raise ValueError(
            "save_pruned(format='gguf') needs tokenizer=: llama.cpp reads the vocabulary from the file. Pass the "
            "model's transformers tokenizer, or the path of a GGUF file of its base model to copy the tokenizer from."
        )
    if path.suffix != ".gguf":
        raise ValueError(f"save_pruned(format='gguf'): {str(path)!r} should end in .gguf (one file, not a folder).")
    if path.is_dir():
        raise IsADirectoryError(f"save_pruned(format='gguf'): {str(path)!r} is a folder; pass a file path (.gguf).")
    return path


def _add_metadata(writer: Any, target: GGUFTarget, vocab: list, name: str, file_type: Any, quantized: bool) -> None:
    from gguf import GGML_QUANT_VERSION

    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in target.hparams.items():
        _add_hparam(writer, f"{target.arch}.{key}", value)
    for entry in vocab:
        writer.add_key_value(entry.key, entry.value, entry.type, entry.sub_type)


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as fp32, in torch's (rows, columns) order (dequantized; for checks)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path).tensors:
        values = dequantize(t.data, t.tensor_type)
        out[t.name] = np.array(values, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
    return out


def _types(dtype: str) -> tuple[Any, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    }[dtype]  # fmt: skip


def _tensor_type(tensor: GGUFTensor, qtype: Any) -> Any:
    """The type a tensor is stored in: vectors in fp32; matrices in ``qtype``, or fp16 where Q8_0 blocks (32 values
    of a row) do not fit."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if any(n <= 0 for n in tensor.shape):
        raise ValueError(f"GGUF export: tensor {tensor.name} has an empty shape {tensor.shape}.")
    if not tensor.matrix:
        return Q.F32
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if tensor.shape[-1] % block == 0 else Q.F16


def _stored(shape: tuple[int, ...], kind: Any) -> tuple[tuple[int, ...], Any, int, Any]:
    """(shape, numpy dtype, bytes, raw type) as ``GGUFWriter.add_tensor_info`` takes them."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if kind == Q.F32:
        return shape, np.float32, 4 * math.prod(shape), None
    if kind == Q.F16:
        return shape, np.float16, 2 * math.prod(shape), None
    byte_shape = quant_shape_to_byte_shape(shape, kind)
    return byte_shape, np.uint8, math.prod(byte_shape), kind


def _encode(tensor: GGUFTensor, kind: Any) -> np.ndarray:
    from gguf.quants import quantize

    values = tensor.make()
    if tuple(values.shape) != tensor.shape:
        raise RuntimeError(f"GGUF export: {tensor.name} came out {tuple(values.shape)}, expected {tensor.shape}.")
    return quantize(values.to(torch.float32).contiguous().numpy(), kind)


def _add_hparam(writer: Any, key: str, value: Any) -> None:
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list):
        writer.add_key_value(key, [int(v) for v in value], T.ARRAY, T.INT32)
    else:
        writer.add_string(key, str(value))


def _model_name(model: nn.Module) -> str:
    """``general.name``: the last part of the model's name or path, else its model type."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    return Path(source).name or model.config.model_type


def _progress(items: list, enabled: bool, label: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"writing {label}", unit="tensor", leave=False)


__all__ = ["GGUFExport", "GGUF_DTYPES", "GGUFTarget", "read_gguf_tensors", "vocabulary_source", "write_gguf"]
