"""Tiny random models, tokenizers and banks for tests and examples: every code path of emokern on a CPU in
milliseconds, with no download. Their text is gibberish; what they prove is that the machinery runs and keeps its
promises (steering touches only what it should, monitoring reads what was steered, runs resume).

* :mod:`emokern.testing.families`: one tiny model per supported architecture family (:data:`~.families.FAMILIES`:
  Llama, Mistral, Qwen2, Qwen3, Gemma 3, GPT-2) from a random config, and a random bank with generic emotion names
  (:func:`~.families.tiny_model`, :func:`~.families.tiny_bank`);
* :mod:`emokern.testing.chat`: a chat model for experiments and examples: a byte-level tokenizer with a chat template
  (:func:`~.chat.tiny_chat_tokenizer`), a 4-layer Llama (:func:`~.chat.tiny_chat_model`), and banks over real
  emotion names, random (:func:`~.chat.tiny_chat_bank`) or with statistics measured on the model
  (:func:`~.chat.calibrated_chat_bank`);
* :mod:`emokern.testing.words`: word-level tokenizers (one token per word, ids from a list) for tests that plant
  words (:func:`~.words.word_tokenizer`, :func:`~.words.vocab_of`);
* :mod:`emokern.testing.processes`: :func:`~.processes.sigkill_when`, killing a child mid-run for the resume tests;
* :mod:`emokern.testing.available`: :func:`~.available.model_available`, whether an embedded model is on disk (the
  tests that need the real SmolLM2 skip without it).

Nothing here is imported by ``import emokern``; transformers and tokenizers are imported when a builder is called.
"""

from emokern.testing.chat import calibrated_chat_bank, tiny_chat_bank, tiny_chat_model, tiny_chat_tokenizer
from emokern.testing.families import tiny_bank, tiny_model
from emokern.testing.words import vocab_of, word_tokenizer

__all__ = ["calibrated_chat_bank", "tiny_bank", "tiny_chat_bank", "tiny_chat_model", "tiny_chat_tokenizer",
           "tiny_model", "vocab_of", "word_tokenizer"]
