"""A tiny random chat model for experiment tests: a byte-level tokenizer (any English text, one token per byte) with a
chat template, a 2-layer Llama with a long context, and a bank over real emotion names (no downloads)."""

import torch
import transformers

import emokern

HIDDEN = 32
LAYERS = 4
SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB = 256 + len(SPECIAL)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
EMOTIONS = ["happy", "calm", "desperate", "afraid", "blissful", "hostile", "loving", "angry", "sad", "proud",
            "nervous", "guilty", "inspired", "bored"]


def tiny_chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for s in SPECIAL:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     additional_special_tokens=SPECIAL[2:])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def tiny_chat_model(seed: int = 0):
    torch.manual_seed(seed)
    tok = tiny_chat_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


def tiny_chat_bank(model, seed: int = 1, emotions=EMOTIONS, norm: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(LAYERS, len(emotions), HIDDEN, generator=g)
    bank = emokern.VectorBank.from_tensors(vectors, list(emotions), residual_norm=torch.full((LAYERS,), norm),
                                           model=model)
    bank.neutral_mean = torch.zeros(LAYERS, len(emotions))
    bank.neutral_std = torch.ones(LAYERS, len(emotions))
    return bank
