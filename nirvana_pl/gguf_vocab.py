"""The tokenizer part of a GGUF file (``tokenizer.ggml.*``, ``tokenizer.chat_template``).

Two sources: the ``tokenizer.*`` entries of another GGUF file of the same model, copied as they are (a model
loaded from a GGUF, or any tokenizer llama.cpp's own converter wrote for the dense model), or a transformers
fast tokenizer with a byte-level BPE vocabulary (Llama 3, Qwen 2/3, SmolLM, GPT-2 style), written the way
llama.cpp reads it: tokens with their types, merges, special token ids, whether a BOS/EOS token is added, the
chat template, and the name of the pre-tokenizer, recognised from the tokenizer's own splitting rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The splitting rules of the pre-tokenizers llama.cpp implements, as a transformers tokenizer.json states them
# (a Split regex, Digits, and ByteLevel with or without the GPT-2 regex it applies itself), with llama.cpp's name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+gpt2-regex",): "gpt-2",
    ("digits", "bytelevel+gpt2-regex"): "smollm",
    ("split:" + _LLAMA3_SPLIT, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2_SPLIT, "bytelevel"): "qwen2",
}


@dataclass(frozen=True)
class MetadataEntry:
    """One key/value of a GGUF file (``sub_type``: the element type of an array)."""

    key: str
    value: Any
    type: Any
    sub_type: Any = None


def tokenizer_metadata(source: Any, vocab_size: int) -> list[MetadataEntry]:
    """The tokenizer entries for a model with ``vocab_size`` embedding rows, from ``source``: a path to a GGUF
    file (its ``tokenizer.*`` entries are copied) or a transformers fast tokenizer."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(
                f"save_pruned(format='gguf', tokenizer={str(source)!r}): a path must be an existing .gguf file whose "
                "tokenizer is copied; pass a transformers tokenizer object otherwise."
            )
        return metadata_from_gguf(path, vocab_size)
    return metadata_from_tokenizer(source, vocab_size)


def metadata_from_gguf(path: Path, vocab_size: int) -> list[MetadataEntry]:
    """The ``tokenizer.*`` entries of the GGUF file ``path``, as they are."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append(MetadataEntry(key, field.contents(), vtype, sub_type))
    tokens = next((e.value for e in out if e.key == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); pass another GGUF file or tokenizer.")
    if len(tokens) != vocab_size:
        raise ValueError(
            f"the tokenizer of {path} has {len(tokens)} tokens but the model has {vocab_size} embedding rows; "
            "pass the GGUF file of this model's own base model."
        )
    return out


def metadata_from_tokenizer(tokenizer: Any, vocab_size: int) -> list[MetadataEntry]:
    """The entries llama.cpp needs, from a transformers fast tokenizer with a byte-level BPE vocabulary."""
    from gguf import GGUFValueType as T

    spec = _backend_spec(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has token id {max(vocab.values())} but the model only {vocab_size} embedding rows; "
            "pass the tokenizer the model was trained with."
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].special or _looks_special(token) else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    out = [
        MetadataEntry("tokenizer.ggml.model", "gpt2", T.STRING),
        MetadataEntry("tokenizer.ggml.pre", pre_tokenizer_name(spec), T.STRING),
        MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        MetadataEntry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        MetadataEntry("tokenizer.ggml.merges", _merges(spec), T.ARRAY, T.STRING),
    ]
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            key = "unknown" if name == "unk" else "padding" if name == "pad" else name
            out.append(MetadataEntry(f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32))
    adds_bos, adds_eos = _added_specials(tokenizer)
    out.append(MetadataEntry("tokenizer.ggml.add_bos_token", adds_bos, T.BOOL))
    out.append(MetadataEntry("tokenizer.ggml.add_eos_token", adds_eos, T.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(MetadataEntry("tokenizer.chat_template", template, T.STRING))
    return out


def _backend_spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"save_pruned(format='gguf'): {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; pass one "
            "loaded with AutoTokenizer.from_pretrained, or the path of a GGUF file of the base model to copy its "
            "tokenizer from."
        )
    spec = json.loads(backend.to_str())
    model_type = spec.get("model", {}).get("type")
    decoder = (spec.get("decoder") or {}).get("type")
    if model_type != "BPE" or decoder != "ByteLevel":
        raise ValueError(
            f"save_pruned(format='gguf'): the tokenizer is a {model_type} model with a {decoder} decoder; nirvana_pl "
            "writes byte-level BPE vocabularies (Llama 3, Qwen, SmolLM, GPT-2). For another tokenizer pass "
            "tokenizer='base.gguf', a GGUF file of the dense base model (llama.cpp's convert_hf_to_gguf.py writes "
            "one), and its tokenizer is copied."
        )
    return spec


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of ``spec`` (a tokenizer.json as a dict), recognised by its rules."""
    signature = tuple(_pre_signature(spec.get("pre_tokenizer")))
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC") or signature not in PRE_TOKENIZERS:
        raise ValueError(
            f"save_pruned(format='gguf'): the tokenizer's pre-tokenizer {list(signature)} (normalizer {normalizer}) "
            f"is not one nirvana_pl recognises ({sorted(set(PRE_TOKENIZERS.values()))}); pass tokenizer='base.gguf', "
            "a GGUF file of the dense base model (llama.cpp's convert_hf_to_gguf.py writes one), to copy its tokenizer."
        )
    return PRE_TOKENIZERS[signature]


def _pre_signature(node: dict[str, Any] | None) -> list[str]:
    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [part for child in node.get("pretokenizers", []) for part in _pre_signature(child)]
    if kind == "ByteLevel":
        return ["bytelevel+gpt2-regex" if node.get("use_regex", True) else "bytelevel"]
    if kind == "Digits" and node.get("individual_digits"):
        return ["digits"]
    if kind == "Split":
        pattern = node.get("pattern", {})
        return ["split:" + str(pattern.get("Regex", pattern.get("String")))]
    return [f"{kind}:{json.dumps(node, sort_keys=True)}"]


def _merges(spec: dict[str, Any]) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]


def _looks_special(token: str) -> bool:
    """Added tokens some tokenizers forget to mark special (``<|im_start|>``-style)."""
    return token.startswith("<|") and token.endswith("|>")


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds a BOS token in front / an EOS token at the end, as measured."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
    return adds_bos, adds_eos


__all__ = ["MetadataEntry", "pre_tokenizer_name", "tokenizer_metadata"]
