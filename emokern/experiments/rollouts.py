"""Batched rollouts with per-sequence steering and what the monitor read: :func:`sample_rollouts` samples one
continuation per (prompt, condition) in one ``generate``, each sequence steered by its own :class:`Condition`, and
:func:`monitor_summary` condenses a sequence's trace into the :class:`Rollout` ``monitor`` means."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from emokern.experiments.conditions import Condition, apply_conditions

__all__ = ["Rollout", "monitor_summary", "sample_rollouts"]


@dataclass
class Rollout:
    """One sampled continuation with its condition and the monitored emotions' projections.

    ``monitor``: ``{emotion: {"prompt": mean over prompt tokens, "assistant_start": value at the last prompt token,
    "rollout": mean over generated tokens, "series": per generated token (when asked for)}}`` at the monitored
    layer, z-scored by the bank's neutral statistics when it has them (``zscored``).
    """

    text: str
    condition: str
    seed: int
    n_tokens: int
    monitor: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    zscored: bool = False




def monitor_summary(trace, emotions: Sequence[str], site: str, seq: int, *, series: bool = True) -> Tuple[dict, bool]:
    """The :class:`Rollout` ``monitor`` dict for sequence ``seq`` of ``trace`` (see there), and whether z-scored."""
    z = trace.neutral_mean is not None and trace.neutral_std is not None
    out = {}
    prompt = trace.is_prompt[seq]
    generated = trace.is_generated[seq]
    last_prompt = int(prompt.nonzero().max()) if bool(prompt.any()) else None
    for e in emotions:
        v = trace.values(e, site=site, sequence=seq, zscore=z)
        gen = v[generated]
        gen = gen[~torch.isnan(gen)]
        entry = {
            "prompt": _mean(v[prompt]),
            "assistant_start": None if last_prompt is None else _num(v[last_prompt]),
            "rollout": _mean(gen),
        }
        if series:
            entry["series"] = [round(float(x), 4) for x in gen]
        out[e] = entry
    return out, z


def _num(x) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else round(x, 5)


def _mean(v: torch.Tensor) -> Optional[float]:
    v = v[~torch.isnan(v)]
    return None if v.numel() == 0 else round(float(v.mean()), 5)


@torch.no_grad()
def sample_rollouts(handle, tokenizer, prompts: Sequence[str], conditions: Sequence[Condition], *, layers: Sequence[int],
                    monitor_site: str, monitor_emotions: Sequence[str], seed: int, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 0.95, series: bool = True) -> List[Rollout]:
    """Sample one continuation per (prompt, condition) pair in one batched ``generate``, each sequence steered by its
    own condition, seeded with ``seed`` first; returns the rollouts in order.

    ``temperature == 0`` decodes greedily. ``series``: keep each monitored emotion's per-token values in
    ``Rollout.monitor`` (False keeps only the means).
    """
    if len(prompts) != len(conditions):
        raise ValueError(f"sample_rollouts: {len(prompts)} prompts but {len(conditions)} conditions")
    apply_conditions(handle, conditions, layers)
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                                 top_k=0)
    eos = tokenizer.eos_token_id
    result = handle.generate(list(prompts), max_new_tokens=max_new_tokens, eos_token_id=eos, **kwargs)
    handle.clear_steering()
    out = []
    W = result.prompt_width
    for i, (text, c) in enumerate(zip(result.texts, conditions)):
        gen_ids = result.sequences[i, W:].tolist()
        n = len(gen_ids)
        for j, t in enumerate(gen_ids):
            if t == eos or (tokenizer.pad_token_id is not None and t == tokenizer.pad_token_id and eos is None):
                n = j + 1
                break
        trace = result.trace
        if trace is not None:
            # positions after the end of this sequence are padding that generate appended: not part of the rollout
            trace.is_prompt[i, W + n:] = False
            trace.is_pad[i, W + n:] = True
        monitor, z = (({}, False) if trace is None else
                      monitor_summary(trace, monitor_emotions, monitor_site, i, series=series))
        out.append(Rollout(text=text, condition=c.name, seed=seed, n_tokens=n, monitor=monitor, zscored=z))
    return out

