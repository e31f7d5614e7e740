"""Offline helpers around ``vllm.LLM``: build the SamplingParams, generate, and fetch the traces.

::

    llm = LLM(model=path, dtype="bfloat16")            # with EMOKERN_VLLM_BANK set (see emokern.engines.vllm.config)
    results = emokern.engines.vllm.generate(llm, ["How are you?"],
                                    {"steer": {"emotions": {"calm": 0.05}}, "monitor": {"emotions": ["calm"]}},
                                    max_tokens=40, temperature=0)
    results[0].output.outputs[0].text, results[0].trace.values("calm", zscore=True)

Trace shape and cost: one :class:`emokern.Trace` per request, ``projections`` (1, T, S, K') fp32 with T = prompt +
generated tokens, S the monitored layers, K' the monitored emotions; the last position (a generated token never fed
back) and positions served from the prefix cache (only with ``"prompt": false``) are NaN. The worker keeps
4·S·K' bytes per token (684 B for all 171 emotions at one layer) until fetched. Traces follow one sample per
request (``n=1``): with ``n > 1`` vLLM runs each sample as a child request under another id, and no trace is
returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from emokern.core.trace import Trace

__all__ = ["Result", "generate", "sampling_params", "take_traces"]


@dataclass
class Result:
    """One request's ``RequestOutput``, its :class:`emokern.Trace` (None when not monitored, or failed), its
    ``alert`` (None, or ``{"emotion", "layer", "z", "tokens", "position", "stopped"}``: the first generated position
    where the alert condition held) and its ``error`` (None, or why the worker failed the request: it then ran
    unsteered, unrecorded, and ended at its next token; see :mod:`emokern.engines.vllm.worker`)."""

    output: Any
    trace: Optional[Trace]
    alert: Optional[dict]
    error: Optional[str] = None


def sampling_params(spec: Optional[dict] = None, **kwargs):
    """``vllm.SamplingParams(**kwargs)`` carrying ``spec`` as ``extra_args["emokern"]`` (other extra_args kept).

    The spec is checked against the bank when the request is added (by the plugin, in the front end); the plugin
    also sets the prefix-cache salt for steered requests and ``skip_reading_prefix_cache`` for prompt-monitored ones,
    so requests sent with plain ``SamplingParams`` (or over HTTP) are treated the same.
    """
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if spec is not None:
        extra["emokern"] = spec
    return SamplingParams(extra_args=extra or None, **kwargs)


def _trace(record: dict, output, tokenizer) -> Trace:
    length, S, K = record["length"], len(record["layers"]), len(record["names"])
    data = np.frombuffer(record["data"], dtype=np.float32).reshape(length, S, K)
    ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
    T = len(ids)
    proj = torch.full((1, T, S, K), float("nan"))
    # positions past T - 1 come from a step the engine ran before it knew the request was done; drop them
    keep = min(length, T - 1)
    proj[0, :keep] = torch.from_numpy(data[:keep].copy())
    prompt_len = len(output.prompt_token_ids)
    is_prompt = torch.zeros(1, T, dtype=torch.bool)
    is_prompt[0, :prompt_len] = True
    tokens = [Trace.decode_tokens(tokenizer, ids) if tokenizer is not None else [str(t) for t in ids]]
    mean = std = None
    if record["neutral_mean"] is not None:
        mean, std = torch.tensor(record["neutral_mean"]), torch.tensor(record["neutral_std"])
    return Trace(proj, torch.tensor([ids]), tokens, is_prompt, torch.zeros(1, T, dtype=torch.bool),
                 [f"layer{layer}.residual" for layer in record["layers"]], list(record["names"]), mean, std)


def take_traces(llm, outputs: Sequence[Any]) -> List[Result]:
    """Fetch (and remove from the workers) the traces of finished ``outputs`` of ``llm``; one :class:`Result` each.

    One ``collective_rpc("emokern_take")`` for the whole list. Tensor-parallel ranks compute identical
    projections; rank 0's are used.
    """
    ids = [o.request_id for o in outputs]
    per_rank = llm.collective_rpc("emokern_take", args=(ids,))
    records = per_rank[0]
    tokenizer = llm.get_tokenizer()
    results = []
    for output, record in zip(outputs, records):
        if record is None:
            results.append(Result(output, None, None))
        elif record["error"] is not None:
            results.append(Result(output, None, None, record["error"]))
        else:
            results.append(Result(output, _trace(record, output, tokenizer), record["alert"]))
    return results


def generate(llm, prompts, spec: Optional[dict] = None, params=None, **kwargs) -> List[Result]:
    """``llm.generate`` with one emokern ``spec`` for every prompt (or ``params``: SamplingParams, one or a list
    per prompt, carrying their own specs), then :func:`take_traces`. ``kwargs`` go to :func:`sampling_params`."""
    if params is None:
        params = sampling_params(spec, **kwargs)
    elif spec is not None or kwargs:
        raise ValueError("generate: give either 'params' or 'spec' with SamplingParams keywords, not both")
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if not any(((p.extra_args or {}).get("emokern") is not None) for p in (params if isinstance(params, list)
                                                                            else [params])):
        return [Result(o, None, None) for o in outputs]  # nothing was recorded: no round trip to the workers
    return take_traces(llm, outputs)
