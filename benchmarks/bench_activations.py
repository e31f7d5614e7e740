"""Benchmark: what does stopping early save when reading story activations?

Providers, on the same texts, batches (by length, ``--batch`` texts each) and averaged token positions:

* ``hidden_states`` — a plain forward of the causal LM with ``output_hidden_states=True`` (runs every layer, the
  final norm and the LM head, and keeps all hidden states), then the same per-text means from ``hidden_states``;
* ``story_activations_all`` — :func:`emokern.extraction.extract.story_activations` for all layers (no final norm, no LM head);
* ``story_activations_2/3`` — the same for the layer at 2/3 depth only, so the forward stops there;
* ``bare_forward_all`` / ``bare_forward_2/3`` — the floor for each of those two: the same work with nothing of
  story_activations' own, as a hand-written truncated forward would do it. Per batch (= per story_activations call
  here, see below), on input tensors built once before any timing, exactly as story_activations builds them (same
  tokenization, right padding with the same pad id, the same ``position_ids``, the same shared chat-template prefix
  found by the same rule on the same batch): if the batch has a shared prefix, the prefix (one row) goes through the
  truncated base model with ``use_cache=True``, its cache is repeated to the batch size in place (one copy), and the
  batch's own tokens go through the truncated base model with that cache and the prefix+text attention mask; with no
  shared prefix, one forward of the whole padded batch with ``use_cache=False``. "Truncated": the base model's
  decoder-layer list is temporarily cut after the last needed layer (30 or 20 of SmolLM2's 30) and its final norm
  replaced by the identity, so it runs embedding, mask and rotary set-up and those layers through the model's own
  ``forward`` — no ``output_hidden_states``, no hooks, no LM head, no means; the output is dropped. What it leaves
  out is all story_activations does besides the forward: chat-template rendering and tokenization, building the
  input and selection tensors, the hooks' gathers, sums and norms, the prefix cache's deep copy, the stop exception
  and the checks.

The table's ``forward-speed`` ratios are bare-forward time / story_activations time at the same layer setting
(target >= 0.95), for wall and process CPU time: the ratio of the two medians over reps, the median of the per-rep
ratios and the median of the per-batch ratios over every (rep, batch) (the two run back to back on every batch of
every rep, so a pair saw about the same machine load), and the ratio of the sums over batches of each batch's fastest
rep (the least disturbed by other processes). A check outside the timing runs the bare forward once on the first
batch, keeping its output, and compares its means at the last layer with story_activations' (so the baseline
computes the same activations).

Default model: the embedded SmolLM2-135M-Instruct (``--model gemma-3-270m`` for the other embedded model, whose
LM head is a larger share of the work); without it, a random model of SmolLM2's shape with a word-level tokenizer.
``--texts`` texts of about ``--tokens`` story tokens each, ``--fmt`` (chat), ``first_token=50``, eager fp32 on the
CPU.
Each provider runs every batch ``--reps`` times, interleaved with the others batch by batch (each batch is one
call of story_activations with that batch's ``--batch`` texts, so the shared prefix runs once per batch, for the
bare forward too); wall and process CPU seconds are both reported (on a shared machine the CPU time is the steadier
measure of the work done). ``--skip-hidden-states`` leaves out the slowest provider (speed-ups are then reported
against nothing).

Prints a table and writes ``benchmarks/results/bench_activations_<machine>.json`` (for another ``--model``:
``bench_activations_<model>_<machine>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import device_name, versions  # noqa: E402
from emokern.extraction.extract import (  # noqa: E402
    _averaged_positions,
    _averaged_range,
    _shared_prefix,
    _tokenize,
    story_activations,
)
from emokern.core.architecture import resolve_architecture  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_TOKEN = 50
DEFAULT_MODEL = "smollm2-135m-instruct"
SENTENCES = [
    "The morning train was late again, and the platform filled with people checking their phones.",
    "She folded the letter twice before slipping it into the drawer beside the old photographs.",
    "A gull landed on the railing and watched the fishermen sort the morning catch.",
    "He had rehearsed the speech all week, yet the first words still caught in his throat.",
    "Rain drummed on the greenhouse roof while the tomatoes ripened in the warm, damp air.",
    "The committee met in a narrow room that smelled of coffee and photocopier toner.",
    "Her grandmother's recipe called for a pinch of nutmeg and a great deal of patience.",
    "By noon the market square was crowded with stalls selling honey, cheese and bright scarves.",
    "The lighthouse keeper logged the weather every hour, as his father had done before him.",
    "They argued about the route for twenty minutes and then took the wrong turn anyway.",
    "A stack of unanswered emails waited on the screen when he finally sat down at his desk.",
    "The old dog limped to the door each evening to wait for footsteps that rarely came.",
]


def smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over the benchmark's words (a stand-in when no embedded model is installed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", " ".join(SENTENCES))))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + words)}
    assert len(vocab) <= vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} \n {{ m['content'] }} <|im_end|> "
                         "{% endfor %}")
    return tok


def load(name: str):
    try:
        from emokern.core.models import load_model

        model, tok = load_model(name)
        return model.eval(), tok, f"{name} (embedded)"
    except Exception as exc:  # a missing embedded model falls back to the same shape with random weights
        print(f"embedded model unavailable ({type(exc).__name__}: {exc}); using a random SmolLM2-shaped model")
        model = smollm2_shaped()
        return model, word_tokenizer(model.config.vocab_size), "random SmolLM2-135M-shaped"


def make_texts(tok, n: int, tokens: int) -> list[str]:
    """n texts of at least ``tokens`` tokens, each a different run through the sentence list."""
    texts = []
    for i in range(n):
        parts, j = [], i
        while len(tok(" ".join(parts), add_special_tokens=False).input_ids) < tokens:
            parts.append(SENTENCES[j % len(SENTENCES)])
            j += 3 if i % 2 else 5
        texts.append(" ".join(parts))
    return texts


def hidden_states_means(model, tok, texts, batch_size, fmt):
    """The naive way: full forwards with output_hidden_states, then the same masked means per layer."""
    ids, spans, _ = _tokenize(tok, texts, fmt, "texts")
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    L = model.config.num_hidden_layers
    means = torch.empty(len(texts), L, model.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = order[start:start + batch_size]
            T = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            sel = torch.zeros(len(batch), T, dtype=torch.bool)
            for r, i in enumerate(batch):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
                a, b = _averaged_range(*spans[i], FIRST_TOKEN)
                sel[r, a:b] = True
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hs = torch.stack(out.hidden_states[1:], dim=1)  # (B, L, T, d)
            w = sel[:, None, :, None].float()
            means[batch] = (hs * w).sum(2) / w.sum(2)
    return means


def bare_inputs(tok, texts, fmt):
    """The tensors story_activations builds for one call on ``texts`` (one batch): ``(prefix_ids or None,
    input_ids, attention_mask, position_ids)``; the attention mask spans prefix and text when there is a prefix.
    Same rules as :func:`emokern.extraction.extract._activations` with right padding and no exclusions."""
    ids, spans, excluded = _tokenize(tok, texts, fmt, "texts")
    positions = [_averaged_positions(span, FIRST_TOKEN, ex) for span, ex in zip(spans, excluded)]
    prefix = _shared_prefix(ids, positions)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    T = max(len(x) for x in ids) - prefix
    input_ids = torch.full((len(texts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), T, dtype=torch.long)
    for r, i in enumerate(order):
        own = ids[i][prefix:]
        input_ids[r, :len(own)] = torch.tensor(own)
        mask[r, :len(own)] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0) + prefix
    if prefix:
        mask = torch.cat([torch.ones(len(texts), prefix, dtype=torch.long), mask], 1)
    return (torch.tensor([ids[0][:prefix]]) if prefix else None), input_ids, mask, position_ids


@contextlib.contextmanager
def truncated(model, n_layers: int):
    """The model's base with its decoder-layer list cut to the first ``n_layers`` and its final norm replaced by the
    identity, restored on exit."""
    spec, base, layers = resolve_architecture(model)
    parent, attr = (base, spec.layers) if "." not in spec.layers else (None, None)
    if parent is None or getattr(parent, attr) is not layers or not isinstance(getattr(base, "norm", None),
                                                                               torch.nn.Module):
        raise NotImplementedError(f"bare forward: expected base.{spec.layers} and base.norm")
    norm = base.norm
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:n_layers]))
    base.norm = torch.nn.Identity()
    try:
        yield base
    finally:
        setattr(parent, attr, layers)
        base.norm = norm


def bare_forward(model, inputs, n_layers: int, keep: bool = False):
    """The minimal forward story_activations' work needs (see the module docstring); returns nothing (with
    ``keep``, for the check only: the last layer's output for the batch's own tokens)."""
    prefix_ids, input_ids, mask, position_ids = inputs
    with truncated(model, n_layers) as base, torch.inference_mode():
        if prefix_ids is None:
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        else:
            cache = base(input_ids=prefix_ids, use_cache=True).cache
            cache.batch_repeat_interleave(input_ids.shape[0])
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                       use_cache=True)
    return out.last_hidden_state if keep else None


def check_bare(model, tok, texts, fmt, layer: int) -> float:
    """Max |difference| between story_activations' means at ``layer`` and the same means from the bare forward's
    output (truncated after ``layer``), on ``texts`` (one batch, right padding), relative to each mean's largest
    |value| (as the hidden_states check)."""
    inputs = bare_inputs(tok, texts, fmt)
    prefix_ids = inputs[0]
    h = bare_forward(model, inputs, layer + 1, keep=True)
    ids, spans, excluded = _tokenize(tok, texts, fmt, "texts")
    prefix = 0 if prefix_ids is None else prefix_ids.shape[1]
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    ref = story_activations(model, tok, texts, layers=layer, first_token=FIRST_TOKEN, fmt=fmt,
                            batch_size=len(texts), progress=False)[0][:, 0]
    diff = 0.0
    for r, i in enumerate(order):
        pos = [t - prefix for t in _averaged_positions(spans[i], FIRST_TOKEN, excluded[i])]
        diff = max(diff, float((h[r, pos].mean(0) - ref[i]).abs().max() / ref[i].abs().max()))
    return diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fmt", choices=["chat", "raw"], default="chat", help="raw for models without a chat "
                        "template (gemma-3-270m is a base model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-hidden-states", action="store_true", help="leave out the hidden_states provider")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, label = load(args.model)
    tok.padding_side = "right"
    texts = make_texts(tok, args.texts, args.tokens)
    ids, spans, _ = _tokenize(tok, texts, args.fmt, "texts")
    # Longest first, in chunks of one batch: every provider runs the same batches that story_activations forms.
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    chunks = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    n_layers = model.config.num_hidden_layers
    two_thirds = round(2 / 3 * (n_layers - 1))
    kw = dict(first_token=FIRST_TOKEN, fmt=args.fmt, batch_size=args.batch, progress=False)
    # The bare forward's inputs, built before any timing (story_activations builds its own inside the call).
    bare = {tuple(chunk): bare_inputs(tok, [texts[i] for i in chunk], args.fmt) for chunk in chunks}
    providers = {
        "hidden_states": lambda batch, c: hidden_states_means(model, tok, batch, args.batch, args.fmt),
        "story_activations_all": lambda batch, c: story_activations(model, tok, batch, **kw)[0],
        "bare_forward_all": lambda batch, c: bare_forward(model, bare[c], n_layers),
        "story_activations_2/3": lambda batch, c: story_activations(model, tok, batch, layers=two_thirds, **kw)[0],
        "bare_forward_2/3": lambda batch, c: bare_forward(model, bare[c], two_thirds + 1),
    }
    if args.skip_hidden_states:
        del providers["hidden_states"]
    bare_check = {"all": check_bare(model, tok, [texts[i] for i in chunks[0]], args.fmt, n_layers - 1),
                  "2/3": check_bare(model, tok, [texts[i] for i in chunks[0]], args.fmt, two_thirds)}
    pairs = {"all": ("story_activations_all", "bare_forward_all"),
             "2/3": ("story_activations_2/3", "bare_forward_2/3")}
    wall = {name: [0.0] * args.reps for name in providers}
    cpu = {name: [0.0] * args.reps for name in providers}
    # per (provider, batch): the times of each rep, for the sums of per-batch minimums
    batch_wall = {name: [[] for _ in chunks] for name in providers}
    batch_cpu = {name: [[] for _ in chunks] for name in providers}
    outputs = {name: torch.empty(len(texts), 0) for name in providers}
    for rep in range(args.reps):
        # Interleaved batch by batch, so that load from other processes on a shared machine hits every provider
        # alike (it changes over minutes, a pass over all texts takes about a minute); the order of the providers
        # is reversed on odd reps, so that no provider always runs right after a given other one.
        names = list(providers) if rep % 2 == 0 else list(providers)[::-1]
        for b, chunk in enumerate(chunks):
            batch = [texts[i] for i in chunk]
            for name in names:
                t0, c0 = time.perf_counter(), time.process_time()
                out = providers[name](batch, tuple(chunk))
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                wall[name][rep] += dt
                cpu[name][rep] += dc
                batch_wall[name][b].append(dt)
                batch_cpu[name][b].append(dc)
                if rep == 0 and out is not None:
                    if outputs[name].shape[1] == 0:
                        outputs[name] = torch.empty(len(texts), *out.shape[1:])
                    outputs[name][chunk] = out
    # Hugging Face's last hidden state is after the final norm, so the last layer is not comparable. Relative to
    # each (text, layer) mean's largest value: these models have activations in the tens of thousands.
    diff = None
    if "hidden_states" in providers:
        ref = outputs["hidden_states"][:, :-1]
        diff = float(((outputs["story_activations_all"][:, :-1] - ref).abs() / ref.abs().amax(-1, keepdim=True))
                     .max())
    diff_2_3 = float((outputs["story_activations_2/3"][:, 0] - outputs["story_activations_all"][:, two_thirds])
                     .abs().max())

    print(f"{label}: {len(texts)} texts, {statistics.mean(s1 - s0 for s0, s1 in spans):.0f} story tokens and "
          f"{statistics.mean(map(len, ids)):.0f} total tokens on average, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps")
    print(f"{'provider':<24}{'median s':>10}{'min s':>9}{'speed-up':>10}{'CPU s':>9}{'CPU speed-up':>14}")
    ref_name = "hidden_states" if "hidden_states" in providers else None
    base, base_min, base_cpu = ((statistics.median(wall[ref_name]), min(wall[ref_name]),
                                 statistics.median(cpu[ref_name])) if ref_name else (float("nan"),) * 3)
    rows = []
    for name in providers:
        med, fastest, med_cpu = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
        rows.append({"provider": name, "median_s": med, "min_s": fastest, "samples_s": wall[name],
                     "speedup_vs_hidden_states": base / med if ref_name else None,
                     "speedup_of_min": base_min / fastest if ref_name else None,
                     "median_cpu_s": med_cpu, "cpu_samples_s": cpu[name],
                     "batch_samples_s": batch_wall[name], "batch_cpu_samples_s": batch_cpu[name],
                     "cpu_speedup_vs_hidden_states": base_cpu / med_cpu if ref_name else None})
        print(f"{name:<24}{med:>10.3f}{fastest:>9.3f}{base / med:>9.2f}x{med_cpu:>9.2f}{base_cpu / med_cpu:>13.2f}x")
    # bare-forward time / story_activations time: 1.0 is forward speed; the target is >= 0.95.
    forward_speed = {}
    print(f"{'forward-speed ratio (bare / story_activations)':<48}{'wall':>8}{'CPU':>8}{'wall per-rep':>14}"
          f"{'CPU per-rep':>13}{'wall per-batch':>16}{'CPU per-batch':>15}{'wall batch-min':>16}"
          f"{'CPU batch-min':>15}")
    for setting, (sa, bf) in pairs.items():
        r = {"story_activations": sa, "bare_forward": bf,
             "wall": statistics.median(wall[bf]) / statistics.median(wall[sa]),
             "cpu": statistics.median(cpu[bf]) / statistics.median(cpu[sa]),
             "wall_median_per_rep": statistics.median(b / a for a, b in zip(wall[sa], wall[bf])),
             "cpu_median_per_rep": statistics.median(b / a for a, b in zip(cpu[sa], cpu[bf]))}
        # Sums over batches of each batch's fastest rep: less sensitive to bursts of load from other processes.
        r["wall_sum_of_batch_minimums"] = sum(map(min, batch_wall[bf])) / sum(map(min, batch_wall[sa]))
        r["cpu_sum_of_batch_minimums"] = sum(map(min, batch_cpu[bf])) / sum(map(min, batch_cpu[sa]))
        # The median over every (rep, batch) pair of the two calls made back to back.
        r["wall_median_per_batch"] = statistics.median(b / a for xs, ys in zip(batch_wall[sa], batch_wall[bf])
                                                       for a, b in zip(xs, ys))
        r["cpu_median_per_batch"] = statistics.median(b / a for xs, ys in zip(batch_cpu[sa], batch_cpu[bf])
                                                      for a, b in zip(xs, ys))
        r["overhead_cpu_s"] = statistics.median(cpu[sa]) - statistics.median(cpu[bf])
        forward_speed[setting] = r
        last = n_layers - 1 if setting == "all" else two_thirds
        print(f"{'  layers ' + setting + ' (last layer ' + str(last) + ')':<48}"
              f"{r['wall']:>7.3f}x{r['cpu']:>7.3f}x{r['wall_median_per_rep']:>13.3f}x{r['cpu_median_per_rep']:>12.3f}x"
              f"{r['wall_median_per_batch']:>15.3f}x{r['cpu_median_per_batch']:>14.3f}x"
              f"{r['wall_sum_of_batch_minimums']:>15.3f}x{r['cpu_sum_of_batch_minimums']:>14.3f}x")
    if diff is not None:
        print(f"max relative |story_activations - hidden_states means| over layers 0..{n_layers - 2}: {diff:.2e}")
    print(f"2/3-depth run vs all-layer run at layer {two_thirds}: {diff_2_3:.2e}; relative difference of the bare "
          f"forward's means from story_activations' on the first batch: all {bare_check['all']:.2e}, "
          f"2/3 {bare_check['2/3']:.2e}")

    import transformers

    machine = "".join(c if c.isalnum() else "_" for c in device_name("cpu").split("(")[0].strip()).strip("_")[:40]
    model_tag = "" if args.model == DEFAULT_MODEL else "".join(c if c.isalnum() else "_" for c in args.model) + "_"
    out = RESULTS / f"bench_activations_{model_tag}{machine}.json"
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_activations", "machine": device_name("cpu"),
        "versions": {**versions(), "transformers": transformers.__version__}, "model": label,
        "n_texts": len(texts), "mean_story_tokens": statistics.mean(s1 - s0 for s0, s1 in spans),
        "mean_total_tokens": statistics.mean(map(len, ids)), "batch_size": args.batch, "fmt": args.fmt,
        "threads": torch.get_num_threads(), "first_token": FIRST_TOKEN,
        "two_thirds_layer": two_thirds, "num_layers": n_layers, "reps": args.reps, "results": rows,
        "forward_speed_ratio": forward_speed, "max_rel_diff_bare_vs_story_activations_first_batch": bare_check,
        "max_rel_diff_vs_hidden_states": diff, "skip_hidden_states": args.skip_hidden_states,
        "max_abs_diff_2_3_vs_all": diff_2_3,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
