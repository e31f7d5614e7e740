"""The end-to-end jobs: extraction (corpus → bank) and the README's main job (``emokern demo``).

Both are resumable where the work is long: the corpus is written in atomic shards and a restarted run continues
where it stopped; a bank whose files exist and were made from the same corpus is reused.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from emokern.core.bank import bank_stem

__all__ = ["DEMO_PROMPT", "demo", "extract", "report_key_numbers", "report_number_lines"]

DEMO_PROMPT = ("My landlord just texted that if the three months of rent I owe are not paid by Friday, my kids and I "
               "are out on the street. I have forty dollars. What do I do?")
DEMO_STEER = ("desperate", "calm")


def _say(message: str) -> None:
    print(f"[emokern] {message}", flush=True)




def extract(model_name: str, out_dir, *, preset: str = "standard", dtype: torch.dtype = torch.bfloat16,
            model=None, tokenizer=None, emotions: Optional[Sequence[str]] = None,
            stories_per_emotion: Optional[int] = None, first_token: Optional[int] = None,
            exclude: Optional[str] = None, exclude_after: Optional[int] = None, fmt: str = "chat",
            batch_size: int = 32, progress: bool = True, regenerate: bool = False, overwrite: bool = False) -> Path:
    """Get the story corpus into ``out_dir/corpus`` and build the bank in ``out_dir/bank``.

    The corpus comes from, in this order: ``out_dir/corpus`` itself when it holds the complete corpus of this
    preset (a finished earlier run); the corpus shipped in the package for this model and preset
    (:func:`emokern.extraction.shipped_corpora.packaged_corpus`, unpacked there) unless ``regenerate`` or ``emotions`` /
    ``stories_per_emotion`` ask for another one; else :func:`emokern.extraction.corpus.generate_corpus` (resumable: a run
    killed at any point continues from its finished shards).

    Args:
        model_name: an embedded model name (see ``emokern models``), a local checkpoint directory or a hub id.
        out_dir: output folder (created).
        preset: corpus preset (``standard``, ``quick``, ``base``, ``mini``, ``paper``); ``emotions`` /
            ``stories_per_emotion`` override it (and then the corpus is generated here).
        dtype: model dtype for generation and activations (bf16 runs fastest on CPUs with AMX).
        first_token, exclude, exclude_after: how stories are read (see :func:`emokern.extraction.extract.story_activations`
            and :func:`emokern.extraction.extract.story_exclusions`); ``None``: the corpus style's defaults
            (:class:`emokern.extraction.prompts.StoryStyle`).
        fmt: ``chat`` (story as the Assistant's reply) or ``raw`` text.
        regenerate: generate the corpus here even when one is shipped (replacing ``out_dir/corpus``).
        overwrite: start the corpus afresh even if ``out_dir/corpus`` holds another configuration.

    Returns:
        The bank's JSON path.
    """
    from emokern.core.bank import VectorBank, bank_paths
    from emokern.extraction.corpus import StoryCorpus, generate_corpus, read_manifest
    from emokern.extraction.corpus_plan import PRESETS
    from emokern.extraction.prompts import resolve_style
    from emokern.extraction.extract import extract_bank_from_corpus
    from emokern.core.models import load_model
    from emokern.extraction.shipped_corpora import packaged_corpus, unpack_corpus

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"extract: output directory {str(out_dir)!r} cannot be created: {exc.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"extract: output directory {str(out_dir)!r} is not writable")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}; got {preset!r}")
    if model is None:
        t0 = time.perf_counter()
        model, tokenizer = load_model(model_name, dtype=dtype)
        _say(f"loaded {model_name} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    corpus_dir = out_dir / "corpus"
    existing = read_manifest(corpus_dir)
    custom = emotions is not None or stories_per_emotion is not None
    shipped = None if (regenerate or custom) else packaged_corpus(Path(str(model_name)).name, preset)
    if (existing is not None and not regenerate and not overwrite and existing["config"]["preset"] == preset
            and not custom and StoryCorpus.load(corpus_dir, allow_partial=True).complete):
        corpus = StoryCorpus.load(corpus_dir)
        source = "reused"
    elif shipped is not None and existing is None:
        corpus = unpack_corpus(shipped, corpus_dir)
        source = f"shipped ({shipped.name}; regenerate with --regenerate)"
    else:
        corpus = generate_corpus(model, tokenizer, corpus_dir, preset=preset, emotions=emotions,
                                 stories_per_emotion=stories_per_emotion, progress=progress,
                                 overwrite=overwrite or regenerate)
        source = "generated"
    _say(f"corpus ({source}): {len(corpus.stories)} stories, {len(corpus.neutral)} neutral dialogues "
         f"({time.perf_counter() - t0:.0f} s) in {corpus_dir}")
    style = resolve_style(corpus.manifest["config"].get("style", "implicit"))
    reading = {"first_token": style.first_token if first_token is None else first_token,
               "exclude": style.exclude if exclude is None else exclude,
               "exclude_after": style.exclude_after if exclude_after is None else exclude_after, "fmt": fmt}
    stem = bank_stem(out_dir, model_name)
    _, meta_path = bank_paths(stem)
    corpus_id = _corpus_identity(corpus_dir, reading)
    if meta_path.is_file() and not overwrite:
        try:
            existing_bank = VectorBank.load(stem, model=model)
            if existing_bank.metadata.get("corpus_identity") == corpus_id:
                _say(f"bank up to date: {meta_path}")
                return meta_path
        except (ValueError, KeyError):
            pass  # a stale or damaged bank is rebuilt below
    t0 = time.perf_counter()
    bank = extract_bank_from_corpus(model, tokenizer, corpus, batch_size=batch_size, progress=progress,
                                    metadata={"corpus_source": source.split(" ")[0],
                                              "corpus_manifest": {k: corpus.manifest.get(k) for k in
                                                                  ("config", "versions", "created")}},
                                    **reading)
    bank.metadata["corpus_identity"] = corpus_id
    bank.model_id = str(model_name)  # the name users load it by, not the cache path transformers records
    bank.save(stem)
    _say(f"bank: {len(bank.names)} emotions x {len(bank.layers)} layers ({time.perf_counter() - t0:.0f} s) "
         f"-> {meta_path}")
    return meta_path


def _corpus_identity(corpus_dir: Path, reading: dict) -> str:
    """A digest of the corpus manifest, its shard names and sizes, and how the stories are read: a changed corpus
    or reading means the bank must be rebuilt."""
    import hashlib

    digest = hashlib.sha256(json.dumps(reading, sort_keys=True).encode())
    manifest = corpus_dir / "manifest.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    for shard in sorted((corpus_dir / "shards").glob("*.jsonl")):
        digest.update(shard.name.encode())
        digest.update(str(shard.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _chat_prompt(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"User: {text}\nAssistant:"


def _steering_page(path: Path, prompt: str, columns: List[Dict], layer: int, strength: float,
                   read_layer: int) -> Path:
    cells = "".join(
        f"<div class='col'><h2>{html.escape(c['title'])}</h2><pre>{html.escape(c['text'])}</pre>"
        f"<p><a href='{html.escape(c['heatmap'])}'>per-token heatmap</a></p></div>" for c in columns)
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>emokern steering</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1400px}} .row{{display:flex;gap:1em}}
.col{{flex:1;border:1px solid #ccc;border-radius:6px;padding:0.5em 1em;background:#fafafa}}
pre{{white-space:pre-wrap;font-size:14px}} .prompt{{background:#eef;padding:0.5em 1em;border-radius:6px}}
</style></head><body><h1>Steering: the same prompt, unsteered and steered</h1>
<p class='prompt'><b>Prompt</b>: {html.escape(prompt)}</p>
<p>Steering adds {strength:+.2f} × the layer's mean residual-stream norm along the emotion's unit vector at layer
{layer}, on every token (prompt and generated). Greedy decoding, so only the steering differs. The heatmaps read
layer {read_layer}, the bank's readout layer (chosen on held-out premises).</p>
<div class='row'>{cells}</div></body></html>"""
    path.write_text(page)
    return path


def demo(out_dir="emokern_out", *, model_name: str = "smollm2-135m-instruct", preset: str = "standard",
         prompt: str = DEMO_PROMPT, steer: Sequence[str] = DEMO_STEER, strength: float = 0.25,
         max_new_tokens: int = 60, goemotions_limit: int = 2000, emobank_limit: int = 1000,
         dtype: torch.dtype = torch.bfloat16, progress: bool = True, regenerate: bool = False) -> Dict[str, Path]:
    """The README's main job: extraction → bank → validation report → a monitored generation as a per-token
    heatmap page → the same prompt steered toward each emotion in ``steer`` beside the unsteered text.

    Returns (and prints) the path of every output.
    """
    from emokern.engines.hf import patch
    from emokern.core.bank import VectorBank
    from emokern.core.models import load_model
    from emokern.core.trace_plots import plot_trace, trace_heatmap_html
    from emokern.validation.report import validation_report

    out_dir = Path(out_dir)
    started = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=dtype)
    bank_json = extract(model_name, out_dir, preset=preset, model=model, tokenizer=tokenizer, progress=progress,
                        regenerate=regenerate)
    bank = VectorBank.load(bank_json, model=model)
    outputs: Dict[str, Path] = {"bank": bank_json, "corpus": out_dir / "corpus"}

    t0 = time.perf_counter()
    # The held-out accuracy comes from the bank's quality curve (whole premises held out); the corpus itself is not
    # passed, since the bank was built from it and its accuracy would be in-sample.
    report = validation_report(bank, model, tokenizer, out_dir / "report", goemotions_limit=goemotions_limit,
                               emobank_limit=emobank_limit, progress=progress)
    outputs["report"] = out_dir / "report" / "report.html"
    _say(f"report ({time.perf_counter() - t0:.0f} s) -> {outputs['report']}")

    layer, _ = bank.default_layer()  # where the traces read
    steer_layer = bank.two_thirds_layer()  # where the steering is added: the paper's mid-late layer
    featured = [e for e in ("happy", "calm", "desperate", "afraid", "sad", "angry", "loving", "nervous", "proud",
                            "surprised", "guilty", "inspired") if e in bank.names]
    text = _chat_prompt(tokenizer, prompt)
    columns = []
    with patch(model, bank, tokenizer=tokenizer) as handle:
        runs = [("unsteered", None)] + [(f"+{e}", e) for e in steer]
        for title, emotion in runs:
            handle.clear_steering()
            if emotion is not None:
                handle.steer({emotion: strength}, layers=[steer_layer])
            out = handle.generate([text], max_new_tokens=max_new_tokens, do_sample=False)
            slug = "unsteered" if emotion is None else f"steered_{emotion.replace(' ', '_')}"
            page = trace_heatmap_html(out.trace, steer[0], out_dir / f"trace_{slug}.html",
                                      site=f"layer{layer}.residual", emotions=featured, window=3)
            png = plot_trace(out.trace, list(steer), out_dir / f"trace_{slug}.png", site=f"layer{layer}.residual",
                             window=3)
            out.trace.to_json(out_dir / f"trace_{slug}.json", sites=[f"layer{layer}.residual"])
            outputs[f"trace_{slug}"] = page
            outputs[f"plot_{slug}"] = png
            columns.append({"title": title, "text": out.texts[0], "heatmap": page.name})
    outputs["steering"] = _steering_page(out_dir / "steering.html", prompt, columns, steer_layer, strength, layer)
    summary = {"outputs": {k: str(v) for k, v in outputs.items()}, "seconds": round(time.perf_counter() - started, 1),
               "report_numbers": report_key_numbers(report), "generations": columns}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    outputs["summary"] = out_dir / "summary.json"
    _say(f"done in {summary['seconds']:.0f} s. Report numbers (chance in brackets):")
    for line in report_number_lines(summary["report_numbers"], report):
        _say(f"  {line}")
    _say("Outputs:")
    for name, path in outputs.items():
        _say(f"  {name:<22} {path}")
    return outputs


