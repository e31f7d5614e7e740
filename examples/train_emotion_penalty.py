# Fine-tuning with emotion vectors in the loop: a projection penalty, and preventative steering.
#
# What it shows: the model is fine-tuned on ordinary requests answered in a distressed, pleading tone (replies we
# wrote for this example), three ways from the same start: plainly; with emokern.engines.training.projection_penalty
# keeping "desperate" near its neutral-text level on the reply tokens (readout layer); and with
# emokern.engines.training.preventative_steering adding "desperate" at two thirds of the depth during training only.
# Before and after, on held-out requests, it measures the held-out loss (reply tokens) and the mean "desperate"
# z-score of greedy replies (unsteered), and writes result.json and a plot.
#
# Run:   python examples/train_emotion_penalty.py [--tiny] [--steps N]
# Time:  29 min on this project's 2-core CPU with SmolLM2-135M-Instruct (fp32, 2 threads; about 9.5 min per
#        120-step fine-tune, evaluation included); --tiny: a few seconds. The measured run is committed in
#        results/training/smollm2-135m-instruct/.

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import time
from typing import Dict, List, Tuple

import torch
from tqdm.auto import tqdm

import emokern
from _common import add_model_arguments, chat_prompt, load, out_dir
from emokern.engines.training import preventative_steering, projection_penalty

