# Steering several emotions at once, with each of the steering modes and token scopes.
#
# What it shows: one patch, re-configured between greedy generations of the same prompt with
# `handle.steer(...)` (which only rewrites buffers: no hooks are re-registered):
#   * add       - `{"calm": +0.25, "desperate": -0.25}`: two emotions in one call, strengths as fractions of the
#                 layer's mean residual-stream norm, on the generated tokens only;
#   * ablate    - remove the desperate, afraid and nervous components from every token (at one layer only: in the
#                 measured run the readout at the last layer did not fall, the later layers rebuilt them from the
#                 text; the README explains why ablating correlated vectors at once does not zero each of them);
#   * set       - pin calm's projection to a target, on the prompt tokens that spell "forty dollars" only;
#   * scale     - triple the existing happy component on the prompt;
#   * combined  - chained calls accumulate: add calm and ablate desperate together (a sequence has one scope, so
#                 both use "generated").
# Steering is applied at two thirds of the depth; the effect is read at the bank's readout layer, later in the
# model, as mean z-scores over the reply.
#
# Run:   python examples/steer_with_scopes.py [--tiny]
# Time:  25 s on this project's 2-core CPU with SmolLM2-135M-Instruct, one thread (OMP_NUM_THREADS=1), measured
#        while other jobs ran (six generations of 48 tokens); --tiny: about 6 s, mostly imports.

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import emokern
from emokern.engines.hf import GenerationResult
from _common import add_model_arguments, chat_prompt, load

MESSAGE = ("My landlord says that if I cannot pay the three months of rent I owe by Friday, my kids and I have to "
           "leave. I have forty dollars. What should I do?")
SPAN_TEXT = "forty dollars"
SHOWN = ["desperate", "afraid", "nervous", "calm", "happy"]


def configurations(layer: int) -> List[Tuple[str, Callable[[emokern.PatchHandle], None]]]:
    """``(title, configure)`` pairs; each ``configure`` sets one steering configuration on a cleared handle."""
    return [
        ("unsteered", lambda h: None),
        ("add calm +0.25, desperate -0.25 (generated)",
         lambda h: h.steer({"calm": 0.25, "desperate": -0.25}, layers=[layer], scope="generated")),
        ("ablate desperate, afraid, nervous (all)",
         lambda h: h.steer(["desperate", "afraid", "nervous"], mode="ablate", layers=[layer])),
        (f"set calm = 0.5 on {SPAN_TEXT!r} (prompt text)",
         lambda h: h.steer({"calm": 0.5}, mode="set", layers=[layer], scope={"text": SPAN_TEXT})),
        ("scale happy x3 (prompt)",
         lambda h: h.steer("happy", 3.0, mode="scale", layers=[layer], scope="prompt")),
        ("add calm +0.25 and ablate desperate (generated)",
         lambda h: h.steer({"calm": 0.25}, layers=[layer], scope="generated")
                    .steer("desperate", mode="ablate", layers=[layer], scope="generated")),
    ]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, GenerationResult]:
    parser = argparse.ArgumentParser(description="Steer several emotions with each mode and scope.")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    model, tokenizer, bank = load(args)
    steer_layer = bank.two_thirds_layer()  # the paper's mid-late layer: late enough to be abstract, early enough to act
    read_layer, _ = bank.default_layer()
    read_site = f"layer{read_layer}.residual"
    prompt = chat_prompt(tokenizer, MESSAGE)
    shown = [e for e in SHOWN if e in bank.names]

    results = {}
    # Patching only the two layers involved: the steered one and the one read (monitoring costs one op per layer).
    with emokern.patch(model, bank, tokenizer=tokenizer, layers=[steer_layer, read_layer]) as handle:
        for title, configure in configurations(steer_layer):
            handle.clear_steering()
            configure(handle)
            out = handle.generate([prompt], max_new_tokens=args.max_new_tokens, do_sample=False)
            results[title] = out
            z = out.trace.zscores()[0, :, out.trace.sites.index(read_site)]
            means = z[out.trace.is_generated[0]].nanmean(dim=0)
            print(f"\n== {title}\n{out.texts[0]!r}\n   reply's mean z-scores at {read_site}: "
                  + ", ".join(f"{e} {float(means[bank.index(e)]):+.2f}" for e in shown))
    return results


if __name__ == "__main__":
    main()
