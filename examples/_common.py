"""What every example shares: loading a model, its tokenizer and an emotion bank, and the chat prompt.

By default the examples use the embedded SmolLM2-135M-Instruct (``emokern.core.models.load_model``, offline) and the
bank ``make demo`` / ``emokern extract`` leave in ``emokern_out/bank/`` (built here when it is missing: about seven
minutes on a 2-core CPU, from the story corpus shipped in the package).

``--tiny`` swaps both for a randomly initialised 4-layer Llama with a byte-level tokenizer and a random bank over
real emotion names, built in well under a second without any download. Its text is gibberish, but every code path
is the real one, which is what lets the tests in ``tests/test_examples.py`` run each example in a few seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import transformers

import emokern
from emokern.core.models import DEFAULT_MODEL, load_model

OUT_ROOT = Path("emokern_out") / "examples"

# The tiny model: small enough that a forward pass costs microseconds, large enough for 4 heads and 2 KV heads.
TINY_HIDDEN, TINY_LAYERS = 32, 4
TINY_SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Every emotion the examples and the sycophancy experiment name, so that --tiny runs the same code as the real bank.
TINY_EMOTIONS = ["happy", "calm", "desperate", "afraid", "nervous", "hostile", "loving", "angry", "sad", "proud",
                 "guilty", "inspired", "bored", "blissful"]


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model and bank instead of SmolLM2 (seconds; what the tests run)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to load (default: {DEFAULT_MODEL})")
    parser.add_argument("--bank", default=None,
                        help="bank path (default: emokern_out/bank/<model>.json, built there if missing)")
    return parser


def load(args: argparse.Namespace) -> Tuple[torch.nn.Module, "transformers.PreTrainedTokenizerBase",
                                            emokern.VectorBank]:
    """``(model, tokenizer, bank)`` for the parsed arguments (see :func:`add_model_arguments`)."""
    if args.tiny:
        model, tokenizer = tiny_model()
        return model, tokenizer, tiny_bank(model, tokenizer)
    started = time.perf_counter()
    # bfloat16 is what `emokern demo` runs in: on a CPU it halves the memory traffic of every matmul.
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
    bank = emokern.VectorBank.load(real_bank_path(args.model, args.bank, model, tokenizer), model=model)
    print(f"loaded {args.model} and its bank ({len(bank.names)} emotions x {len(bank.layers)} layers) in "
          f"{time.perf_counter() - started:.1f} s")
    return model, tokenizer, bank


def real_bank_path(model_name: str, bank: Optional[str], model=None, tokenizer=None) -> Path:
    """The bank to use: ``bank`` when given, else the one ``emokern extract`` writes, extracted first if missing."""
    if bank is not None:
        return Path(bank)
    from emokern.experiments import default_bank_path
    from emokern.pipeline import extract

    path = default_bank_path(model_name)
    if not path.is_file():
        print(f"no bank at {path}: extracting one (minutes; `make demo` does the same)")
        path = extract(model_name, path.parent.parent, model=model, tokenizer=tokenizer)
    return path


def chat_prompt(tokenizer, user_message: str) -> str:
    """The prompt text for one user turn, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True)


def tiny_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """One token per byte (any text encodes) plus the chat's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in TINY_SPECIAL:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                     additional_special_tokens=TINY_SPECIAL[2:])
    tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0):
    """A random 4-layer Llama and its byte-level tokenizer; ``seed`` fixes the weights."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


@torch.no_grad()
def tiny_bank(model, tokenizer, seed: int = 1) -> emokern.VectorBank:
    """Random vectors over real emotion names, with the statistics a real bank carries measured on the model.

    The residual norms are the model's own mean hidden-state norms per layer, so that steering strengths (fractions
    of that norm) push the tiny model as hard as they push a real one; the neutral mean and spread of the
    projections make the traces' z-scores work.
    """
    ids = tokenizer(chat_prompt(tokenizer, "Tell me about your day, and what you are planning for tomorrow."),
                    return_tensors="pt", add_special_tokens=False)["input_ids"]
    # The decoder layers' outputs, which is what emokern.engines.hf reads ("residual"); output_hidden_states would give
    # the final norm's output in place of the last layer's.
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
    # One random direction per emotion, nearly the same at every layer, as real emotion vectors are similar at
    # neighbouring layers (SmolLM2's bank: cosine 0.88 between layers 19 and 20): what steering adds at one layer
    # is then read back at the next.
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(TINY_EMOTIONS), TINY_HIDDEN, generator=g)
    vectors = directions + 0.2 * torch.randn(TINY_LAYERS, len(TINY_EMOTIONS), TINY_HIDDEN, generator=g)
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    projections = torch.einsum("ltd,lkd->ltk", hidden, unit)
    # Like a real bank, read at the last layer and steer at two thirds of the depth: the effect of steering is then
    # visible downstream of it.
    layers = {"chosen": TINY_LAYERS - 1, "two_thirds": round(2 / 3 * (TINY_LAYERS - 1))}
    bank = emokern.VectorBank.from_tensors(vectors, TINY_EMOTIONS, residual_norm=hidden.norm(dim=-1).mean(dim=1),
                                           model=model, metadata={
                                               "default_layer": layers,
                                               "model": {"model_type": "llama", "num_hidden_layers": TINY_LAYERS}})
    bank.neutral_mean = projections.mean(dim=1)
    bank.neutral_std = projections.std(dim=1)
    return bank


def out_dir(args: argparse.Namespace, name: str) -> Path:
    """``--out`` when given, else ``emokern_out/examples/NAME`` (``NAME-tiny`` for the tiny model)."""
    path = Path(args.out) if args.out else OUT_ROOT / (f"{name}-tiny" if args.tiny else name)
    path.mkdir(parents=True, exist_ok=True)
    return path
