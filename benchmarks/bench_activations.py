"""Benchmark: what does stopping early save when reading story activations?

Providers, on the same texts, batches (by length, ``--batch`` texts each) and averaged token positions:

* ``hidden_states`` — a plain forward of the causal LM with ``output_hidden_states=True`` (runs every layer, the
  final norm and the LM head, and keeps all hidden states), then the same per-text means from ``hidden_states``;
* ``story_activations_all`` — :func:`emokern.extract.story_activations` for all layers (no final norm, no LM head);
* ``story_activations_2/3`` — the same for the layer at 2/3 depth only, so the forward stops there.

Default model: the embedded SmolLM2-135M-Instruct (``--model gemma-3-270m`` for the other embedded model, whose
LM head is a larger share of the work); without it, a random model of SmolLM2's shape with a word-level tokenizer.
``--texts`` texts of about ``--tokens`` story tokens each, ``--fmt`` (chat), ``first_token=50``, eager fp32 on the
CPU.
Each provider runs every batch ``--reps`` times, interleaved with the others batch by batch; wall and process CPU
seconds are both reported (on a shared machine the CPU time is the steadier measure of the work done).

Prints a table and writes ``benchmarks/results/bench_activations_<machine>.json`` (for another ``--model``:
``bench_activations_<model>_<machine>.json``).
"""

from __future__ import annotations

import argparse
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
from emokern.extract import _averaged_range, _tokenize, story_activations  # noqa: E402

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
        from emokern.models import load_model

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
    providers = {
        "hidden_states": lambda batch: hidden_states_means(model, tok, batch, args.batch, args.fmt),
        "story_activations_all": lambda batch: story_activations(model, tok, batch, **kw)[0],
        "story_activations_2/3": lambda batch: story_activations(model, tok, batch, layers=two_thirds, **kw)[0],
    }
    wall = {name: [0.0] * args.reps for name in providers}
    cpu = {name: [0.0] * args.reps for name in providers}
    outputs = {name: torch.empty(len(texts), 0) for name in providers}
    for rep in range(args.reps):
        # Interleaved batch by batch, so that load from other processes on a shared machine hits every provider
        # alike (it changes over minutes, a pass over all texts takes about a minute).
        for chunk in chunks:
            batch = [texts[i] for i in chunk]
            for name, fn in providers.items():
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(batch)
                wall[name][rep] += time.perf_counter() - t0
                cpu[name][rep] += time.process_time() - c0
                if rep == 0:
                    if outputs[name].shape[1] == 0:
                        outputs[name] = torch.empty(len(texts), *out.shape[1:])
                    outputs[name][chunk] = out
    # Hugging Face's last hidden state is after the final norm, so the last layer is not comparable. Relative to
    # each (text, layer) mean's largest value: these models have activations in the tens of thousands.
    ref = outputs["hidden_states"][:, :-1]
    diff = float(((outputs["story_activations_all"][:, :-1] - ref).abs() / ref.abs().amax(-1, keepdim=True)).max())
    diff_2_3 = float((outputs["story_activations_2/3"][:, 0] - outputs["story_activations_all"][:, two_thirds])
                     .abs().max())

    print(f"{label}: {len(texts)} texts, {statistics.mean(s1 - s0 for s0, s1 in spans):.0f} story tokens and "
          f"{statistics.mean(map(len, ids)):.0f} total tokens on average, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps")
    print(f"{'provider':<24}{'median s':>10}{'min s':>9}{'speed-up':>10}{'CPU s':>9}{'CPU speed-up':>14}")
    base, base_min, base_cpu = (statistics.median(wall["hidden_states"]), min(wall["hidden_states"]),
                                statistics.median(cpu["hidden_states"]))
    rows = []
    for name in providers:
        med, fastest, med_cpu = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
        rows.append({"provider": name, "median_s": med, "min_s": fastest, "samples_s": wall[name],
                     "speedup_vs_hidden_states": base / med, "speedup_of_min": base_min / fastest,
                     "median_cpu_s": med_cpu, "cpu_samples_s": cpu[name],
                     "cpu_speedup_vs_hidden_states": base_cpu / med_cpu})
        print(f"{name:<24}{med:>10.3f}{fastest:>9.3f}{base / med:>9.2f}x{med_cpu:>9.2f}{base_cpu / med_cpu:>13.2f}x")
    print(f"max relative |story_activations - hidden_states means| over layers 0..{n_layers - 2}: {diff:.2e}; "
          f"2/3-depth run vs all-layer run at layer {two_thirds}: {diff_2_3:.2e}")

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
        "max_rel_diff_vs_hidden_states": diff, "max_abs_diff_2_3_vs_all": diff_2_3,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