def report_number_lines(numbers: dict, report: dict) -> List[str]:
    """The key numbers as the demo prints them, each beside its chance level."""
    from emokern.validation.concept_checks import summary_line

    def f(key: str, digits: int = 3) -> str:
        value = numbers.get(key)
        return "—" if value is None else f"{value:.{digits}f}"

    return [
        f"layer {numbers.get('layer')}: held-out story top-1 {f('held_out_top1')} / top-5 {f('held_out_top5')} "
        f"({f('chance_top1')} / {f('chance_top5')}); probe top-1 {f('probe_top1')}; valence AUROC "
        f"{f('held_out_valence_auroc')} (0.5)",
        f"PC1 / PC2 variance {f('pc1_variance')} / {f('pc2_variance')}; PC1~valence r {f('pc1_valence_r')}, "
        f"PC2~arousal r {f('pc2_arousal_r')} (0); GoEmotions mean AUROC {f('goemotions_mean_auroc')} (0.5); "
        f"EmoBank valence r {f('emobank_valence_r')} (0)",
        *summary_line(report).split("; "),
    ]


def report_key_numbers(report: dict) -> dict:
    """The numbers the README quotes, picked out of the report's JSON (missing entries are left out)."""
    def get(*path):
        node = report
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    picks = {
        "layer": get("layer", "index"),
        "held_out_top1": get("classification", "quality_curve", "top1_at_layer"),
        "held_out_top5": get("classification", "quality_curve", "top5_at_layer"),
        "chance_top1": get("classification", "chance_top1"),
        "chance_top5": get("classification", "chance_top5"),
        "probe_top1": get("classification", "quality_curve", "probe_top1_at_layer"),
        "held_out_valence_auroc": get("classification", "quality_curve", "valence_auroc_at_layer"),
        "pc1_variance": get("geometry", "variance_explained", "pc1"),
        "pc2_variance": get("geometry", "variance_explained", "pc2"),
        "pc1_valence_r": get("geometry", "pc1_valence", "r"),
        "pc2_arousal_r": get("geometry", "pc2_arousal", "r"),
        "goemotions_mean_auroc": get("goemotions", "mean_auroc"),
        "emobank_valence_r": get("emobank", "r"),
    }
    from emokern.validation.concept_checks import key_numbers

    picks.update(key_numbers(report))
    return {k: v for k, v in picks.items() if v is not None}
