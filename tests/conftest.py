"""Shared tiny-model fixtures: seeded random decoder LLMs small enough for CPU unit tests.

Every factory builds hidden 64, 4 layers, intermediate 176, vocab 128 by default, in fp32
eval mode, with a fixed seed, so tests are deterministic and take milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

HIDDEN = 64
LAYERS = 4
INTERMEDIATE = 176
VOCAB = 128
MAX_POS = 64

torch.set_num_threads(min(2, torch.get_num_threads()))


def _common(num_layers: int, intermediate: int) -> dict:
    return dict(
        hidden_size=HIDDEN,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Random init is seeded by the caller; spread norms a little so the model is not symmetric.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def tiny_llama(
    num_kv: int = 4,
    heads: int = 8,
    head_dim: int | None = 16,
    num_layers: int = LAYERS,
    intermediate: int = INTERMEDIATE,
    seed: int = 0,
):
    """LlamaForCausalLM, GQA by default (8 query heads over 4 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = _common(num_layers, intermediate)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    config = LlamaConfig(num_attention_heads=heads, num_key_value_heads=num_kv, **kw)
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config), seed)


def tiny_qwen3(
    num_kv: int = 4, heads: int = 8, num_layers: int = LAYERS, intermediate: int = INTERMEDIATE, seed: int = 0
):
    """Qwen3ForCausalLM: per-head q_norm / k_norm (one head's width, shared by every head), head_dim 16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(num_attention_heads=heads, num_key_value_heads=num_kv, head_dim=16,
                         **_common(num_layers, intermediate))  # fmt: skip
    torch.manual_seed(seed)
    return _finish(Qwen3ForCausalLM(config), seed)


def tiny_llama_mha(seed: int = 0, **kw):
    """Llama with as many KV heads as query heads (g = 1)."""
    return tiny_llama(num_kv=4, heads=4, head_dim=16, seed=seed, **kw)


def tiny_qwen2(
    num_kv: int = 2,
    heads: int = 4,
    head_dim: int | None = None,
    num_layers: int = LAYERS,
    intermediate: int = INTERMEDIATE,
    seed: int = 0,
):
    """Qwen2ForCausalLM: q/k/v have biases. By default the config has NO ``head_dim``
    attribute (Qwen2Config does not define one), so head_dim = hidden / heads = 16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = _common(num_layers, intermediate)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    config = Qwen2Config(num_attention_heads=heads, num_key_value_heads=num_kv, use_sliding_window=False, **kw)
    if head_dim is None:
        assert not hasattr(config, "head_dim") or config.head_dim is None
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(config), seed)


def tiny_mistral(num_kv: int = 2, heads: int = 8, head_dim: int | None = 16, seed: int = 0, **kw):
    """MistralForCausalLM, GQA g = 4."""
    from transformers import MistralConfig, MistralForCausalLM

    common = _common(kw.pop("num_layers", LAYERS), kw.pop("intermediate", INTERMEDIATE))
    if head_dim is not None:
        common["head_dim"] = head_dim
    config = MistralConfig(num_attention_heads=heads, num_key_value_heads=num_kv, sliding_window=None, **common)
    torch.manual_seed(seed)
    return _finish(MistralForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0):
    """An architecture nirvana_pl does not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(gated: bool = False, num_layers: int = 2, num_decoder_layers: int = 2, seed: int = 0):
    """T5ForConditionalGeneration: d_model 32, 4 heads of d_kv 8, d_ff 64; ``gated`` picks the
    ``wi_0``/``wi_1`` FFN (gated-gelu) instead of ``wi`` (relu)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=num_layers,
        num_decoder_layers=num_decoder_layers, feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, dropout_rate=0.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed + 1)
    # A distinct, visible relative bias per head, non-trivial layer norms, and stronger residual branches
    # (v, o, wo x4) so that the random model's outputs (and greedy generations) depend on the input.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.endswith(f"{k}.weight") for k in ("Attention.v", "Attention.o", "DenseReluDense.wo")):
                p.mul_(4.0)
            elif name.endswith("relative_attention_bias.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def calib_batches(n: int = 2, batch: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=gen) for _ in range(n)]


#: (name, factory) of every supported architecture variant the surgery tests cover.
ARCHS = {
    "llama_gqa": tiny_llama,
    "llama_mha": tiny_llama_mha,
    "qwen2_bias": tiny_qwen2,
    "mistral": tiny_mistral,
}


@pytest.fixture(params=sorted(ARCHS))
def arch_model(request):
    """Each supported architecture variant, as (name, model)."""
    return request.param, ARCHS[request.param]()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen2():
    return tiny_qwen2()


@pytest.fixture
def calibration():
    return calib_batches()


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory) -> str:
    """One torch-extensions cache for the whole session (DeepSpeed's CPU op compiles once per suite)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


@pytest.fixture
def byte_model_dir(tmp_path):
    """A saved random byte-level (vocabulary 256) Llama folder, as the one-shot commands load one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    )
    path = tmp_path / "dense"
    LlamaForCausalLM(config).save_pretrained(path)
    return path
