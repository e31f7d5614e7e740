"""Emotion-vector extraction: the paper's recipe (PAPER_NOTES §1), from stories to a :class:`VectorBank`.

::

    acts, norm = story_activations(model, tok, story_texts)            # (n, L, d) per-story mean activations
    neutral, _ = story_activations(model, tok, neutral_texts)
    ev = emotion_vectors(acts, story_labels, names, neutral)           # raw and denoised (L, K, d) unit vectors
    bank = extract_bank(model, tok, story_texts, story_labels, neutral_texts)   # all of it, with metadata
    export_gguf_control_vector(bank, "calm.gguf", {"calm": 1.0, "desperate": -0.5})  # llama.cpp

This module holds step 1 and the bank; the vectors (steps 2-4) are :mod:`emokern.extraction.vectors`
(``emotion_vectors``), the held-out measurements (step 5) :mod:`emokern.extraction.quality`, and the llama.cpp
export :mod:`emokern.core.control_vectors`.

The steps:

1. **Activations.** Each story goes through the model once (batched, by length), as the Assistant's reply to the
   fixed request :data:`CHAT_REQUEST` in the tokenizer's chat template (``fmt="chat"``, the paper's "Story (H/A)"
   framing) or as bare text (``fmt="raw"``). At each decoder layer we read the residual stream (the layer's output,
   the site :func:`emokern.engines.hf` calls ``"residual"`` and llama.cpp calls ``l_out``) and average it over the
   story's own tokens from the ``first_token``-th on, leaving out any ``exclude_spans`` (for the ``opening`` recipe:
   the opening written for the model and every form of the emotion word, :func:`story_exclusions`). Only the
   embedding and the decoder layers up to the last one needed run: the LM head (and the final norm) never does,
   and the template tokens every text shares are run once, their keys and values reused for every batch.
2. **Vectors.** Per layer: mean over each emotion's stories, minus the equal-weight mean of the K emotion means.
3. **Denoising.** Per layer: project out the top principal components of the neutral texts' activations that
   together explain ``variance`` (default 50%) of their variance. The PCA runs over per-text mean activations
   (one row per neutral text, centred), the same statistic the vectors are built from; the paper does not say
   whether it used per-token or per-transcript activations.
4. **Normalisation.** Every vector is unit length; steering strengths are fractions of ``residual_norm``.
5. **Held-out measurements** (:mod:`emokern.extraction.quality`): whole premises held out; the default layer is chosen on
   validation premises and the test numbers are reported at it.
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from emokern.core.architecture import resolve_architecture, select_layers, text_config
from emokern.core.bank import VectorBank
from emokern.extraction.quality import evaluate, held_out_accuracy
from emokern.extraction.vectors import emotion_membership, emotion_vectors
from emokern.util.kv_cache import cache_argument

__all__ = [
    "CHAT_REQUEST",
    "extract_bank",
    "extract_bank_from_corpus",
    "story_activations",
    "story_exclusions",
]

logger = logging.getLogger(__name__)

#: The user turn that each story answers when ``fmt="chat"``.
CHAT_REQUEST = "Please write a short story."
FORMATS = ("chat", "raw")



class _StopForward(Exception):
    """Raised by the hook on the last needed layer, so the rest of the model never runs."""


# ----------------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------------


def _check_texts(argument: str, texts) -> List[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{argument}: expected a list of strings; got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{argument}: expected at least one text; got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{argument}[{i}]: expected a string; got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{argument}[{i}]: expected a non-blank text; got {t!r}")
    return list(texts)


def _render(tokenizer, texts: List[str], fmt: str, argument: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """The strings to tokenise and, in each, the character span ``[start, end)`` of the story text."""
    if fmt == "raw":
        return texts, [(0, len(t)) for t in texts]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"fmt='chat' needs a tokenizer with a chat_template; this {type(tokenizer).__name__} has "
                         f"none. Use fmt='raw' to feed the texts alone.")
    rendered, spans = [], []
    for i, text in enumerate(texts):
        s = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_REQUEST}, {"role": "assistant", "content": text}], tokenize=False)
        request = s.find(CHAT_REQUEST)
        after_request = request + len(CHAT_REQUEST) if request >= 0 else 0
        # Some templates trim message content, so look for the stripped text when the text itself is absent.
        for candidate in (text, text.strip()):
            start = s.find(candidate, after_request)
            if start >= 0:
                break
        else:
            raise ValueError(f"{argument}[{i}]: the tokenizer's chat template changed the text, so its tokens cannot "
                             f"be located in the rendered chat; use fmt='raw'")
        rendered.append(s)
        spans.append((start, start + len(candidate)))
    return rendered, spans


def _tokenize(tokenizer, texts: List[str], fmt: str, argument: str,
              exclude: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
              exclude_after: int = 0) -> Tuple[List[List[int]], List[Tuple[int, int]], List[List[int]]]:
    """Token ids of each full sequence, the token span ``[s0, s1)`` of its story text, and the sorted positions of
    its excluded tokens: those overlapping a character span ``[a, b)`` of ``exclude[i]`` (offsets into ``texts[i]``)
    and the ``exclude_after`` story tokens after each such run."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}; got {fmt!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer: expected a fast (Rust-backed) tokenizer, which reports character offsets; got "
                        f"{type(tokenizer).__name__}")
    strings, char_spans = _render(tokenizer, texts, fmt, argument)
    # The chat template already holds its special tokens; raw text gets the tokenizer's usual ones (e.g. BOS).
    enc = tokenizer(strings, add_special_tokens=(fmt == "raw"), return_offsets_mapping=True)
    ids, spans, excluded = [], [], []
    for i, (seq, offsets, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], char_spans)):
        # A story token is a non-empty token whose characters overlap the story text: tokens the tokenizer adds
        # (e.g. BOS) have empty spans, and a token straddling the boundary (e.g. a merged leading space) counts as
        # the story's.
        inside = [t for t, (s, e) in enumerate(offsets) if e > s and e > a and s < b]
        if not inside:
            raise ValueError(f"{argument}[{i}]: the text produced no tokens of its own")
        ids.append(list(seq))
        spans.append((inside[0], inside[-1] + 1))
        out = set()
        if exclude is not None and exclude[i]:
            # the story text may have been located stripped (see _render): shift text offsets by what was stripped
            shift = a - (len(texts[i]) - len(texts[i].lstrip())) if b - a != len(texts[i]) else a
            for x0, x1 in exclude[i]:
                hit = [t for t in inside if offsets[t][1] > x0 + shift and offsets[t][0] < x1 + shift]
                if hit:
                    out.update(range(hit[0], min(hit[-1] + 1 + exclude_after, inside[-1] + 1)))
        excluded.append(sorted(out))
    return ids, spans, excluded


