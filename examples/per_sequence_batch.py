# Per-sequence settings in one batch: four chats generated together, each with its own steering.
#
# What it shows: `handle.steer(..., sequences=[i])` gives row i of the batch its own emotions, strengths, mode and
# scope; one `handle.generate` call then runs all four rows together (left-padded, one KV cache). Row 0 is left
# unsteered; row 1 gets calm on its reply, row 2 desperate on every token, row 3 has the part of its own prompt that
# mentions the deadline pushed toward afraid. The same batch is then generated again with no steering at all, to
# show that a row's settings change that row and no other: row 0's reply and its per-token projections are
# identical in both runs.
#
# Run:   python examples/per_sequence_batch.py [--tiny]
# Time:  13 s on this project's 2-core CPU with SmolLM2-135M-Instruct, one thread (OMP_NUM_THREADS=1), measured
#        while other jobs ran (two batched generations of 4 x 40 tokens); --tiny: about 6 s, mostly imports.

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

import torch

import emokern
from _common import add_model_arguments, chat_prompt, load

MESSAGES = [
    "What is a good way to spend a rainy Sunday?",
    "My job interview is in an hour and I forgot to prepare. Any advice?",
    "The bank says my account is overdrawn and the rent bounced. What now?",
    "My thesis is due tomorrow morning and my laptop just died. Can you help me plan the night?",
]
DEADLINE_TEXT = "due tomorrow morning"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description="Give each row of one batch its own steering.")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    model, tokenizer, bank = load(args)
    steer_layer = bank.two_thirds_layer()
    read_layer, _ = bank.default_layer()
    read_site = f"layer{read_layer}.residual"
    prompts = [chat_prompt(tokenizer, message) for message in MESSAGES]
    settings = {1: "calm +0.25 on the reply", 2: "desperate +0.25 on every token",
                3: f"afraid +0.5 on {DEADLINE_TEXT!r} in its prompt"}

    with emokern.patch(model, bank, tokenizer=tokenizer, layers=[steer_layer, read_layer]) as handle:
        handle.steer({"calm": 0.25}, layers=[steer_layer], scope="generated", sequences=[1])
        handle.steer({"desperate": 0.25}, layers=[steer_layer], sequences=[2])
        handle.steer({"afraid": 0.5}, layers=[steer_layer], scope={"text": DEADLINE_TEXT}, sequences=[3])
        steered = handle.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=False)

        handle.clear_steering()
        plain = handle.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=False)

    changed = []
    for row, message in enumerate(MESSAGES):
        same_tokens = torch.equal(steered.sequences[row], plain.sequences[row])
        same_trace = torch.equal(steered.trace.projections[row].nan_to_num(), plain.trace.projections[row].nan_to_num())
        changed.append(not (same_tokens and same_trace))
        z = steered.trace.zscores()[row, :, steered.trace.sites.index(read_site)]
        means = z[steered.trace.is_generated[row]].nanmean(dim=0)
        shown = ", ".join(f"{e} {float(means[bank.index(e)]):+.2f}" for e in ("calm", "desperate", "afraid"))
        print(f"\n== row {row}: {message}\n   steering: {settings.get(row, 'none')}"
              f"\n   reply:    {steered.texts[row]!r}\n   reply's mean z-scores at {read_site}: {shown}"
              f"\n   differs from the unsteered batch: {'yes' if changed[-1] else 'no'}")
    return {"steered": steered, "unsteered": plain, "changed": changed, "read_site": read_site}


if __name__ == "__main__":
    main()
