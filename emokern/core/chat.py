"""Chat prompts as text: :func:`chat_text` puts role/content messages into a tokenizer's chat template, or into the
paper's plain ``Human:`` / ``Assistant:`` turns for a tokenizer without one. Every experiment and the judge build
their prompts with it, so a prompt reads the same wherever it is made."""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["chat_text"]


def chat_text(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
              prefill: str = "") -> str:
    """``messages`` (role/content dicts) in the tokenizer's chat template, then, when ``add_generation_prompt``, the
    assistant's turn opened; ``prefill`` (text the assistant's reply starts with) is appended last. Without a chat
    template, plain ``Human:`` / ``Assistant:`` turns as in the paper's prompts, joined by blank lines (a message of
    another role, e.g. the system's, is its bare content), with ``"\n\nAssistant:"`` as the opened turn and a space
    before a non-empty ``prefill``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    else:
        parts = []
        for m in messages:
            role = {"user": "Human", "assistant": "Assistant"}.get(m["role"])
            parts.append(m["content"] if role is None else f"{role}: {m['content']}")
        text = "\n\n".join(parts) + ("\n\nAssistant:" if add_generation_prompt else "")
        if prefill:
            text += " "
    return text + prefill
