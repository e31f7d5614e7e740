"""Tiny random-config models of every supported family (no downloads), and banks for them."""

import torch

import emokern

HIDDEN = 32
LAYERS = 3
VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**common, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                  sliding_window=16)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        }[family]
        cfg = config_cls(**common, intermediate_size=64, num_key_value_heads=2)
        model = model_cls(cfg)
    return model.to(dtype).eval()


def tiny_bank(model, K: int = 6, seed: int = 1, norm: float = 2.0) -> "emokern.VectorBank":
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(LAYERS, K, HIDDEN, generator=g)
    return emokern.VectorBank.from_tensors(vectors, [f"emotion{i}" for i in range(K)],
                                           residual_norm=torch.full((LAYERS,), norm), model=model)
