"""One tiny random-config model per supported architecture family, and a random bank for it.

Every model has :data:`LAYERS` decoder layers of width :data:`HIDDEN` and a vocabulary of :data:`VOCAB` ids (no
tokenizer: tests feed ids), 4 attention heads (2 key/value heads where the family has grouped-query attention) and
256 positions, in eval mode.
"""

from __future__ import annotations

import torch

from emokern.core.bank import VectorBank

__all__ = ["FAMILIES", "HIDDEN", "LAYERS", "VOCAB", "tiny_bank", "tiny_model"]

HIDDEN = 32
LAYERS = 3
VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")  # the ``model_type`` of each


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised causal LM of ``family`` (one of :data:`FAMILIES`), weights fixed by ``seed``
    (``torch.manual_seed(seed)`` first: the global generator is reseeded), cast to ``dtype``, in eval mode.
    KeyError for another family."""
    import transformers as tf

    torch.manual_seed(seed)
    shared = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**shared, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                  sliding_window=16)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        }[family]
        cfg = config_cls(**shared, intermediate_size=64, num_key_value_heads=2)
        model = model_cls(cfg)
    return model.to(dtype).eval()


def tiny_bank(model: torch.nn.Module, K: int = 6, seed: int = 1, norm: float = 2.0) -> VectorBank:
    """A bank of ``K`` random (unnormalised, standard normal) vectors per layer for a :func:`tiny_model`, named
    ``emotion0`` … ``emotion{K-1}``, at every layer, with residual norm ``norm`` at each; drawn from its own
    ``torch.Generator`` seeded with ``seed`` (the global generator is untouched). No neutral statistics."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(LAYERS, K, HIDDEN, generator=g)
    return VectorBank.from_tensors(vectors, [f"emotion{i}" for i in range(K)],
                                   residual_norm=torch.full((LAYERS,), norm), model=model)
