# Exporting a bank to a llama.cpp control vector.
#
# What it shows: `emokern.core.control_vectors.export_gguf_control_vector` writes a weighted mix of emotions (here
# calm minus half of desperate) as the GGUF file that `llama-cli --control-vector` reads, scaled so that llama.cpp's
# strength means what emokern.engines.hf's strength means (a fraction of the layer's mean residual-stream norm). The
# file is read back with `read_gguf_control_vector` and checked against the bank, and the script prints the
# llama.cpp command line that applies it to the embedded model's own GGUF. Only the bank is needed, not the model.
#
# Run:   python examples/export_control_vector.py [--mix calm=1 desperate=-0.5] [--all-layers] [--tiny]
# Time:  2.5 s on this project's 2-core CPU with the SmolLM2-135M-Instruct bank, one thread (OMP_NUM_THREADS=1),
#        measured while other jobs ran; --tiny: about 6 s (it builds the tiny model to make its bank).

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import emokern
from emokern.core.control_vectors import export_gguf_control_vector, read_gguf_control_vector
from emokern.core.models import ModelNotInstalledError, UnknownModelError, locate_gguf
from emokern.testing.chat import calibrated_chat_bank, tiny_chat_model
from _common import add_model_arguments, out_dir, real_bank_path


def parse_mix(items: Sequence[str]) -> Dict[str, float]:
    """``["calm=1", "desperate=-0.5"]`` -> ``{"calm": 1.0, "desperate": -0.5}``."""
    mix = {}
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"--mix: expected EMOTION=WEIGHT; got {item!r}")
        mix[name] = float(weight)
    return mix


def model_gguf(model_name: str) -> str:
    """The embedded model's GGUF path for the command line, or a placeholder for models emokern does not ship."""
    try:
        return str(locate_gguf(model_name, tempfile.gettempdir()))
    except (UnknownModelError, ModelNotInstalledError):
        return "MODEL.gguf"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description="Export a mix of emotions as a llama.cpp control vector.")
    add_model_arguments(parser)
    parser.add_argument("--mix", nargs="+", default=["calm=1", "desperate=-0.5"], metavar="EMOTION=WEIGHT")
    parser.add_argument("--all-layers", action="store_true",
                        help="write every layer but 0 (default: only the layer at two thirds of the depth)")
    parser.add_argument("--out", default=None, help="output folder (default: emokern_out/examples/control_vector)")
    args = parser.parse_args(argv)

    if args.tiny:
        model, tokenizer = tiny_chat_model()
        bank = calibrated_chat_bank(model, tokenizer)
    else:
        bank = emokern.VectorBank.load(real_bank_path(args.model, args.bank))
    mix = parse_mix(args.mix)
    # The paper steers one mid-late layer; llama.cpp would add the vector on every layer the file holds.
    layers = None if args.all_layers else [bank.two_thirds_layer()]
    path = out_dir(args, "control_vector") / ("_".join(f"{name}{w:+g}" for name, w in mix.items()) + ".gguf")
    export_gguf_control_vector(bank, path, mix, layers=layers)

    # Read it back and compare with the bank: direction = residual norm x sum of weight x unit emotion vector.
    cv = read_gguf_control_vector(path)
    unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
    worst = 0.0
    for layer, direction in cv.directions.items():
        slot = bank.layer_slot(layer)
        expected = bank.residual_norm[slot] * sum(w * unit[slot, bank.index(name)] for name, w in mix.items())
        worst = max(worst, float((direction - expected).abs().max()))
    d = next(iter(cv.directions.values())).numel()
    print(f"wrote {path}: {len(cv.directions)} direction(s) of {d} values, layers {sorted(cv.directions)}, "
          f"model hint {cv.metadata['controlvector.model_hint']!r}; max |file - bank| = {worst:.1e}")
    first, last = min(cv.directions), max(cv.directions)
    gguf = "MODEL.gguf" if args.tiny else model_gguf(args.model)
    print("apply it with llama.cpp (strength 0.25 = emokern's 0.25, on every token):\n"
          f"  llama-cli -m {gguf} "
          f"--control-vector-scaled {path} 0.25 --control-vector-layer-range {first} {last} -p 'Hello'")
    return {"path": Path(path), "control_vector": cv, "bank": bank, "mix": mix, "max_error": worst}


if __name__ == "__main__":
    main()
