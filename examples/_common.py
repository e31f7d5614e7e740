"""What every example shares: loading a model, its tokenizer and an emotion bank, the chat prompt, the output folder.

By default the examples use the embedded SmolLM2-135M-Instruct (``emokern.core.models.load_model``, offline) and the
bank ``make demo`` / ``emokern extract`` leave in ``emokern_out/bank/`` (built here when it is missing: about seven
minutes on a 2-core CPU, from the story corpus shipped in the package).

``--tiny`` swaps both for :mod:`emokern.testing.chat`'s randomly initialised 4-layer Llama with a byte-level
tokenizer and a bank over real emotion names whose norms and neutral statistics are measured on it
(:func:`~emokern.testing.chat.calibrated_chat_bank`), built in well under a second without any download. Its text is
gibberish, but every code path is the real one, which is what lets the tests in ``tests/test_examples.py`` run each
example in a few seconds.
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
from emokern.testing.chat import calibrated_chat_bank, tiny_chat_model

OUT_ROOT = Path("emokern_out") / "examples"


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
        model, tokenizer = tiny_chat_model()
        return model, tokenizer, calibrated_chat_bank(model, tokenizer)
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


def out_dir(args: argparse.Namespace, name: str) -> Path:
    """``--out`` when given, else ``emokern_out/examples/NAME`` (``NAME-tiny`` for the tiny model)."""
    path = Path(args.out) if args.out else OUT_ROOT / (f"{name}-tiny" if args.tiny else name)
    path.mkdir(parents=True, exist_ok=True)
    return path
