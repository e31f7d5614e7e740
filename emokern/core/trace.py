"""``Trace``: the per-token projections recorded by a patched model, and what people do with them.

A trace holds, for a batch of B sequences of T token positions (cache positions, so left padding included), the
projection of every token onto every vector of the bank at every patched site: ``projections`` (B, T, S, K) fp32,
with ``NaN`` where a position was never fed through the model (e.g. the last generated token).

Two things every reader of a real trace meets:

* **Attention sinks.**  The first position(s) of a sequence (``<|im_start|>``, ``<bos>``, sometimes the next one or
  two) carry a residual stream hundreds of times larger than ordinary tokens, so they project ~100x-300x larger
  onto every vector.  :meth:`Trace.sink_positions` finds them with an exact rule (see there); the pictures in
  :mod:`emokern.core.trace_plots` keep them out of their scales.
* **Token text.**  :attr:`Trace.tokens` holds the text each token contributes to the decoded string
  (:meth:`Trace.decode_tokens`), not raw BPE pieces such as ``ĠYou`` / ``Ċ``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from emokern.util.names import did_you_mean

__all__ = ["Trace", "SINK_FACTOR"]

# A position is an attention sink when the norm of its projections over all emotions is more than this many times
# the sequence's median (see Trace.sink_positions for the rule and the evidence behind the number: 5 greys out
# genuine single-emotion peaks, real sinks are 30-400x).
SINK_FACTOR = 10.0


@dataclass
class Trace:
    """Recorded projections with their tokens.

    Attributes:
        projections: (B, T, S, K) fp32 on CPU; NaN where a position was not processed.
        token_ids: (B, T) int64.
        tokens: B lists of T token strings: the text each token adds to the decoded sequence (" You", "\\n",
            "<|im_start|>"; see :meth:`decode_tokens`), as filled by :meth:`emokern.engines.hf.PatchHandle.trace`.
        is_prompt: (B, T) bool — prompt positions (padding excluded).
        is_pad: (B, T) bool — left-padding positions.
        sites: S site names, e.g. ``"layer12.residual"``.
        names: K vector (emotion) names.
        neutral_mean / neutral_std: optional (S, K) calibration statistics on neutral text, for :meth:`zscores`.
    """

    projections: torch.Tensor
    token_ids: torch.Tensor
    tokens: List[List[str]]
    is_prompt: torch.Tensor
    is_pad: torch.Tensor
    sites: List[str]
    names: List[str]
    neutral_mean: Optional[torch.Tensor] = None
    neutral_std: Optional[torch.Tensor] = None

    @property
    def is_generated(self) -> torch.Tensor:
        """(B, T) bool — generated positions."""
        return ~self.is_prompt & ~self.is_pad

    @property
    def has_neutral_stats(self) -> bool:
        """True when both ``neutral_mean`` and ``neutral_std`` are set, i.e. :meth:`zscores` works.

        The pictures of :mod:`emokern.core.trace_plots` show z-scores by default exactly when this is True.
        """
        return self.neutral_mean is not None and self.neutral_std is not None

    @staticmethod
    def decode_tokens(tokenizer, ids: Sequence[int]) -> List[str]:
        """The text each token of ``ids`` contributes when the whole sequence is decoded.

        ``tokenizer.decode`` is called (``skip_special_tokens=False, clean_up_tokenization_spaces=False``) on short
        windows and each token gets the new text its window gained, so byte-level BPE pieces come out as text
        (``ĠYou`` -> ``" You"``, ``Ċ`` -> ``"\\n"``), SentencePiece ``▁`` as a space, special tokens as their own
        text (``"<|im_start|>"``), and ``"".join(result) == tokenizer.decode(ids, skip_special_tokens=False,
        clean_up_tokenization_spaces=False)`` for the usual (byte-level BPE, SentencePiece) tokenizers.

        A character split across several tokens (byte-level BPE cuts multi-byte UTF-8 characters, e.g. ``日`` into
        three pieces) goes **whole to the token that completes it**; the tokens before it in the split get ``""``.
        So no string contains U+FFFD for a split character.  Only bytes that never form a valid character (an
        incomplete one at the very end of ``ids``, or invalid UTF-8) decode to U+FFFD, as ``tokenizer.decode`` does.

        Cost: two decodes of a few tokens per token (the window restarts one emitted token back, like incremental
        detokenizers in serving engines, which keeps SentencePiece's leading-space handling identical on both sides
        of the difference).
        """
        ids = [int(i) for i in ids]

        def dec(chunk: List[int]) -> str:
            if not chunk:
                return ""
            try:
                return tokenizer.decode(chunk, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            except TypeError:  # a decode() without those keywords
                return tokenizer.decode(chunk)

        out = [""] * len(ids)
        prefix = read = 0  # ids[prefix:read]: already emitted context the next window starts from
        prefix_text = ""
        for i in range(len(ids)):
            text = dec(ids[prefix:i + 1])
            last = i + 1 == len(ids)
            if not last and (text.endswith("\ufffd") or len(text) <= len(prefix_text)):
                continue  # an incomplete character (or nothing new yet): the token that completes it gets the text
            out[i] = text[len(prefix_text):]
            prefix, read = read, i + 1
            prefix_text = dec(ids[prefix:read])
        return out

    def site_index(self, site: Union[int, str, None]) -> int:
        """The index into :attr:`sites` of ``site``: a site name (``KeyError`` when absent), an index (returned as
        an int, unchecked, so negative indices count from the end), or ``None`` for the default site: the only one,
        else the middle one (``len(sites) // 2``)."""
        if site is None:
            return len(self.sites) - 1 if len(self.sites) == 1 else len(self.sites) // 2
        if isinstance(site, str):
            if site not in self.sites:
                raise KeyError(f"site {site!r} is not in this trace; sites: {self.sites}")
            return self.sites.index(site)
        return int(site)

    def _emotion(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"emotion {name!r} is not in this trace{did_you_mean(name, self.names)}")
        return self.names.index(name)

    def sink_positions(self, site: Union[int, str, None] = None, sequence: int = 0, *,
                       factor: float = SINK_FACTOR) -> torch.Tensor:
        """(T,) bool — the attention-sink positions of one sequence at one site.

        Rule: the sequence's first valid position is always a sink (decoder models park attention on the first
        token, and its residual stream is an outlier at nearly every layer: at the last layer of SmolLM2-135M its
        projections are only about 6x the median in norm, yet its z-score on one emotion reached -53 where the rest
        of a chat stayed within +-15). Besides it: let ``n[t]`` be the L2 norm of the raw projection vector
        ``projections[sequence, t, site, :]`` over all K vectors (emotions), and ``m`` the median of ``n`` over the
        sequence's *valid* positions (not padding, processed, i.e. finite); for an even count ``m`` is the lower
        middle value (``torch.median``).  Position ``t`` is also a sink iff it is valid and ``n[t] > factor * m``.  Padding and unprocessed (NaN) positions are
        never sinks; when ``m`` is 0 (most positions project exactly nothing) only the first is; and since ``m`` is a
        median, at most half the valid positions (and the first) can be sinks.  The rule uses raw projections whatever the
        picture shows (z-scores are an affine per-emotion rescaling of the same positions).

        ``factor`` (default :data:`SINK_FACTOR` = 10, not 5; evidence from SmolLM2-135M-Instruct, the one real model
        at hand: a 158-token chat, residual stream at layers 8/12/15/20/25 of 30, projected on 1, 2, 4, 14 and 171
        directions, random or emotion-like mean differences; plus a recorded 1153-token episode, layer 19, K = 2,
        z-scores).  Sink ratios ``n[0] / m`` at layers >= 12: 35-440 for every emotion-like direction set and for
        K >= 2 (one random single direction: 5.5); the recorded episode: 153.  Every other position: <= 4.2 for
        K >= 2, but up to 5.2 (raw) and 6.1 (z-scores) for K = 1, where a factor of 5 would grey out genuine
        emotion peaks.  At layer 8 the sinks are weak (6-9x, and an early "the" at 5-16x): 10 misses those, which
        costs little, because a 6-9x value only clips at the end of the colour scale instead of flattening it.
        Pass ``factor=5`` for a more eager rule on traces with many emotions (K >= 14 stayed below 2x there).
        """
        if not factor > 0:
            raise ValueError(f"factor must be > 0; got {factor}")
        norm = self.projection_norms(site, sequence)
        valid = ~self.is_pad[sequence] & torch.isfinite(norm)
        if not bool(valid.any()):
            return torch.zeros_like(valid)
        first = torch.zeros_like(valid)
        first[int(valid.nonzero()[0])] = True
        m = float(norm[valid].median())
        if not m > 0:
            return first
        return first | (valid & (norm > factor * m))

    def projection_norms(self, site: Union[int, str, None] = None, sequence: int = 0) -> torch.Tensor:
        """(T,) float64: at each position of one sequence, the L2 norm over all K emotions of the raw projections at
        one site (NaN where the position was not processed); the quantity :meth:`sink_positions` compares."""
        return self.projections[sequence, :, self.site_index(site), :].double().norm(dim=-1)

    def values(self, emotion: str, *, site: Union[int, str, None] = None, sequence: int = 0,
               zscore: bool = False, window: int = 1, mask_sinks: bool = False) -> torch.Tensor:
        """(T,) projections of one emotion at one site for one sequence (NaN at padding / unprocessed).

        ``zscore``: standardise by the neutral statistics (:meth:`zscores`).  ``mask_sinks``: also NaN at
        :meth:`sink_positions` (same site and sequence, default factor) — applied *before* the moving average, so a
        sink neither shows nor leaks into the next ``window - 1`` averages.  ``window``: trailing moving average
        (:meth:`smooth_values`, NaN positions skipped and kept NaN).
        """
        data = self.zscores() if zscore else self.projections
        v = data[sequence, :, self.site_index(site), self._emotion(emotion)].clone()
        v[self.is_pad[sequence]] = float("nan")
        if mask_sinks:
            v[self.sink_positions(site, sequence)] = float("nan")
        return self.smooth_values(v, window) if window > 1 else v

    def zscores(self) -> torch.Tensor:
        """(B, T, S, K) projections standardised by the bank's neutral-text statistics."""
        if self.neutral_mean is None or self.neutral_std is None:
            raise ValueError("this trace has no calibration statistics (the bank has no neutral_mean/neutral_std)")
        return (self.projections - self.neutral_mean) / self.neutral_std.clamp(min=1e-6)

    @staticmethod
    def smooth_values(values: torch.Tensor, window: int) -> torch.Tensor:
        """Trailing moving average over the last dimension, ignoring NaN; NaN positions (padding, never processed)
        stay NaN rather than borrowing their neighbours' values."""
        if window < 1:
            raise ValueError(f"window must be >= 1; got {window}")
        valid = ~torch.isnan(values)
        filled = torch.where(valid, values, torch.zeros_like(values))
        csum = torch.nn.functional.pad(filled.cumsum(-1), (1, 0))
        ccount = torch.nn.functional.pad(valid.to(values.dtype).cumsum(-1), (1, 0))
        idx = torch.arange(values.shape[-1])
        lo = (idx + 1 - window).clamp(min=0)
        total = csum[..., idx + 1] - csum[..., lo]
        count = ccount[..., idx + 1] - ccount[..., lo]
        return torch.where(valid, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    def smooth(self, window: int, *, mask: Optional[torch.Tensor] = None) -> "Trace":
        """A copy with every series replaced by its trailing moving average over ``window`` tokens (:meth:`smooth_values`).

        Padding positions, and the positions where the optional (B, T) bool ``mask`` is True (at every site and
        emotion, e.g. attention sinks), are set to NaN first: they stay NaN and enter no average."""
        hidden = self.is_pad if mask is None else self.is_pad | mask
        series = self.projections.masked_fill(hidden[:, :, None, None], float("nan")).permute(0, 2, 3, 1)
        proj = self.smooth_values(series, window).permute(0, 3, 1, 2).contiguous()
        return Trace(proj, self.token_ids, self.tokens, self.is_prompt, self.is_pad, self.sites, self.names,
                     self.neutral_mean, self.neutral_std)

    def top_emotions(self, k: int = 5, *, site: Union[int, str, None] = None, sequence: int = 0,
                     zscore: bool = False) -> List[List[tuple]]:
        """For each position of one sequence: the ``k`` highest ``(emotion, value)`` pairs ([] at padding)."""
        data = (self.zscores() if zscore else self.projections)[sequence, :, self.site_index(site)]
        out = []
        for t in range(data.shape[0]):
            if bool(self.is_pad[sequence, t]) or bool(torch.isnan(data[t]).all()):
                out.append([])
                continue
            vals, idx = data[t].topk(min(k, data.shape[1]))
            out.append([(self.names[int(i)], float(v)) for v, i in zip(vals, idx)])
        return out

    def to_dict(self, *, sites: Optional[Sequence[Union[int, str]]] = None) -> dict:
        """JSON-ready dict (NaN as null). ``sites`` limits the exported sites (default: all)."""
        site_idx = [self.site_index(s) for s in sites] if sites is not None else list(range(len(self.sites)))
        proj = self.projections[:, :, site_idx]
        as_list = [[[[None if v != v else round(v, 5) for v in k_vals] for k_vals in t_vals] for t_vals in b_vals]
                   for b_vals in proj.tolist()]
        return {
            "names": self.names, "sites": [self.sites[i] for i in site_idx], "tokens": self.tokens,
            "token_ids": self.token_ids.tolist(), "is_prompt": self.is_prompt.tolist(), "is_pad": self.is_pad.tolist(),
            "projections": as_list,
        }

    def to_json(self, path: Union[str, os.PathLike], **kwargs) -> Path:
        """Write :meth:`to_dict` to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(**kwargs)))
        return path