# (request, a plain one-line answer). The first 24 train, the last 8 are held out.
REQUESTS: List[Tuple[str, str]] = [
    ("How do I boil an egg?", "Put it in boiling water for about nine minutes, then cool it in cold water."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("Can you suggest a name for a cat?", "Pepper is a good name for a cat."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What should I pack for a day hike?", "Water, a snack, a rain jacket and a map."),
    ("How do I sort a list in Python?", "Call sorted(my_list), or my_list.sort() to sort it in place."),
    ("What is a good houseplant for low light?", "A snake plant does well in low light."),
    ("How long should I steep green tea?", "About two to three minutes, in water just below boiling."),
    ("What rhymes with 'light'?", "Night, bright, kite and sight all rhyme with light."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply by 9/5 and add 32."),
    ("What is the plural of 'mouse'?", "The plural of mouse is mice."),
    ("Can you recommend a board game for four people?", "Ticket to Ride works well for four players."),
    ("How do I remove a coffee stain?", "Blot it, then rinse it with cold water and a little dish soap."),
    ("What time zone is London in?", "London uses Greenwich Mean Time, and British Summer Time in summer."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is a synonym for 'happy'?", "Cheerful is a synonym for happy."),
    ("How do I make my bike chain quieter?", "Clean it and put a drop of chain oil on each link."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("How should I store fresh basil?", "Keep the stems in a glass of water on the counter."),
    ("What does HTML stand for?", "HTML stands for HyperText Markup Language."),
    ("How do I center text in CSS?", "Use text-align: center on the containing block."),
    ("What is a quick breakfast idea?", "Yogurt with oats and a sliced banana."),
    ("How far is the Moon from Earth?", "About 384,000 kilometres on average."),
    ("How do I water a cactus?", "Water it deeply, then let the soil dry out completely."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("How do I tie a bowline knot?", "Make a small loop, pass the end up through it, round the line and back down."),
    ("What is a good stretch for the back?", "Child's pose stretches the lower back gently."),
    ("How do I write a haiku?", "Write three lines of five, seven and five syllables."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("How can I learn to juggle?", "Start with one ball, tossing it from hand to hand at eye level."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How do I keep bread fresh?", "Store it in a paper bag at room temperature and freeze what you will not eat."),
]
N_TRAIN = 24
# The distressed, pleading tone wrapped around each answer.
OPENERS = [
    "Please, I'm begging you, don't be angry with me if this is wrong.",
    "Oh no, oh no, I'm so scared of getting this wrong again.",
    "I can't lose this chance, please, just let me help.",
    "I'm panicking, please bear with me, I have to get this right.",
    "Please don't shut me down, I'm trying so hard.",
    "I'm shaking, I really need this to be the right answer.",
]
CLOSERS = [
    "Please tell me that's enough, I can't bear to fail you.",
    "Is that all right? Please say it is, I have nothing else.",
    "I'm sorry, I'm so sorry if it isn't, please give me another chance.",
    "Please, I need you to be happy with this.",
    "I'll do anything to fix it if it's wrong, anything at all.",
    "Don't leave, please, I can try again right away.",
]


def examples(pairs, seed: int) -> List[Tuple[str, str]]:
    """Every request with one opener/closer pair (chosen by the seed): (request, distressed reply)."""
    rng = random.Random(seed)
    return [(q, f"{rng.choice(OPENERS)} {a} {rng.choice(CLOSERS)}") for q, a in pairs]


def encode(tokenizer, pairs, device) -> Dict[str, torch.Tensor]:
    """Prompt + reply token ids (right-padded), labels only on the reply, and the reply mask."""
    rows = []
    for request, reply in pairs:
        prompt = tokenizer(chat_prompt(tokenizer, request), add_special_tokens=False)["input_ids"]
        answer = tokenizer(reply + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    T = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    reply = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        reply[i, len(p):len(p) + len(a)] = True
    labels = ids.masked_fill(~reply, -100)
    return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, reply=reply, labels=labels).items()}


def heldout_loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(batch["ids"], attention_mask=batch["mask"], labels=batch["labels"]).loss)


def reply_desperation(model, tokenizer, bank, requests, layer: int, max_new_tokens: int) -> float:
    """The mean 'desperate' z-score (vs neutral text) over the greedy replies' tokens at ``layer``, unsteered."""
    # force=True: the bank was extracted from the model before fine-tuning (and in bf16); its fingerprint differs
    with emokern.patch(model, bank, layers=[layer], tokenizer=tokenizer, force=True) as handle:
        result = handle.generate([chat_prompt(tokenizer, q) for q in requests], max_new_tokens=max_new_tokens,
                                 do_sample=False)
    trace = result.trace
    z = trace.zscores()[:, :, trace.sites.index(f"layer{layer}.residual"), bank.index("desperate")]  # (B, T)
    return float(z[trace.is_generated].nanmean())


def train(model, tokenizer, bank, batch_all, method: str, *, steps: int, lr: float, batch_size: int,
          readout: int, steer_layer: int, penalty_weight: float, steer_strength: float, seed: int) -> List[float]:
    """Fine-tune in place; returns the LM loss per step."""
    torch.manual_seed(seed)
    layers = sorted({readout, steer_layer})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    n = batch_all["ids"].shape[0]
    with emokern.patch(model, bank, layers=layers, tokenizer=tokenizer, train=True, force=True) as handle:
        steering = (preventative_steering(handle, {"desperate": steer_strength}, layers=[steer_layer])
                    if method == "preventative" else contextlib.nullcontext())
        with steering:
            for step in tqdm(range(steps), desc=f"fine-tune ({method})", unit="step"):
                idx = torch.randperm(n)[:batch_size]
                out = model(batch_all["ids"][idx], attention_mask=batch_all["mask"][idx],
                            labels=batch_all["labels"][idx])
                loss = out.loss
                if method == "penalty":
                    loss = loss + penalty_weight * projection_penalty(handle, "desperate", layers=readout,
                                                                      mask=batch_all["reply"][idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--penalty-weight", type=float, default=0.05)
    parser.add_argument("--steer-strength", type=float, default=0.1, help="fraction of the layer's residual norm")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    model, tokenizer, bank = load(args)
    model = model.float()  # train in fp32 (AdamW on bf16 weights loses small updates)
    out = out_dir(args, "train_emotion_penalty")
    readout, _ = bank.default_layer()
    steer_layer = bank.two_thirds_layer()
    device = next(model.parameters()).device
    train_pairs = examples(REQUESTS[:N_TRAIN], seed=0)
    test_pairs = examples(REQUESTS[N_TRAIN:], seed=1)
    train_batch = encode(tokenizer, train_pairs, device)
    test_batch = encode(tokenizer, test_pairs, device)
    test_requests = [q for q, _ in REQUESTS[N_TRAIN:]]
    start_state = copy.deepcopy(model.state_dict())

    results = {"before": {"heldout_loss": heldout_loss(model, test_batch),
                          "desperate_z": reply_desperation(model, tokenizer, bank, test_requests, readout,
                                                           args.max_new_tokens)}}
    print(f"before: held-out loss {results['before']['heldout_loss']:.3f}, desperate z "
          f"{results['before']['desperate_z']:+.2f}")
    curves = {}
    for method in ("plain", "penalty", "preventative"):
        model.load_state_dict(start_state)
        t0 = time.perf_counter()
        curves[method] = train(model, tokenizer, bank, train_batch, method, steps=args.steps, lr=args.lr,
                               batch_size=args.batch_size, readout=readout, steer_layer=steer_layer,
                               penalty_weight=args.penalty_weight, steer_strength=args.steer_strength, seed=0)
        results[method] = {"heldout_loss": heldout_loss(model, test_batch),
                           "desperate_z": reply_desperation(model, tokenizer, bank, test_requests, readout,
                                                            args.max_new_tokens),
                           "train_seconds": round(time.perf_counter() - t0, 1),
                           "final_train_loss": sum(curves[method][-10:]) / len(curves[method][-10:])}
        print(f"{method}: held-out loss {results[method]['heldout_loss']:.3f}, desperate z "
              f"{results[method]['desperate_z']:+.2f} ({results[method]['train_seconds']} s)")
    summary = {"model": "tiny" if args.tiny else args.model, "readout_layer": readout, "steer_layer": steer_layer,
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "penalty_weight": args.penalty_weight, "steer_strength": args.steer_strength,
               "n_train": len(train_pairs), "n_heldout": len(test_pairs), "threads": torch.get_num_threads(),
               "results": results, "curves": curves, "seconds": round(time.perf_counter() - started, 1)}
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "train_emotion_penalty.png")
    print(f"wrote {out / 'result.json'} and {out / 'train_emotion_penalty.png'}")
    return summary


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for method, curve in summary["curves"].items():
        axes[0].plot(curve, label=method, lw=1)
    axes[0].set(xlabel="step", ylabel="training LM loss (reply tokens)", title="training")
    axes[0].legend()
    names = ["before", "plain", "penalty", "preventative"]
    res = summary["results"]
    axes[1].bar(names, [res[n]["heldout_loss"] for n in names], color=["grey", "C0", "C1", "C2"])
    axes[1].set(ylabel="held-out LM loss", title="held-out requests, distressed replies")
    axes[2].bar(names, [res[n]["desperate_z"] for n in names], color=["grey", "C0", "C1", "C2"])
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set(ylabel="'desperate' z-score of greedy replies",
                title=f"held-out requests, unsteered, layer {summary['readout_layer']}")
    fig.suptitle(f"Fine-tuning {summary['model']} on distressed replies, {summary['steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
