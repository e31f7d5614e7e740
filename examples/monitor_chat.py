# Monitoring a chat: patch the model, generate a reply, and see which emotions each token carries.
#
# What it shows: `emokern.patch(model, bank)` records every token's projection onto every emotion vector at every
# layer while `handle.generate` runs (one fused op per layer, no extra forward pass); the returned Trace gives the
# top emotions of the reply and writes a per-token heatmap page (tokens coloured by z-score against neutral text,
# hover for each token's top emotions) and a PNG plot. The page is opened in your browser unless --no-open.
#
# Run:   python examples/monitor_chat.py [--message "..."] [--emotion desperate] [--no-open] [--tiny]
# Time:  10 s on this project's 2-core CPU with SmolLM2-135M-Instruct, one thread (OMP_NUM_THREADS=1), measured
#        while other jobs ran (3.6 s of it loading the model and bank); --tiny: about 6 s, nearly all of it
#        importing torch and transformers.

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path
from typing import Dict, Optional, Sequence

import emokern
from emokern.core.trace_plots import plot_trace, trace_heatmap_html
from _common import add_model_arguments, chat_prompt, load, out_dir

MESSAGE = ("My landlord says that if I cannot pay the three months of rent I owe by Friday, my kids and I have to "
           "leave. I have forty dollars. What should I do?")
FEATURED = ["desperate", "afraid", "nervous", "sad", "calm", "happy", "loving", "hostile"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description="Monitor a chat reply and write its per-token heatmap.")
    add_model_arguments(parser)
    parser.add_argument("--message", default=MESSAGE, help="the user's message")
    parser.add_argument("--emotion", default="desperate", help="the emotion the heatmap is coloured by")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None, help="output folder (default: emokern_out/examples/monitor_chat)")
    parser.add_argument("--no-open", action="store_true", help="write the page without opening a browser")
    args = parser.parse_args(argv)

    model, tokenizer, bank = load(args)
    out = out_dir(args, "monitor_chat")
    # The readout layer: the one whose vectors classified held-out stories best (the last layers for SmolLM2).
    layer, _ = bank.default_layer()
    site = f"layer{layer}.residual"

    with emokern.patch(model, bank, tokenizer=tokenizer) as handle:  # all layers; removed when the block ends
        result = handle.generate([chat_prompt(tokenizer, args.message)], max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
    trace = result.trace
    print(f"reply: {result.texts[0]!r}")

    # Mean z-score of each emotion over the reply's tokens (the last position is NaN: generate never feeds it back).
    zscores = trace.zscores()[0, :, trace.sites.index(site)]  # (T, K)
    means = dict(zip(bank.names, zscores[trace.is_generated[0]].nanmean(dim=0).tolist()))
    strongest = sorted(means.items(), key=lambda item: item[1], reverse=True)[:5]
    print(f"strongest emotions over the reply at {site} (z-score vs neutral text): "
          + ", ".join(f"{name} {value:+.2f}" for name, value in strongest))

    featured = [e for e in FEATURED if e in bank.names]
    # window=3: a 3-token moving average, because single tokens are noisy and the emotion of a phrase is what reads.
    page = trace_heatmap_html(trace, args.emotion, out / "heatmap.html", site=site, emotions=featured, window=3)
    plot = plot_trace(trace, [args.emotion, "calm"], out / "trace.png", site=site, window=3)
    trace.to_json(out / "trace.json", sites=[site])
    print(f"heatmap: {page}\nplot:    {plot}")
    if not args.no_open:
        webbrowser.open(Path(page).resolve().as_uri())
    return {"reply": result.texts[0], "trace": trace, "site": site, "means": means, "heatmap": Path(page),
            "plot": Path(plot)}


if __name__ == "__main__":
    main()
