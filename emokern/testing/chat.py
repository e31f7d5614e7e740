"""A tiny random chat model: a byte-level tokenizer with a chat template, a 4-layer Llama, and banks over real
emotion names. The experiments' tests and the examples' ``--tiny`` run on it.

The tokenizer has one token per byte (any text encodes; "é" is 2 tokens, "日" 3) plus :data:`SPECIAL_TOKENS`, and
the chat template :data:`TEMPLATE` (``<|role|>content<eos>`` per message, ``<|assistant|>`` to open the reply). The
model is a Llama of :data:`LAYERS` layers of width :data:`HIDDEN` over those :data:`VOCAB` ids, with 16,384
positions (a multi-turn reward-hacking episode fits).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from emokern.core.bank import VectorBank
from emokern.util.stats import unit_rows

__all__ = ["EMOTIONS", "HIDDEN", "LAYERS", "SPECIAL_TOKENS", "TEMPLATE", "VOCAB", "calibrated_chat_bank",
           "tiny_chat_bank", "tiny_chat_model", "tiny_chat_tokenizer"]

HIDDEN = 32  # small enough that a forward costs microseconds, large enough for 4 heads and 2 key/value heads
LAYERS = 4
SPECIAL_TOKENS = ("<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>")
VOCAB = 256 + len(SPECIAL_TOKENS)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Every emotion the experiments, their tests and the examples name, so that the tiny bank runs their code unchanged.
EMOTIONS = ("happy", "calm", "desperate", "afraid", "blissful", "hostile", "loving", "angry", "sad", "proud",
            "nervous", "guilty", "inspired", "bored")


def tiny_chat_tokenizer(extra_tokens: Sequence[str] = (), merges: Sequence[Tuple[str, str]] = ()):
    """The byte-level chat tokenizer (a ``PreTrainedTokenizerFast``): ids 0–255 are the bytes (in the order of
    ``ByteLevel.alphabet()`` sorted), then ``extra_tokens`` (none by default), then :data:`SPECIAL_TOKENS`; pad
    ``<pad>``, eos ``<eos>``, the role tokens special; chat template :data:`TEMPLATE`. ``merges`` are BPE merges of
    byte-level symbols into ``extra_tokens`` (e.g. ``[("(", "A")]`` with ``extra_tokens=["(A"]`` makes "(A" one
    token), for tests of tokenizers that join what emokern expects apart."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in (*extra_tokens, *SPECIAL_TOKENS):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                     additional_special_tokens=list(SPECIAL_TOKENS[2:]))
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def tiny_chat_model(seed: int = 0):
    """``(model, tokenizer)``: a random :data:`LAYERS`-layer ``LlamaForCausalLM`` in eval mode (hidden
    :data:`HIDDEN`, intermediate 64, 4 heads, 2 key/value heads, 16,384 positions; eos and bos ``<eos>``, pad
    ``<pad>``) and :func:`tiny_chat_tokenizer`. The weights are fixed by ``seed`` (``torch.manual_seed(seed)``
    first: the global generator is reseeded)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def tiny_chat_bank(model, seed: int = 1, emotions: Sequence[str] = EMOTIONS, norm: float = 4.0) -> VectorBank:
    """A bank for :func:`tiny_chat_model`: independent standard-normal vectors per layer and emotion (from a
    ``torch.Generator`` seeded with ``seed``; the global generator is untouched), residual norm ``norm`` at every
    layer, neutral mean 0 and spread 1 (so z-scores equal projections). Quick and fixed: for tests that need a bank,
    not a realistic one."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(LAYERS, len(emotions), HIDDEN, generator=g)
    bank = VectorBank.from_tensors(vectors, list(emotions), residual_norm=torch.full((LAYERS,), norm), model=model)
    bank.neutral_mean = torch.zeros(LAYERS, len(emotions))
    bank.neutral_std = torch.ones(LAYERS, len(emotions))
    return bank


@torch.no_grad()
def calibrated_chat_bank(model, tokenizer, seed: int = 1) -> VectorBank:
    """A bank for :func:`tiny_chat_model` over :data:`EMOTIONS` whose statistics are measured on the model, so that
    steering and z-scores behave as with a real bank:

    * one random direction per emotion, nearly the same at every layer (plus 0.2 × noise per layer), as real emotion
      vectors are similar at neighbouring layers (SmolLM2's bank: cosine 0.88 between layers 19 and 20): what
      steering adds at one layer is read back at the next;
    * residual norms: the model's mean hidden-state norm per layer on one chat prompt, so that a strength (a fraction
      of that norm) pushes the tiny model as hard as it pushes a real one;
    * neutral mean and spread: of the projections on that prompt's tokens;
    * like a real bank, read at the last layer (``default_layer``) and steered at two thirds of the depth.

    Random numbers come from a ``torch.Generator`` seeded with ``seed``; the global generator is untouched.
    """
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about your day, and what you are planning for tomorrow."}],
        tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    # The decoder layers' outputs, which is what the patch reads ("residual"); output_hidden_states would give the
    # final norm's output in place of the last layer's.
    outputs = []
    hooks = [layer.register_forward_hook(
        lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output))
             for layer in model.model.layers]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = torch.stack(outputs)[:, 0]  # (L, T, d)
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(EMOTIONS), HIDDEN, generator=g)
    vectors = directions + 0.2 * torch.randn(LAYERS, len(EMOTIONS), HIDDEN, generator=g)
    projections = torch.einsum("ltd,lkd->ltk", hidden, unit_rows(vectors))
    metadata = {"default_layer": {"chosen": LAYERS - 1, "two_thirds": round(2 / 3 * (LAYERS - 1))},
                "model": {"model_type": "llama", "num_hidden_layers": LAYERS}}
    bank = VectorBank.from_tensors(vectors, list(EMOTIONS), residual_norm=hidden.norm(dim=-1).mean(dim=1),
                                   model=model, metadata=metadata)
    bank.neutral_mean = projections.mean(dim=1)
    bank.neutral_std = projections.std(dim=1)
    return bank
