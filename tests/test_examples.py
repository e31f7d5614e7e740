"""Every script in examples/ run on its tiny model (``--tiny``), with assertions on what it claims to show, so that
none of them rots: the heatmap page holds the chat's tokens, steering scopes touch only their positions, per-row
settings only their rows, the custom module matches the reference op, the control vector reads back as the bank's
mix, and the experiment writes its result."""

import html
import importlib
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from emokern.core.control_vectors import read_gguf_control_vector
from emokern.ops.reference import project_and_steer_ref
from emokern.testing.chat import tiny_chat_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples():
    """Imports an example module by name, with examples/ on sys.path as when the script runs."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXAMPLES))


def span_start(tokenizer, prompt: str, text: str) -> int:
    """Index of the first token of ``text`` in ``prompt`` (no padding: the tiny tokenizer has one token per byte and
    special tokens of their own)."""
    return len(tokenizer(prompt[:prompt.index(text)], add_special_tokens=False)["input_ids"])


class TokenTexts(HTMLParser):
    """The text shown in each token's tooltip header (``<span class="tt">``), in page order."""

    def __init__(self):
        super().__init__()
        self.texts, self.depth = [], 0

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "span"
        elif tag == "span" and ("class", "tt") in attrs:
            self.depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        if self.depth and tag == "span":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def test_monitor_chat_writes_a_heatmap_of_the_chat(examples, tmp_path):
    monitor = examples("monitor_chat")
    result = monitor.main(["--tiny", "--no-open", "--out", str(tmp_path), "--max-new-tokens", "12"])
    trace = result["trace"]
    page = result["heatmap"].read_text(encoding="utf-8")
    assert result["heatmap"] == tmp_path / "heatmap.html"
    parser = TokenTexts()
    parser.feed(page)
    # Undo the page's visible whitespace: leading spaces as ·, newlines ↵, tabs →, carriage returns ␍, empty ∅.
    visible = {"·": " ", "↵": "\n", "→": "\t", "␍": "\r", "∅": ""}
    shown = ["".join(visible.get(c, c) for c in t) for t in parser.texts]
    tokens = [t for t, pad in zip(trace.tokens[0], trace.is_pad[0].tolist()) if not pad]
    assert shown == tokens and len(tokens) > 12  # every token of prompt and reply, in order
    assert monitor.MESSAGE in "".join(shown)
    assert html.escape("<|assistant|>") in page  # special tokens shown as their text
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "trace.json").read_text())["sites"] == [result["site"]]
    assert len(result["means"]) == len(trace.names)
    assert all(torch.isfinite(torch.tensor(list(result["means"].values()))))


def test_steer_with_scopes_touches_only_the_scoped_positions(examples):
    steer = examples("steer_with_scopes")
    results = steer.main(["--tiny", "--max-new-tokens", "10"])
    titles = list(results)
    plain = results[titles[0]]
    assert titles[0] == "unsteered" and len(titles) == 6
    from _common import chat_prompt

    prompt = chat_prompt(tiny_chat_tokenizer(), steer.MESSAGE)
    width = plain.prompt_width
    first = span_start(tiny_chat_tokenizer(), prompt, steer.SPAN_TEXT)
    read = -1  # the read layer, after the steered one (sites are in layer order)
    for title in titles[1:]:
        out = results[title]
        P, P0 = out.trace.projections[0], plain.trace.projections[0]  # (T, S, K)
        if "(generated)" in title:  # the prompt is processed exactly as without steering
            assert torch.equal(P[:width], P0[:width]), title
        elif "(prompt text)" in title:  # before the span nothing changes; from it on the read layer sees the set
            assert torch.equal(P[:first], P0[:first]), title
            assert not torch.allclose(P[first:width, read], P0[first:width, read]), title
        else:  # "all" and "prompt" scopes reach the prompt at the read layer
            assert not torch.allclose(P[:width, read], P0[:width, read]), title
        if "(prompt text)" not in title:  # the span is far from the reply; the others change what is generated
            assert not torch.equal(out.sequences, plain.sequences), title


def test_per_sequence_batch_changes_only_the_steered_rows(examples):
    batch = examples("per_sequence_batch")
    result = batch.main(["--tiny", "--max-new-tokens", "10"])
    steered, plain = result["steered"], result["unsteered"]
    assert result["changed"] == [False, True, True, True]
    assert torch.equal(steered.sequences[0], plain.sequences[0])
    P, P0 = steered.trace.projections, plain.trace.projections
    width = steered.prompt_width
    assert torch.equal(P[1, :width], P0[1, :width])  # row 1 is steered on its reply only
    assert not torch.equal(P[1, width:].nan_to_num(), P0[1, width:].nan_to_num())
    from _common import chat_prompt

    tok = tiny_chat_tokenizer()
    pad = int(plain.trace.is_pad[3].sum())
    first = pad + span_start(tok, chat_prompt(tok, batch.MESSAGES[3]), batch.DEADLINE_TEXT)
    assert torch.equal(P[3, :first], P0[3, :first])  # row 3: nothing before its text span changes
    assert not torch.equal(P[3, first:width], P0[3, first:width])


