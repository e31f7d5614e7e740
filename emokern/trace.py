"""``Trace``: the per-token projections recorded by a patched model, and what people do with them.

A trace holds, for a batch of B sequences of T token positions (cache positions, so left padding included), the
projection of every token onto every vector of the bank at every patched site: ``projections`` (B, T, S, K) fp32,
with ``NaN`` where a position was never fed through the model (e.g. the last generated token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from emokern.emotions import did_you_mean

__all__ = ["Trace"]


@dataclass
class Trace:
    """Recorded projections with their tokens.

    Attributes:
        projections: (B, T, S, K) fp32 on CPU; NaN where a position was not processed.
        token_ids: (B, T) int64.
        tokens: B lists of T token strings.
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

    def _site(self, site: Union[int, str, None]) -> int:
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

    def values(self, emotion: str, *, site: Union[int, str, None] = None, sequence: int = 0,
               zscore: bool = False, window: int = 1) -> torch.Tensor:
        """(T,) projections of one emotion at one site for one sequence (NaN at padding / unprocessed)."""
        data = self.zscores() if zscore else self.projections
        v = data[sequence, :, self._site(site), self._emotion(emotion)].clone()
        v[self.is_pad[sequence]] = float("nan")
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

    def smooth(self, window: int) -> "Trace":
        """A copy with every series replaced by its trailing moving average over ``window`` tokens."""
        series = self.projections.masked_fill(self.is_pad[:, :, None, None], float("nan")).permute(0, 2, 3, 1)
        proj = self.smooth_values(series, window).permute(0, 3, 1, 2).contiguous()
        return Trace(proj, self.token_ids, self.tokens, self.is_prompt, self.is_pad, self.sites, self.names,
                     self.neutral_mean, self.neutral_std)

    def top_emotions(self, k: int = 5, *, site: Union[int, str, None] = None, sequence: int = 0,
                     zscore: bool = False) -> List[List[tuple]]:
        """For each position of one sequence: the ``k`` highest ``(emotion, value)`` pairs ([] at padding)."""
        data = (self.zscores() if zscore else self.projections)[sequence, :, self._site(site)]
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
        site_idx = [self._site(s) for s in sites] if sites is not None else list(range(len(self.sites)))
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

    def plot(self, emotions: Sequence[str], path: Union[str, os.PathLike], **kwargs) -> Path:
        """PNG line plot of chosen emotions over tokens (see :func:`emokern.viz.plot_trace`)."""
        from emokern.viz import plot_trace

        return plot_trace(self, emotions, path, **kwargs)

    def heatmap_html(self, emotion: str, path: Union[str, os.PathLike], **kwargs) -> Path:
        """HTML page with tokens coloured by ``emotion``; hover shows the top emotions (see :mod:`emokern.viz`)."""
        from emokern.viz import trace_heatmap_html

        return trace_heatmap_html(self, emotion, path, **kwargs)
