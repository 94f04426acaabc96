"""A tiny random config for every model type some registered architecture adapter prunes.

``TINY_CONFIGS[model_type]`` are keyword arguments of ``transformers.AutoConfig.for_model(model_type, **kw)``:
hidden 64, 3 layers, grouped KV heads (g > 1, so a KV group is more than one head), head_dim 16, vocab 128,
special tokens inside the vocab, untied embeddings, and each family's own features switched on (sliding
windows small enough for a 9+ token input, Granite's multipliers, Gemma 2's soft-capping, SmolLM3's NoPE
layers). ``tests/test_architectures.py`` checks that every supported type has an entry here, so a newly
registered adapter fails the suite until it gets one.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128

_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, head_dim=16, max_position_embeddings=64,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
    initializer_range=0.08,  # larger than the default 0.02: logits (and greedy tokens) that depend on the input
)  # fmt: skip


def _decoder(heads: int, kv: int, intermediate: int, **family: Any) -> dict[str, Any]:
    return {**_DECODER, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": intermediate,
            **family}  # fmt: skip


_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _decoder(8, 4, 176),
    "mistral": _decoder(8, 4, 128, sliding_window=4),
    "qwen2": _decoder(4, 2, 96),  # q/k/v biases
    "qwen3": _decoder(8, 4, 112),  # per-head q_norm / k_norm
    "gemma": _decoder(4, 2, 128, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": _decoder(
        8, 4, 144, sliding_window=4, layer_types=_ALTERNATING, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),  # fmt: skip
    "gemma3_text": _decoder(8, 4, 160, sliding_window=4, layer_types=_ALTERNATING, query_pre_attn_scalar=16),
    "granite": _decoder(
        4, 2, 120, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5,
    ),  # fmt: skip
    "smollm3": _decoder(8, 4, 96, no_rope_layers=[1, 0, 1]),  # layer 1 has no rotary embedding (NoPE)
    "phi3": _decoder(4, 2, 112, sliding_window=4, partial_rotary_factor=0.5),  # fused qkv_proj, gate_up_proj
    "cohere": _decoder(8, 4, 104, use_qk_norm=True, logit_scale=0.5),  # per-head q/k LayerNorm weights
    "stablelm": _decoder(4, 2, 136, use_qkv_bias=True),  # partial rotary (0.25 by default), q/k/v biases
    "olmo2": _decoder(8, 4, 120),  # q_norm / k_norm over all heads together
    "olmo3": _decoder(8, 4, 128, sliding_window=4, layer_types=_ALTERNATING),
    # mixture of experts: 4 experts, 2 per token (fused 3-D expert parameters)
    "mixtral": _decoder(8, 4, 48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _decoder(4, 2, 96, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                          shared_expert_intermediate_size=56),  # q/k/v biases; a shared expert beside the experts
    "qwen3_moe": _decoder(8, 4, 96, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                          norm_topk_prob=True),  # per-head q_norm / k_norm like Qwen3
    "t5": dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        tie_word_embeddings=False, initializer_factor=2.0,
    ),  # fmt: skip
    "mt5": dict(  # T5's modules under MT5 names; the original (relu, wi/wo) FFN here, gated in the t5 entry
        vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=80, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        tie_word_embeddings=False, initializer_factor=2.0,
    ),  # fmt: skip
    "umt5": dict(  # a relative position bias in every self-attention, sliced with its heads
        vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        tie_word_embeddings=False, initializer_factor=2.0,
    ),  # fmt: skip
}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])


def is_seq2seq(model_type: str) -> bool:
    return bool(getattr(tiny_config(model_type), "is_encoder_decoder", False))


def model_from_config(config) -> torch.nn.Module:
    """The LM of ``config`` (seq2seq or causal), randomly initialised from the current torch seed, in fp32."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_config(config).float()


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny random model of ``model_type`` in fp32 eval mode."""
    torch.manual_seed(seed)
    return model_from_config(tiny_config(model_type)).eval()
