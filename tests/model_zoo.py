"""Tiny random models of every supported decoder family, each built from the family's own
``transformers`` config class (no downloads): 2 layers, hidden 32-64, vocabulary 300."""

from __future__ import annotations

from typing import Any

import torch

_COMMON = dict(vocab_size=300, num_hidden_layers=2, max_position_embeddings=128)

# family name -> (transformers config class name, keyword arguments)
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, sliding_window=8,
                                    query_pre_attn_scalar=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=48,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, sliding_window=8,
                                             query_pre_attn_scalar=8,
                                             layer_types=["sliding_attention",
                                                          "full_attention"])),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2)),
    "olmo2": ("Olmo2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, pad_token_id=0, eos_token_id=2)),
    "granite": ("GraniteConfig", dict(hidden_size=32, intermediate_size=48,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3, logits_scaling=1.5)),
    "stablelm": ("StableLmConfig", dict(hidden_size=32, intermediate_size=48,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        use_qkv_bias=True)),
    "stablelm_qk_norm": ("StableLmConfig", dict(hidden_size=32, intermediate_size=48,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                qk_layernorm=True,
                                                use_parallel_residual=True)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=48,
                                       num_attention_heads=4, rotary_pct=0.5)),
    "falcon": ("FalconConfig", dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                                    num_kv_heads=2, new_decoder_architecture=True,
                                    bias=True)),
    "falcon_mq": ("FalconConfig", dict(hidden_size=32, num_attention_heads=4, multi_query=True,
                                       parallel_attn=True, bias=False)),
    "falcon_mha": ("FalconConfig", dict(hidden_size=32, num_attention_heads=4,
                                        multi_query=False, parallel_attn=False, bias=True)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_attention_heads=4,
                              word_embed_proj_dim=32, do_layer_norm_before=True)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              partial_rotary_factor=0.5)),
}


def zoo_config(family: str, **overrides: Any) -> Any:
    import transformers

    cls_name, kwargs = ZOO[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})


def zoo_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random model; biases and norm weights are randomised too (transformers starts
    them at 0 and 1), so that slicing them is exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(zoo_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ("norm" in name and p.dim() == 1):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