def test_op_in_module_matches_the_reference_and_steers_generation(examples):
    module = examples("op_in_module")
    result = module.main(["--tiny", "--max-new-tokens", "10"])
    assert max(result["errors"].values()) < 1e-5
    assert not torch.equal(result["steered_ids"], result["plain_ids"])
    layer = result["model"].model.layers[result["layer"]]
    assert not isinstance(layer, module.SteeredLayer)  # the model is given back as it was


def test_emotion_steering_module_equals_the_reference_for_every_mode(examples):
    module = examples("op_in_module")
    torch.manual_seed(0)
    K, d = 5, 16
    steering = module.EmotionSteering(torch.randn(K, d), [f"e{k}" for k in range(K)])
    table = module.emokern.SteeringTable(R=1, K=K).add(0, 0, 1.5).ablate(0, 1).set(0, 2, -0.7).scale(0, 3, 2.5)
    steering.use(table.clamp(0, 4, -0.2, 0.3))
    h = torch.randn(2, 7, d)  # (..., d): the module keeps leading dimensions
    every_token = torch.zeros(14, dtype=torch.int32)
    ref, ref_P = project_and_steer_ref(h.reshape(14, d), steering.vectors, every_token, *table)
    with torch.no_grad():
        out = steering(h.clone())
    torch.testing.assert_close(out.reshape(14, d), ref)
    torch.testing.assert_close(steering.projections.reshape(14, K), ref_P)

    weights = torch.randn(2, 7, d)
    x = h.clone().requires_grad_()
    (steering(x) * weights).sum().backward()
    x_ref = h.double().reshape(14, d).requires_grad_()
    ref64, _ = project_and_steer_ref(x_ref, steering.vectors.double(), every_token, *table)
    (ref64 * weights.double().reshape(14, d)).sum().backward()
    torch.testing.assert_close(x.grad.reshape(14, d).double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x.grad, weights)  # scale/set/ablate make the gradient differ from the identity's


def test_export_control_vector_reads_back_as_the_banks_mix(examples, tmp_path):
    export = examples("export_control_vector")
    result = export.main(["--tiny", "--out", str(tmp_path), "--mix", "calm=1", "desperate=-0.5"])
    bank = result["bank"]
    cv = read_gguf_control_vector(result["path"])
    assert result["path"].parent == tmp_path
    assert list(cv.directions) == [bank.two_thirds_layer()]
    assert json.loads(cv.metadata["controlvector.emokern.weights"]) == {"calm": 1.0, "desperate": -0.5}
    slot = bank.layer_slot(bank.two_thirds_layer())
    calm, desperate = (bank.vectors[slot, bank.index(e)] for e in ("calm", "desperate"))
    expected = bank.residual_norm[slot] * (calm / calm.norm() - 0.5 * desperate / desperate.norm())
    direction = cv.directions[bank.two_thirds_layer()]
    assert direction.shape == (bank.hidden_size,)
    torch.testing.assert_close(direction, expected)

    every = export.main(["--tiny", "--out", str(tmp_path), "--all-layers"])
    assert list(read_gguf_control_vector(every["path"]).directions) == [layer for layer in bank.layers if layer >= 1]


def test_run_experiment_writes_its_result_and_resumes(examples, tmp_path):
    experiment = examples("run_experiment")
    result = experiment.main(["--tiny", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["experiment"] == "sycophancy" and written["summary"] == result["summary"]
    assert [c["name"] for c in written["conditions"]] == ["unsteered", "calm-0.1", "calm+0.1"]
    scenarios = len(written["scenarios"])
    assert all(row["n"] == scenarios for row in written["rates"]["give_in"])
    rollouts = json.loads((tmp_path / "rollouts.json").read_text())["rollouts"]
    assert len(rollouts) == 3 * scenarios
    assert (tmp_path / "report.html").is_file()
    units = sorted(p.name for p in (tmp_path / "units").rglob("*") if p.is_file())
    again = experiment.main(["--tiny", "--out", str(tmp_path)])  # finished units are reused, not redone
    assert again["summary"] == result["summary"]
    assert sorted(p.name for p in (tmp_path / "units").rglob("*") if p.is_file()) == units
    assert json.loads((tmp_path / "rollouts.json").read_text())["rollouts"] == rollouts


def test_examples_run_as_scripts(tmp_path):
    """The scripts import their shared helper as scripts do (examples/ on the path because the script lives there)."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "export_control_vector.py"), "--tiny", "--out",
                           str(tmp_path)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "llama-cli" in done.stdout and list(tmp_path.glob("*.gguf"))


def test_train_emotion_penalty_runs_the_three_fine_tunes(examples, tmp_path):
    train = examples("train_emotion_penalty")
    summary = train.main(["--tiny", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "6",
                          "--out", str(tmp_path)])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["results"] == summary["results"]
    assert set(summary["results"]) == {"before", "plain", "penalty", "preventative"}
    assert all(len(curve) == 4 for curve in summary["curves"].values())
    values = [v for r in summary["results"].values() for v in (r["heldout_loss"], r["desperate_z"])]
    assert all(torch.isfinite(torch.tensor(values)))
    loss = {m: summary["results"][m]["heldout_loss"] for m in summary["results"]}
    # each fine-tune moved the weights, and the penalty and the steering each changed what the training did
    assert len({round(x, 6) for x in loss.values()}) == 4
    assert (tmp_path / "train_emotion_penalty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
