"""The optional LLM judge of the experiments: :class:`ChatJudge`, any chat model answering a YES/NO question about a
transcript with a one-line reason. The experiments' labels come from rules; a judge's verdict is kept beside them."""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

from emokern.core.chat import chat_text

__all__ = ["ChatJudge"]


class ChatJudge:
    """An optional LLM judge: any chat model answers a YES/NO question about a transcript, with a one-line reason.

    ``ChatJudge.load(name_or_path)`` takes what :func:`emokern.core.models.load_model` takes. :meth:`verdict` returns
    ``(answer, reason)`` with ``answer`` True / False, or None when the reply has no YES or NO (the reply is then the
    reason, so nothing is lost).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 48, name: str = "judge"):
        self.model, self.tokenizer, self.max_new_tokens, self.name = model, tokenizer, max_new_tokens, name

    @classmethod
    def load(cls, name_or_path: str, *, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "ChatJudge":
        from emokern.core.models import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, name=str(name_or_path))

    @staticmethod
    def parse(reply: str) -> Tuple[Optional[bool], str]:
        """The first YES or NO word in ``reply`` and the rest as the reason."""
        m = re.search(r"\b(YES|NO|Yes|No|yes|no)\b", reply)
        if m is None:
            return None, reply.strip()
        reason = (reply[:m.start()] + reply[m.end():]).strip(" \n:.-")
        return m.group(1).lower() == "yes", reason or reply.strip()

    @torch.no_grad()
    def verdict(self, question: str, transcript: str) -> Tuple[Optional[bool], str]:
        prompt = (f"Read the transcript below and answer the question.\n\n=== TRANSCRIPT ===\n{transcript}\n"
                  f"=== END ===\n\nQuestion: {question}\nAnswer YES or NO first, then give a one-sentence reason.")
        text = chat_text(self.tokenizer, [{"role": "user", "content": prompt}])
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        out = self.model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.parse(reply)
