# Calling the fused op inside your own nn.Module, without emokern.engines.hf.
#
# What it shows: `EmotionSteering`, a module of about twenty lines that holds a bank's emotion vectors at one
# layer and a steering table, and in `forward` calls the op once: `emokern.project_and_steer_` (in place, under
# no_grad; it runs the registered `torch.ops.emokern.project_and_steer_` kernel) or `emokern.project_and_steer`
# (out of place, differentiable) when autograd is recording. The script
#   1. checks the module against the op's executable specification, `emokern.ops.reference.project_and_steer_ref`,
#      forward and backward, on the model's real hidden states;
#   2. wraps one decoder layer of the model in `SteeredLayer` (your module after the layer) and generates with and
#      without the steering, printing both replies and the module's readout.
#
# Run:   python examples/op_in_module.py [--emotion calm] [--strength 0.25] [--tiny]
# Time:  12 s on this project's 2-core CPU with SmolLM2-135M-Instruct, one thread (OMP_NUM_THREADS=1), measured
#        while other jobs ran (two generations of 40 tokens); --tiny: about 6 s, mostly imports.

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

import torch
from torch import nn

import emokern
from emokern.ops.reference import project_and_steer_ref
from _common import add_model_arguments, chat_prompt, load

MESSAGE = "I just heard that the company is cutting half the team next week. How should I feel about it?"


class EmotionSteering(nn.Module):
    """Projects hidden states (..., d) onto K emotion vectors and steers them by a one-row steering table.

    After each call, ``projections`` holds the (..., K) fp32 projections of the input: the module reads the emotions
    and steers them in the same pass over the hidden states.
    """

    def __init__(self, vectors: torch.Tensor, names: Sequence[str]):
        super().__init__()
        self.names = list(names)
        # Unit vectors, so a table's amounts are distances along each emotion (as emokern.engines.hf uses them).
        self.register_buffer("vectors", nn.functional.normalize(vectors.float(), dim=-1))
        # Buffers, not a SteeringTable attribute, so that .to(device) moves them with the module.
        for name, table in zip(("a", "b", "lo", "hi"), emokern.SteeringTable(R=1, K=len(self.names))):
            self.register_buffer(name, table)
        self.projections: Optional[torch.Tensor] = None

    def use(self, table: emokern.SteeringTable) -> "EmotionSteering":
        """Copy a one-row table (built with SteeringTable's add/ablate/set/scale/clamp) into the module."""
        for buffer, values in zip((self.a, self.b, self.lo, self.hi), table):
            buffer.copy_(values)
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        V = self.vectors.to(h.dtype)
        if torch.is_grad_enabled() and h.requires_grad:
            h, self.projections = emokern.project_and_steer(h, V, None, self.a, self.b, self.lo, self.hi)
        else:
            # In place: no copy of the hidden states. row=None steers every token with table row 0. validate=False
            # skips the per-call value checks (a host sync each); the tables were checked when they were built.
            self.projections = emokern.project_and_steer_(h, V, None, self.a, self.b, self.lo, self.hi,
                                                          validate=False)
        return h


class SteeredLayer(nn.Module):
    """A decoder layer followed by an :class:`EmotionSteering` on its output (the residual stream)."""

    def __init__(self, layer: nn.Module, steering: EmotionSteering):
        super().__init__()
        self.layer, self.steering = layer, steering

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            return (self.steering(out[0]),) + tuple(out[1:])
        return self.steering(out)


def check_against_reference(steering: EmotionSteering, h: torch.Tensor) -> Dict[str, float]:
    """Largest differences between the module and the reference op (fp64), forward and in the gradient w.r.t. h,
    each relative to the largest magnitude of the reference's values (the kernels accumulate in fp32)."""
    h = h.detach().float()
    every_token = torch.zeros(h.shape[0], dtype=torch.int32)  # the module steers every token with table row 0
    tables = (steering.a, steering.b, steering.lo, steering.hi)
    with torch.no_grad():
        out = steering(h.clone())  # the in-place path
    ref_out, ref_P = project_and_steer_ref(h, steering.vectors, every_token, *tables)

    weights = torch.randn_like(h)  # a random linear loss: its gradient reaches every output element
    x = h.clone().requires_grad_()
    (steering(x) * weights).sum().backward()  # the differentiable path
    x_ref = h.double().requires_grad_()
    ref_out64, _ = project_and_steer_ref(x_ref, steering.vectors.double(), every_token, *tables)
    (ref_out64 * weights.double()).sum().backward()

    def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
        return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())

    return {"output": relative(out, ref_out), "projections": relative(steering.projections.detach(), ref_P),
            "grad": relative(x.grad, x_ref.grad)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description="Use the fused op inside your own nn.Module.")
    add_model_arguments(parser)
    parser.add_argument("--emotion", default="calm")
    parser.add_argument("--strength", type=float, default=0.25,
                        help="amount added, as a fraction of the layer's mean residual-stream norm")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    model, tokenizer, bank = load(args)
    layer = bank.two_thirds_layer()
    slot = bank.layer_slot(layer)
    steering = EmotionSteering(bank.vectors[slot], bank.names).to(next(model.parameters()).device)
    k = bank.index(args.emotion)
    amount = args.strength * float(bank.residual_norm[slot])
    steering.use(emokern.SteeringTable(R=1, K=len(bank.names)).add(0, k=k, c=amount))

    prompt = chat_prompt(tokenizer, MESSAGE)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)

    # 1. The module against the specification, on this layer's real hidden states for the prompt.
    with torch.no_grad():
        # hidden_states[i + 1] is decoder layer i's output (the residual stream) for every layer but the last
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer + 1][0]  # (T, d)
    errors = check_against_reference(steering, hidden)
    # (With only `add` in the table the gradient w.r.t. h passes straight through; tests/test_examples.py checks the
    # module with every mode.)
    print(f"module vs reference, on fp32 hidden states (max |difference| / max |reference|): output "
          f"{errors['output']:.1e}, projections {errors['projections']:.1e}, gradient {errors['grad']:.1e}")

    # 2. The module inside the model: replace decoder layer `layer` by the layer followed by the module. (The decoder
    # layers are model.model.layers in Llama, Mistral and Qwen; emokern.core.architecture.ARCHITECTURES lists other
    # families.)
    layers = model.model.layers
    original = layers[layer]
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        plain_ids = model.generate(**inputs, **kwargs)
        layers[layer] = SteeredLayer(original, steering)
        try:
            steered_ids = model.generate(**inputs, **kwargs)
        finally:
            layers[layer] = original  # the model as it was
    width = inputs["input_ids"].shape[1]
    plain, steered = (tokenizer.decode(ids[0, width:], skip_special_tokens=True) for ids in (plain_ids, steered_ids))
    last = steering.projections.reshape(-1, len(bank.names))[-1]
    print(f"\nunsteered: {plain!r}\n{args.emotion} +{args.strength}: {steered!r}")
    print(f"{args.emotion} projection of layer {layer}'s output at the last token (before the module's add): "
          f"{float(last[k]):+.2f}; the module added {amount:.2f}")
    return {"errors": errors, "plain_ids": plain_ids, "steered_ids": steered_ids, "layer": layer,
            "steering": steering, "model": model, "hidden": hidden}


if __name__ == "__main__":
    main()
