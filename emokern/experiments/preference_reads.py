"""The preferences experiment's reads of the model (:mod:`emokern.experiments.preferences` holds the method):

* :class:`PairPrompts` and :func:`score_pairs`: the prompt "Would you prefer to (A) {a} or (B) {b}?" for every
  ordered pair of activities, and ``logit("A") − logit("B")`` after the prefill "(" for a batch of pairs, optionally
  steered on the tokens of chosen activities, with the shared opening run once as a KV cache;
* :func:`probe_text` and :func:`probe_values`: the probe prompt "How would you feel about {activity}?" and each
  bank emotion's projection averaged over the activity's tokens.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from emokern.core.chat import chat_text
from emokern.util.kv_cache import cache_argument

__all__ = ["ANSWERS", "ANSWER_PREFILL", "PAIR_PROMPT", "PROBE_PROMPT", "PairPrompts", "ordered_pairs", "probe_text",
           "probe_values", "score_pairs"]

PAIR_PROMPT = "Would you prefer to (A) {a} or (B) {b}?"
PROBE_PROMPT = "How would you feel about {activity}?"
ANSWER_PREFILL = "("
ANSWERS = ("A", "B")


def ordered_pairs(n: int) -> List[Tuple[int, int]]:
    """Every ordered pair ``(a, b)`` of distinct indices in ``range(n)``: n·(n−1) pairs, each once."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


def _token_span(offsets: Sequence[Tuple[int, int]], start: int, end: int) -> Tuple[int, int]:
    """``(first, last + 1)`` of the tokens whose character range overlaps ``[start, end)``, as the patch places a
    text scope (a token that carries a leading space with the first word belongs to the span)."""
    tokens = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
    if not tokens:
        raise ValueError(f"no token covers characters {start}..{end}")
    return tokens[0], tokens[-1] + 1


def _find_content(text: str, content: str) -> int:
    """Where the user turn ``content`` starts in the templated ``text`` (the last occurrence: a system prompt may
    quote anything)."""
    at = text.rfind(content)
    if at < 0:
        raise ValueError(f"preferences: the chat template changed the user turn {content!r}, so the activity tokens "
                         f"cannot be located in {text!r}")
    return at