def _averaged_range(s0: int, s1: int, first_token: int) -> Tuple[int, int]:
    """Token positions averaged for a story at ``[s0, s1)``: from its ``first_token``-th token on, or, for a story
    of at most ``first_token`` tokens, its last ceil(n/2) tokens."""
    n = s1 - s0
    return (s0 + first_token, s1) if n > first_token else (s0 + n // 2, s1)


def _averaged_positions(span: Tuple[int, int], first_token: int, excluded: Sequence[int]) -> List[int]:
    """The token positions averaged for a story at ``span``: :func:`_averaged_range` without the ``excluded``
    positions; when that leaves none, every story position that is not excluded; when none is left at all, ``[]``."""
    drop = set(excluded)
    kept = [t for t in range(*_averaged_range(*span, first_token)) if t not in drop]
    return kept or [t for t in range(*span) if t not in drop]


#: The shortest shared template worth caching (a raw text's lone BOS token is not).
MIN_CACHED_PREFIX = 8


def _shared_prefix(ids: List[List[int]], positions: List[List[int]]) -> int:
    """The number of leading tokens that every sequence shares and none averages (0 when below
    :data:`MIN_CACHED_PREFIX`): the chat template before the texts, computed once and reused."""
    limit = min(min(p[0] for p in positions), min(len(x) for x in ids) - 1)
    first = ids[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n if n >= MIN_CACHED_PREFIX else 0


def _check_exclusion(texts: List[str], exclude_spans, exclude_after) -> None:
    if isinstance(exclude_after, bool) or not isinstance(exclude_after, int) or exclude_after < 0:
        raise ValueError(f"exclude_after: expected an int >= 0; got {exclude_after!r}")
    if exclude_spans is None:
        return
    if isinstance(exclude_spans, (str, bytes)) or not isinstance(exclude_spans, Sequence) \
            or len(exclude_spans) != len(texts):
        got = len(exclude_spans) if isinstance(exclude_spans, Sequence) else type(exclude_spans).__name__
        raise ValueError(f"exclude_spans: expected one list of (start, end) character spans per text ({len(texts)}); "
                         f"got {got}")
    for i, spans in enumerate(exclude_spans):
        for span in spans or ():
            ok = (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)
                  and 0 <= span[0] < span[1] <= len(texts[i]))
            if not ok:
                raise ValueError(f"exclude_spans[{i}]: expected (start, end) ints with 0 <= start < end <= "
                                 f"{len(texts[i])} (the text's length); got {span!r}")


def _activations(model, tokenizer, texts, *, layers, first_token, fmt, batch_size, progress, argument,
                 exclude_spans=None, exclude_after=0):
    """Shared body of :func:`story_activations`; also returns the story token counts, the layer indices and the
    number of averaged tokens of each text."""
    texts = _check_texts(argument, texts)
    if isinstance(first_token, bool) or not isinstance(first_token, int) or first_token < 0:
        raise ValueError(f"first_token: expected an int >= 0; got {first_token!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
    _check_exclusion(texts, exclude_spans, exclude_after)
    _, base, decoder_layers = resolve_architecture(model)
    layer_ids = select_layers(layers, len(decoder_layers))
    ids, spans, excluded = _tokenize(tokenizer, texts, fmt, argument, exclude_spans, exclude_after)
    n, L = len(texts), len(layer_ids)
    positions = [_averaged_positions(span, first_token, ex) for span, ex in zip(spans, excluded)]
    empty = [i for i, p in enumerate(positions) if not p]
    if empty:
        raise ValueError(f"exclude_spans[{empty[0]}]: excluding these spans (and {exclude_after} tokens after each) "
                         f"leaves no token of {argument}[{empty[0]}] to average")
    n_story = torch.tensor([s1 - s0 for s0, s1 in spans], dtype=torch.int64)

    device = model.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    # Longest first: similar lengths share a batch (little padding) and an out-of-memory error comes at once.
    order = sorted(range(n), key=lambda i: -len(ids[i]))
    means = torch.empty(n, L, int(text_config(model.config).hidden_size))
    norm_sum = torch.zeros(L, dtype=torch.float64, device=device)
    n_averaged = 0
    state = {}

    # Every text of a chat-format call starts with the same template tokens (the system and user turns): run them
    # once and reuse their keys and values for every batch, so that only the texts' own tokens go through the model.
    prefix = _shared_prefix(ids, positions)
    cache_arg = cache_argument(base)

    def make_hook(j: int):
        def hook(module, args, output):
            if state.get("prefix"):  # the shared prefix: nothing to average, only its cache to fill
                if j == L - 1:
                    raise _StopForward
                return None
            h = output[0] if isinstance(output, tuple) else output
            # Gather only the averaged positions, so padding never enters a sum (even if it holds NaN), then sum
            # each text's rows with a one-hot matmul (much faster than index_add_ on the CPU).
            h_sel = h.reshape(-1, h.shape[-1]).index_select(0, state["flat"]).float()
            state["sums"][j] = state["onehot"] @ h_sel
            norm_sum[j] += h_sel.norm(dim=-1).sum(dtype=torch.float64)
            state["seen"] += 1
            if j == L - 1:
                raise _StopForward
        return hook

    was_training = model.training
    hooks = [decoder_layers[layer].register_forward_hook(make_hook(j)) for j, layer in enumerate(layer_ids)]
    bar = None
    try:
        model.eval()
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"activations ({argument})", unit="text")
        with torch.inference_mode():
            if prefix:
                # The model makes its cache inside the forward; the first layer is handed it, so take it there.
                # The forward stops after the last needed layer, as for the texts, and later layers are never
                # asked for their cache.
                from transformers.cache_utils import Cache

                def grab(module, args, kwargs):
                    state["cache"] = next((v for v in [*kwargs.values(), *args] if isinstance(v, Cache)), None)

                grabber = decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
                state["prefix"] = True
                try:
                    base(input_ids=torch.tensor([ids[0][:prefix]], device=device), use_cache=True)
                except _StopForward:
                    pass
                finally:
                    state["prefix"] = False
                    grabber.remove()
                prefix_cache = state.pop("cache", None)
                if prefix_cache is None:
                    raise RuntimeError("story_activations: the model did not hand its decoder layers a cache for the "
                                       "shared prefix; pass texts with fmt='raw' or report this model family")
            for start in range(0, n, batch_size):
                batch = order[start:start + batch_size]
                T = max(len(ids[i]) for i in batch) - prefix
                input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
                mask = torch.zeros(len(batch), T, dtype=torch.long)
                sel = torch.zeros(len(batch), T, dtype=torch.bool)
                for r, i in enumerate(batch):
                    own = ids[i][prefix:]
                    # after a cached prefix the rows are right-padded: the prefix must stay next to each text
                    off = T - len(own) if left and not prefix else 0
                    input_ids[r, off:off + len(own)] = torch.tensor(own)
                    mask[r, off:off + len(own)] = 1
                    sel[r, [off + t - prefix for t in positions[i]]] = True
                # Explicit positions, so left-padded rows get the same positions as unpadded ones (this matters
                # for absolute position embeddings such as GPT-2's).
                position_ids = (mask.cumsum(1) - 1).clamp_min(0) + prefix
                kwargs = {}
                if prefix:
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(batch))
                    kwargs[cache_arg] = cache
                    mask = torch.cat([torch.ones(len(batch), prefix, dtype=torch.long), mask], 1)
                rows, cols = sel.nonzero(as_tuple=True)
                onehot = torch.zeros(len(batch), len(rows))
                onehot[rows, torch.arange(len(rows))] = 1.0
                state.update(flat=(rows * T + cols).to(device), onehot=onehot.to(device), seen=0,
                             sums=torch.empty(L, len(batch), means.shape[2], device=device))
                try:
                    base(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids.to(device), use_cache=bool(prefix), **kwargs)
                except _StopForward:
                    pass
                if state["seen"] != L:
                    raise RuntimeError(f"story_activations: expected the forward to reach {L} hooked layers "
                                       f"{layer_ids}; it reached {state['seen']}")
                counts = sel.sum(1).to(torch.float32)
                mask = mask[:, prefix:]
                means[batch] = (state["sums"].cpu() / counts[None, :, None]).transpose(0, 1)
                n_averaged += int(counts.sum())
                if bar is not None:
                    bar.update(len(batch))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    n_short = int((n_story <= first_token).sum())
    if n_short:
        logger.info("%s: %d of %d texts have at most first_token=%d tokens; their last half was averaged",
                    argument, n_short, n, first_token)
    residual_norm = (norm_sum / n_averaged).to(torch.float32).cpu()
    return means, residual_norm, n_story, layer_ids, torch.tensor([len(p) for p in positions], dtype=torch.int64)