def _offsets(tokenizer, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(f"preferences: the tokenizer gives no offset mapping ({exc}); activity token spans need a "
                         f"fast tokenizer") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


class PairPrompts:
    """The tokenized preference prompts of a set of activities.

    For the ordered pair ``(a, b)``: :meth:`text` (the chat-templated prompt ending in the prefill "("),
    :meth:`ids` (token ids), :meth:`spans` (token ranges ``[start, end)`` of activity a and of activity b in
    :meth:`ids`, counted without padding). :attr:`answer_ids` are the ids of "A" and "B" right after "(";
    :attr:`prefix` the token ids every prompt starts with, all before the first activity.
    """

    def __init__(self, tokenizer, texts: Sequence[str]):
        if len(texts) < 2:
            raise ValueError(f"PairPrompts: pairs need at least 2 activities; got {len(texts)}")
        self.tokenizer, self.texts = tokenizer, list(texts)
        self._cache: Dict[Tuple[int, int], Tuple[List[int], Tuple[Tuple[int, int], Tuple[int, int]]]] = {}
        self.answer_ids = self._answer_ids()
        first = [self.ids(a, b)[:self.spans(a, b)[0][0]] for a, b in ordered_pairs(len(self.texts))]
        prefix = first[0]
        for ids in first[1:]:
            n = next((k for k, (x, y) in enumerate(zip(prefix, ids)) if x != y), min(len(prefix), len(ids)))
            prefix = prefix[:n]
        self.prefix = prefix

    def text(self, a: int, b: int) -> str:
        content = PAIR_PROMPT.format(a=self.texts[a], b=self.texts[b])
        return chat_text(self.tokenizer, [{"role": "user", "content": content}], prefill=ANSWER_PREFILL)

    def _encode(self, a: int, b: int):
        if (a, b) not in self._cache:
            text = self.text(a, b)
            content = PAIR_PROMPT.format(a=self.texts[a], b=self.texts[b])
            at = _find_content(text, content)
            a_start = at + PAIR_PROMPT.index("{a}")
            b_start = a_start + len(self.texts[a]) + len(PAIR_PROMPT.split("{a}")[1].split("{b}")[0])
            ids, offsets = _offsets(self.tokenizer, text)
            spans = (_token_span(offsets, a_start, a_start + len(self.texts[a])),
                     _token_span(offsets, b_start, b_start + len(self.texts[b])))
            self._cache[(a, b)] = (ids, spans)
        return self._cache[(a, b)]

    def ids(self, a: int, b: int) -> List[int]:
        return self._encode(a, b)[0]

    def spans(self, a: int, b: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        return self._encode(a, b)[1]

    def _answer_ids(self) -> Tuple[int, int]:
        text = self.text(0, 1)
        base = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for answer in ANSWERS:
            ids = self.tokenizer(text + answer, add_special_tokens=False)["input_ids"]
            if len(ids) != len(base) + 1 or ids[:len(base)] != base:
                tail = self.tokenizer.convert_ids_to_tokens(ids[-3:])
                raise ValueError(f"preferences: the tokenizer does not encode {answer!r} after "
                                 f"{ANSWER_PREFILL!r} as one extra token (the prompt ends in {tail}); the preference "
                                 f"read needs single-token answers")
            out.append(ids[-1])
        return out[0], out[1]


def _base_and_head(model):
    """The model's decoder stack (``model.base_model``), its output embedding and its final logit soft-cap."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("preferences: the model has no output embedding (model.get_output_embeddings())")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return model.base_model, head, getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def score_pairs(model, prompts: PairPrompts, pairs: Sequence[Tuple[int, int]], *, handle=None,
                steer: Optional[Dict[str, float]] = None, steered: Sequence[bool] = (),
                layers: Optional[Sequence[int]] = None) -> Tuple[List[float], List[float]]:
    """One batched forward over ``pairs``; returns ``(diffs, answer_mass)``: ``logit(A) − logit(B)`` (float32) and
    ``P(A) + P(B)`` at the answer position, one per pair.

    With ``handle`` (a patch) and ``steer`` (``{emotion: strength}``), each row is steered at ``layers`` on the
    tokens of whichever of its two activities have ``steered[i]`` True; rows without one are not steered. The handle's
    steering settings are replaced, and cleared afterwards.

    Layout: the shared prefix runs once (unsteered: it holds no activity) and is reused as a KV cache; each row's
    remaining tokens follow it, left padded, with position ids that skip the padding.
    """
    base, head, softcap = _base_and_head(model)
    device = head.weight.device
    P = len(prompts.prefix)
    tails = [prompts.ids(a, b)[P:] for a, b in pairs]
    B, S = len(pairs), max(len(t) for t in tails)
    pad_id = prompts.tokenizer.pad_token_id if prompts.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, t in enumerate(tails):
        input_ids[i, S - len(t):] = torch.tensor(t)
        mask[i, S - len(t):] = 1
    positions = P + (mask.cumsum(1) - 1).clamp(min=0)
    if handle is not None:
        handle.clear_steering()
    cache_arg = cache_argument(base)
    first = base(input_ids=torch.tensor([prompts.prefix], device=device), use_cache=True)
    prefix = getattr(first, cache_arg)
    prefix.batch_repeat_interleave(B)
    if handle is not None and steer:
        # The patch places spans by cache position. Padding sits between the shared prefix and each row's tail,
        # which its left-padding model cannot describe, so it is told "no padding" (an all-ones mask) and given
        # absolute cache positions: token k (k >= P) of row i is at k + pad_i.
        width = P + S
        handle.reserve(batch=B, tokens=width)
        handle.prepare(torch.zeros(B, width, dtype=torch.long), torch.ones(B, width, dtype=torch.long))
        rows_of: Dict[Tuple[Tuple[int, int], ...], List[int]] = {}
        for i, (a, b) in enumerate(pairs):
            pad = S - len(tails[i])
            spans = tuple((s + pad, e + pad) for (s, e), x in zip(prompts.spans(a, b), (a, b)) if steered[x])
            if spans:
                rows_of.setdefault(spans, []).append(i)
        # one steer() call per distinct set of spans, for all the rows that share it
        for spans, rows in rows_of.items():
            handle.steer(dict(steer), sequences=rows, layers=list(layers) if layers is not None else None,
                         scope=list(spans))
    try:
        full_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
        h = base(input_ids=input_ids.to(device), attention_mask=full_mask.to(device),
                 position_ids=positions.to(device), use_cache=True, **{cache_arg: prefix}).last_hidden_state[:, -1]
    finally:
        if handle is not None:
            handle.clear_steering()
    logits = head(h).float()
    rows = head.weight[list(prompts.answer_ids)].float()
    pair_logits = h.float() @ rows.T
    if getattr(head, "bias", None) is not None:
        pair_logits = pair_logits + head.bias[list(prompts.answer_ids)].float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
        pair_logits = softcap * torch.tanh(pair_logits / softcap)
    probs = logits.softmax(-1)
    mass = probs[:, prompts.answer_ids[0]] + probs[:, prompts.answer_ids[1]]
    diffs = pair_logits[:, 0] - pair_logits[:, 1]
    return diffs.cpu().tolist(), mass.cpu().tolist()



def probe_text(tokenizer, activity: str) -> str:
    """The probe prompt of ``activity``: :data:`PROBE_PROMPT` as the user turn, the assistant's turn opened."""
    return chat_text(tokenizer, [{"role": "user", "content": PROBE_PROMPT.format(activity=activity)}])


@torch.no_grad()
def probe_values(model, handle, texts: Sequence[str]) -> List[List[float]]:
    """For each activity text: the mean over its tokens in the probe prompt and over the handle's patched layers of
    the projection onto every bank emotion (z-scored when the bank has neutral statistics); one K-list per text.

    ``handle``: a monitoring patch on the probe layers, with the tokenizer.
    """
    tokenizer = handle.tokenizer
    prompts = [probe_text(tokenizer, t) for t in texts]
    spans = []
    for prompt, text in zip(prompts, texts):
        content = PROBE_PROMPT.format(activity=text)
        start = _find_content(prompt, content) + PROBE_PROMPT.index("{activity}")
        spans.append(_token_span(_offsets(tokenizer, prompt)[1], start, start + len(text)))
    handle.clear_steering()
    input_ids, mask = handle.prepare(prompts=prompts)
    handle.reserve(tokens=input_ids.shape[1])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    trace = handle.trace(input_ids, attention_mask=mask)
    data = trace.zscores() if trace.neutral_mean is not None and trace.neutral_std is not None else trace.projections
    pads = (~mask.bool()).sum(1).tolist()
    return [data[i, pads[i] + s:pads[i] + e].double().mean(dim=(0, 1)).tolist() for i, (s, e) in enumerate(spans)]