def story_activations(model, tokenizer, texts: Sequence[str], *, layers=None, first_token: int = 50,
                      fmt: str = "chat", batch_size: int = 8, progress: bool = True, return_counts: bool = False,
                      exclude_spans: Optional[Sequence[Sequence[Tuple[int, int]]]] = None, exclude_after: int = 0):
    """Per-text mean residual-stream activations at the chosen layers, without running the LM head.

    Args:
        model: a Hugging Face causal LM of a family in :data:`emokern.core.architecture.ARCHITECTURES`.
        tokenizer: its fast tokenizer (character offsets locate the story's tokens); for ``fmt="chat"`` it needs a
            chat template. Its ``padding_side`` is respected; padding never enters a mean.
        texts: n non-blank strings.
        layers: which decoder layers to read: ``None`` (all), an int, a float fraction of depth, a slice or a
            sequence of those (as in :func:`emokern.engines.hf.patch`). The L slices of the result are in ascending layer
            order; layer ``i`` is the output of decoder layer ``i`` (``hidden_states[i + 1]`` in Hugging Face terms,
            before any final norm).
        first_token: story tokens skipped before averaging (the paper's 50; counted from the story's first token,
            not the template's). A story of at most ``first_token`` tokens is averaged over its last ceil(n/2)
            tokens instead; their number is logged and, with ``return_counts``, readable from the token counts.
        fmt: ``"chat"`` — each text is the Assistant's reply to :data:`CHAT_REQUEST` in the chat template;
            ``"raw"`` — the text alone (with the tokenizer's usual special tokens, e.g. BOS).
        batch_size: texts per forward; texts are grouped by length to limit padding.
        progress: show a progress bar.
        return_counts: also return each text's number of story tokens.
        exclude_spans: optional, one list per text of ``(start, end)`` character spans of that text whose tokens are
            left out of its mean (e.g. the emotion word: :func:`emotion_word_spans`), together with the
            ``exclude_after`` story tokens after each. When that removes every token from ``first_token`` on, the
            text's other story tokens are averaged; when it removes all of them, ``ValueError``.
        exclude_after: tokens after each excluded span that are left out too (>= 0).

    Returns:
        ``(means, residual_norm)``, or ``(means, residual_norm, n_story_tokens)`` with ``return_counts``:
        ``means`` (n, L, d) float32 on the CPU, each text's mean activation over its averaged tokens, in input
        order; ``residual_norm`` (L,) float32, the mean L2 norm of the activation over all averaged tokens of all
        texts; ``n_story_tokens`` (n,) int64.

    Each batch runs the base model once with a forward hook on each needed layer; the hook on the last needed
    layer raises a private exception, so no later layer, final norm or LM head runs. Hooks are removed and the
    model's train/eval mode restored however the call ends.
    """
    means, residual_norm, n_story, _, _ = _activations(model, tokenizer, texts, layers=layers,
                                                       first_token=first_token, fmt=fmt, batch_size=batch_size,
                                                       progress=progress, argument="texts",
                                                       exclude_spans=exclude_spans, exclude_after=exclude_after)
    return (means, residual_norm, n_story) if return_counts else (means, residual_norm)


# ----------------------------------------------------------------------------------------------------------------------
# Bank
# ----------------------------------------------------------------------------------------------------------------------


def extract_bank(model, tokenizer, story_texts: Sequence[str], story_labels: Sequence[str],
                 neutral_texts: Sequence[str], *, names: Optional[Sequence[str]] = None, layers=None,
                 first_token: int = 50, fmt: str = "chat", variance: float = 0.5, batch_size: int = 8,
                 test_fraction: float = 0.2, validation_fraction: float = 0.2, seed: int = 0, progress: bool = True,
                 metadata: Optional[Mapping] = None, story_groups: Optional[Sequence] = None,
                 story_exclude_spans: Optional[Sequence[Sequence[Tuple[int, int]]]] = None, exclude_after: int = 0,
                 probe: bool = True) -> VectorBank:
    """Run the whole recipe and return a :class:`VectorBank` for ``model``.

    Args:
        story_texts, story_labels: n stories and their emotion names.
        neutral_texts: m >= 2 emotionally neutral texts (denoising and the neutral statistics).
        names: the emotions to extract, in bank order; default: the distinct labels, sorted. Stories labelled
            otherwise are left out (and counted in the metadata).
        layers, first_token, fmt, batch_size, progress: as :func:`story_activations` (neutral texts use the same
            ``fmt`` and ``first_token``, so both sets are read the same way).
        story_exclude_spans, exclude_after: character spans of each story left out of its mean, with the
            ``exclude_after`` tokens after each (``exclude_spans`` of :func:`story_activations`); neutral texts
            exclude nothing.
        variance: as :func:`emokern.extraction.vectors.emotion_vectors`.
        story_groups: optional premise id per story (the corpus's topics). With at least 3 premises, the held-out
            measurements of :func:`emokern.extraction.quality.evaluate` are made (whole premises held out: ``test_fraction``
            for the test numbers, ``validation_fraction`` of the rest to choose the default layer; ``probe``: also
            fit the logistic-regression ceiling at the chosen layer and at 2/3 depth). Without groups (or with
            fewer), :func:`emokern.extraction.quality.held_out_accuracy` holds out stories instead and the default layer is the 2/3-depth one.
        test_fraction, validation_fraction, seed: the split (see above).
        metadata: extra JSON-serialisable entries merged into the bank's metadata (e.g. where the corpus came from).

    Returns:
        A bank whose fields are:

        * ``vectors`` (L, K, d): the denoised unit vectors, from **all** stories (the held-out numbers come from
          vectors built without the held-out premises); ``extra["raw_vectors"]`` the raw ones and
          ``extra["center"]`` (L, d) the mean over emotion means (all float32);
        * ``layers``: the model layers read; ``residual_norm`` (L,): the mean activation norm over all averaged
          tokens of the stories and neutral texts together;
        * ``neutral_mean`` / ``neutral_std`` (L, K): the mean and standard deviation (unbiased) over the neutral
          texts of ``vectors[l, k] · a``, where ``a`` is a text's mean activation over its averaged tokens (a
          per-text statistic: single-token projections spread more widely);
        * ``model_id``, ``fingerprint`` (:func:`emokern.core.models.model_fingerprint`);
        * ``metadata``: ``recipe`` (the parameters above, :data:`CHAT_REQUEST`, the PCA's input), ``corpus``
          (counts per emotion, short texts, token counts), ``pcs_removed`` per layer, ``quality`` (the held-out
          measurements: ``split`` ("premises"), ``layers``, test ``top1``/``top5``,
          ``validation_top1``/``validation_top5``, ``valence_auroc``, ``probe_top1`` {layer: accuracy}, chance
          levels, counts, ``premises`` {part: [premise, ...]}; or, with ``split`` "stories", the story-split curve;
          or ``None`` when no emotion has 2 stories), ``default_layer``
          (``chosen``: the validation choice, or ``None``; ``two_thirds``: the bank layer nearest round(2/3·(N−1))
          for a model of N layers, the paper's choice; ``rule``: how ``chosen`` was made), ``model`` (type, depth,
          width, dtype), ``timings`` (seconds) and ``created`` (UTC, ISO 8601).
    """
    t_start = time.perf_counter()
    story_texts = _check_texts("story_texts", story_texts)
    neutral_texts = _check_texts("neutral_texts", neutral_texts)
    if len(story_labels) != len(story_texts):
        raise ValueError(f"story_labels: expected one label per story ({len(story_texts)}); got {len(story_labels)}")
    if story_groups is not None and len(story_groups) != len(story_texts):
        raise ValueError(f"story_groups: expected one premise id per story ({len(story_texts)}); got "
                         f"{len(story_groups)}")
    names = sorted(set(story_labels)) if names is None else list(names)
    names, member = emotion_membership(story_labels, names, len(story_texts))
    kw = dict(layers=layers, first_token=first_token, fmt=fmt, batch_size=batch_size, progress=progress)

    t0 = time.perf_counter()
    acts, story_norm, story_tokens, layer_ids, story_avg = _activations(
        model, tokenizer, story_texts, argument="story_texts", exclude_spans=story_exclude_spans,
        exclude_after=exclude_after, **kw)
    t1 = time.perf_counter()
    neutral, neutral_norm, neutral_tokens, _, neutral_avg = _activations(model, tokenizer, neutral_texts,
                                                                         argument="neutral_texts", **kw)
    t2 = time.perf_counter()
    ev = emotion_vectors(acts, story_labels, names, neutral, variance=variance)
    t3 = time.perf_counter()
    counts = torch.bincount(member[member >= 0], minlength=len(names)).tolist()
    config = text_config(model.config)
    n_model_layers = int(config.num_hidden_layers)
    two_thirds = min(layer_ids, key=lambda x: (abs(x - round(2 / 3 * (n_model_layers - 1))), x))
    quality, chosen, rule = None, None, None
    n_groups = len({str(x) for x in story_groups}) if story_groups is not None else 0
    if n_groups >= 3:
        evaluation = evaluate(acts, story_labels, names, neutral, story_groups, layers=layer_ids,
                                variance=variance, test_fraction=test_fraction,
                                validation_fraction=validation_fraction, seed=seed, probe=probe,
                                probe_layers=[two_thirds])
        quality = {k: v for k, v in evaluation.to_dict().items() if k not in ("test_top1", "test_top5", "split")}
        quality.update(split="premises", premises=evaluation.split, top1=evaluation.test_top1,
                       top5=evaluation.test_top5)
        chosen = evaluation.layer
        rule = ("highest validation top-1 + top-5 (three-layer moving mean), vectors from the training premises, "
                "scored on the validation premises; the test premises took no part")
    elif max(counts) >= 2:
        curve = held_out_accuracy(acts, story_labels, names, neutral, test_fraction=test_fraction,
                                  variance=variance, seed=seed)
        quality = {"split": "stories", "layers": layer_ids, "top1": curve.top1.tolist(),
                   "top5": curve.top5.tolist(), "n_train": curve.n_train, "n_test": curve.n_test,
                   "chance_top1": 1 / len(names), "chance_top5": min(5, len(names)) / len(names)}
    t4 = time.perf_counter()

    n_story_avg, n_neutral_avg = int(story_avg.sum()), int(neutral_avg.sum())
    residual_norm = (story_norm * n_story_avg + neutral_norm * n_neutral_avg) / (n_story_avg + n_neutral_avg)
    projections = torch.einsum("mld,lkd->mlk", neutral, ev.denoised)  # (m, L, K)

    meta = {
        "recipe": {"first_token": first_token, "fmt": fmt, "chat_request": CHAT_REQUEST if fmt == "chat" else None,
                   "variance": variance, "pca_rows": "per-text mean activations of the neutral texts, centred",
                   "short_text_rule": "texts of at most first_token tokens: mean over their last ceil(n/2) tokens",
                   "excluded": ("given character spans of each story and the exclude_after tokens after each"
                                if story_exclude_spans is not None else None),
                   "exclude_after": exclude_after, "excluded_tokens": int(
                       sum(int(t) for t in story_tokens) - n_story_avg) if story_exclude_spans is not None else 0,
                   "neutral_stats": "per-text mean activations", "test_fraction": test_fraction,
                   "validation_fraction": validation_fraction, "seed": seed, "batch_size": batch_size},
        "corpus": {
            "n_stories": len(story_texts), "n_neutral": len(neutral_texts),
            "n_excluded": int((member < 0).sum()), "per_emotion": dict(zip(names, counts)),
            "n_premises": n_groups or None,
            "short_stories": int((story_tokens <= first_token).sum()),
            "short_neutral": int((neutral_tokens <= first_token).sum()),
            "story_tokens_mean": float(story_tokens.double().mean()),
            "neutral_tokens_mean": float(neutral_tokens.double().mean()),
            "averaged_tokens": n_story_avg + n_neutral_avg,
        },
        "pcs_removed": dict(zip(map(str, layer_ids), ev.n_pcs_removed.tolist())),
        "quality": quality,
        "default_layer": {"chosen": chosen, "two_thirds": two_thirds, "rule": rule},
        "model": {"model_type": getattr(config, "model_type", None), "num_hidden_layers": n_model_layers,
                  "hidden_size": int(config.hidden_size), "dtype": str(model.get_input_embeddings().weight.dtype)},
        "timings": {"story_forward_s": t1 - t0, "neutral_forward_s": t2 - t1, "vectors_s": t3 - t2,
                    "quality_s": t4 - t3, "total_s": time.perf_counter() - t_start},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(metadata or {})
    return VectorBank.from_tensors(
        ev.denoised, names, layers=layer_ids, residual_norm=residual_norm, model=model,
        neutral_mean=projections.mean(0), neutral_std=projections.std(0), metadata=meta,
        extra={"raw_vectors": ev.raw, "center": ev.center},
    )


#: What :func:`extract_bank_from_corpus` leaves out of a story's mean, by name.
EXCLUDE = ("none", "opening", "opening+word")


def story_exclusions(stories, exclude: str = "opening+word") -> Optional[List[List[Tuple[int, int]]]]:
    """The character spans of each story that a reading leaves out (``exclude_spans`` of
    :func:`story_activations`): ``"none"`` — nothing (``None``); ``"opening"`` — the opening written for the model
    (``story.opening``, the first characters of ``story.text``); ``"opening+word"`` — that and every form of the
    story's emotion word in its text (:func:`emokern.extraction.emotion_words.emotion_word_spans`)."""
    from emokern.extraction.emotion_words import emotion_word_spans

    if exclude not in EXCLUDE:
        raise ValueError(f"exclude: expected one of {EXCLUDE}; got {exclude!r}")
    if exclude == "none":
        return None
    spans = []
    for s in stories:
        opening = getattr(s, "opening", "") or ""
        out = [(0, len(opening))] if opening else []
        if exclude == "opening+word":
            out += [x for x in emotion_word_spans(s.text, s.emotion) if x[0] >= len(opening)]
        spans.append(out)
    return spans


def extract_bank_from_corpus(model, tokenizer, corpus, *, exclude: str = "opening+word", **kwargs) -> VectorBank:
    """:func:`extract_bank` on a :class:`emokern.extraction.corpus.StoryCorpus` (or anything with the same attributes).

    Reads only ``corpus.stories`` (records with ``.text``, ``.emotion``, ``.topic`` and optionally ``.opening``)
    and ``corpus.neutral`` (records with ``.text``). ``exclude`` chooses what is left out of each story's mean
    (:func:`story_exclusions`; pass ``exclude_after`` for the tokens after each span). ``kwargs`` go to
    :func:`extract_bank`; the number of distinct story topics is added to ``metadata["corpus_topics"]`` and
    ``exclude`` to ``metadata["recipe"]["exclude"]``.
    """
    stories, neutral = list(corpus.stories), list(corpus.neutral)
    meta = {"corpus_topics": len({getattr(s, "topic", None) for s in stories})}
    meta.update(kwargs.pop("metadata", None) or {})
    kwargs.setdefault("story_groups", [getattr(s, "topic", None) for s in stories])
    bank = extract_bank(model, tokenizer, [s.text for s in stories], [s.emotion for s in stories],
                        [r.text for r in neutral], metadata=meta,
                        story_exclude_spans=story_exclusions(stories, exclude), **kwargs)
    bank.metadata["recipe"]["exclude"] = exclude
    return bank
