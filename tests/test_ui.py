"""``emokern ui``'s API on the tiny random chat model (in-process client, and a real server where requests must
overlap): streamed events, readouts against the stored trace, seeds, steering, the alert, exports, bad input, the
queue and the command line."""

import json
import threading

import httpx
import pytest
import torch
from starlette.testclient import TestClient

from emokern.core.trace import Trace
from emokern.ui.app import create_app
from emokern.ui.backends import HFBackend
from emokern.ui.requests import Limits
from emokern.testing.chat import tiny_chat_bank, tiny_chat_model
from tests.ui_server import serve

pytestmark = pytest.mark.usefixtures("one_thread")


def events(text: str):
    """The (event, data) pairs of a server-sent-events body."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def body(content="How are you today?", **kw):
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_new_tokens": 12, **kw}


@pytest.fixture(scope="module")
def backend():
    model, tok = tiny_chat_model()
    bank = tiny_chat_bank(model)
    be = HFBackend(model, tok, bank, model_name="tiny", limits=Limits(max_prompt_tokens=200, max_new_tokens=64))
    yield be
    be.close()


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(backend)) as c:
        yield c


def generate(client, payload):
    r = client.post("/api/generate", json=payload)
    assert r.status_code == 200, r.text
    return events(r.text)


def by_name(evs, name):
    return [d for e, d in evs if e == name]


def test_info_lists_the_bank_and_the_queue(client, backend):
    info = client.get("/api/info").json()
    assert info["emotions"] == list(backend.bank.names)
    assert info["layers"] == [0, 1, 2, 3] and info["readout_layer"] in info["layers"]
    assert info["backend"] == "hf" and "one request at a time" in info["queue"]
    assert info["values"] == "zscore" and info["max_strength"] == 100


def test_stream_order_tokens_and_readouts_match_the_stored_trace(client, backend):
    evs = generate(client, body())
    names = [e for e, _ in evs]
    assert names[0] == "start" and names[-1] == "done" and "error" not in names
    start, done = by_name(evs, "start")[0], by_name(evs, "done")[0]
    W = len(start["prompt_tokens"])
    assert done["n_prompt"] == W and done["n_generated"] == len(by_name(evs, "token")) == 12
    assert [t["i"] for t in by_name(evs, "token")] == list(range(W, W + 12))
    # every position but the last generated one is read exactly once, in order
    z = {}
    for r in by_name(evs, "readout"):
        for j, row in enumerate(r["z"]):
            assert r["start"] + j not in z
            z[r["start"] + j] = (row, r["norm"][j])
    assert sorted(z) == list(range(W + 11))
    trace = backend.trace(done["id"])
    assert trace.tokens[0] == done["tokens"] == Trace.decode_tokens(backend.tokenizer, trace.token_ids[0].tolist())
    assert done["tokens"][:W] == start["prompt_tokens"]
    site = f"layer{backend.readout_layer}.residual"
    zs = trace.zscores()[0, :, trace.sites.index(site)]
    proj = trace.projections[0, :, trace.sites.index(site)]
    for t, (row, norm) in z.items():
        assert row == pytest.approx(zs[t].tolist(), abs=6e-5)
        assert norm == pytest.approx(float(proj[t].double().norm()), rel=1e-3)
    assert torch.isnan(proj[W + 11]).all()  # the last token was never fed back
    assert done["stop"] == "length" and done["ttft_s"] > 0 and done["tokens_per_s"] > 0


def test_same_seed_same_reply_and_steering_changes_it(client):
    sampled = body(temperature=1.0, seed=7)
    a, b = generate(client, sampled), generate(client, sampled)
    assert by_name(a, "done")[0]["tokens"] == by_name(b, "done")[0]["tokens"]
    other = generate(client, dict(sampled, seed=8))
    assert by_name(other, "done")[0]["tokens"] != by_name(a, "done")[0]["tokens"]
    steered = generate(client, dict(sampled, steer=[{"emotions": {"happy": 3.0}, "layers": [1, 2]}]))
    assert by_name(steered, "done")[0]["tokens"] != by_name(a, "done")[0]["tokens"]
    # steering ends with its request: the next unsteered one is the first again
    again = generate(client, sampled)
    assert by_name(again, "done")[0]["tokens"] == by_name(a, "done")[0]["tokens"]


def test_alert_fires_where_the_readout_crosses_and_stops(client, backend):
    plain = generate(client, body())
    W = len(by_name(plain, "start")[0]["prompt_tokens"])
    k = backend.bank.index("calm")
    zs = {}
    for r in by_name(plain, "readout"):
        for j, row in enumerate(r["z"]):
            zs[r["start"] + j] = row[k]
    gen_z = [zs[t] for t in range(W, W + 11)]
    threshold = sorted(gen_z)[5] - 1e-3  # crossed by some generated tokens, not all
    expected = next(i for i, v in enumerate(gen_z) if v > threshold)
    evs = generate(client, body(alert={"emotion": "calm", "z": threshold, "tokens": 1, "stop": True}))
    alert, done = by_name(evs, "alert")[0], by_name(evs, "done")[0]
    assert alert["position"] == W + expected and alert["stopped"] is True
    assert done["stop"] == "alert" and done["n_generated"] == expected + 2  # read one step after it was sampled
    no_stop = generate(client, body(alert={"emotion": "calm", "z": threshold, "tokens": 1, "stop": False}))
    assert by_name(no_stop, "alert")[0]["position"] == W + expected
    assert by_name(no_stop, "done")[0]["n_generated"] == 12


@pytest.mark.parametrize("payload, message", [
    (body(steer=[{"emotions": {"calmm": 0.5}}]), "did you mean 'calm'"),
    (body(steer=[{"emotions": {"calm": 500}}]), "at most 100"),
    (body(steer=[{"emotions": {"calm": 0.5}, "layers": [9]}]), "steer.layers"),
    (body(steer=[{"emotions": {"calm": 0.5}, "mode": "boost"}]), "'mode' must be one of"),
    (body(content="x" * 500), "the prompt is too long"),
    (body(max_new_tokens=1000), "'max_new_tokens' must be between 1 and 64"),
    (body(temperature="hot"), "'temperature' must be a finite number"),
    (body(alert={"emotion": "nope", "z": 1}), "alert.emotion"),
    (body(shout=True), "unknown request fields ['shout']"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must end with a non-empty user message"),
])
def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, payload, message):
    r = client.post("/api/generate", json=payload)
    assert r.status_code == 400
    assert message in r.json()["error"]
    assert "Traceback" not in r.text
    assert by_name(generate(client, body(max_new_tokens=2)), "done")


def test_bad_json_and_wrong_types(client):
    for raw in (b"{bad", b"[1, 2]", b"\xff\xfe"):
        r = client.post("/api/generate", content=raw)
        assert r.status_code == 400 and ("not valid JSON" in r.json()["error"] or "JSON object" in r.json()["error"])
    assert by_name(generate(client, body(max_new_tokens=2)), "done")


def test_exports(client, backend):
    done = by_name(generate(client, body()), "done")[0]
    j = client.get(f"/api/trace/{done['id']}.json")
    assert j.status_code == 200 and "attachment" in j.headers["content-disposition"]
    data = j.json()
    assert data["tokens"][0] == done["tokens"] and data["sites"] == [f"layer{backend.readout_layer}.residual"]
    assert len(data["projections"][0]) == len(done["tokens"])
    assert len(client.get(f"/api/trace/{done['id']}.json?layers=all").json()["sites"]) == 4
    h = client.get(f"/api/trace/{done['id']}.html?emotion=calm&emotions=happy,sad")
    assert h.status_code == 200 and h.text.startswith("<!DOCTYPE html>")
    assert 'id="emokern-select"' in h.text and "calm" in h.text and "http" not in h.text.split("<body>")[1]
    assert client.get(f"/api/trace/{done['id']}.html?emotion=cal").json()["error"].startswith("heatmap: emotion")
    assert client.get("/api/trace/g99999.json").status_code == 404
    assert client.get(f"/api/trace/{done['id']}.json?layers=some").status_code == 400


def test_the_page_and_its_files_are_served_without_external_resources(client):
    page = client.get("/").text
    js, css = client.get("/static/app.js"), client.get("/static/style.css")
    assert js.status_code == css.status_code == 200
    for text in (page, js.text, css.text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


class GatedBackend(HFBackend):
    """Holds its first sampling step until ``gate`` is set, so a second request surely arrives while the first one
    runs."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()

    def _sample(self, *a, **kw):
        self.gate.wait(30)
        return super()._sample(*a, **kw)


def test_two_tabs_queue_and_keep_their_own_steering():
    model, tok = tiny_chat_model()
    be = GatedBackend(model, tok, tiny_chat_bank(model), model_name="tiny")
    steered = body(steer=[{"emotions": {"happy": 3.0}, "layers": [1, 2]}])
    results = {}
    with serve(create_app(be)) as url:
        def run(name, payload):
            with httpx.Client(timeout=60) as c:
                results[name] = events(c.post(f"{url}/api/generate", json=payload).text)

        first = threading.Thread(target=run, args=("steered", steered))
        first.start()
        while be._pending < 1:  # the first request is in (held at its first token)
            threading.Event().wait(0.01)
        second = threading.Thread(target=run, args=("plain", body()))
        second.start()
        while be._pending < 2:
            threading.Event().wait(0.01)
        be.gate.set()
        first.join(60)
        second.join(60)
        with httpx.Client(timeout=60) as c:  # each alone, one after the other, for reference
            alone_plain = events(c.post(f"{url}/api/generate", json=body()).text)
            alone_steered = events(c.post(f"{url}/api/generate", json=steered).text)
    be.close()
    assert by_name(results["plain"], "queued") == [{"ahead": 1}]
    assert not by_name(results["steered"], "queued")
    assert by_name(results["plain"], "done")[0]["tokens"] == by_name(alone_plain, "done")[0]["tokens"]
    assert by_name(results["steered"], "done")[0]["tokens"] == by_name(alone_steered, "done")[0]["tokens"]
    assert by_name(alone_plain, "done")[0]["tokens"] != by_name(alone_steered, "done")[0]["tokens"]


def test_cli_says_how_to_build_a_missing_bank(tmp_path, monkeypatch, capsys):
    from emokern.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "make demo" in err and "emokern extract" in err


def test_cli_defaults_listen_on_this_machine_only():
    from emokern.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.vllm is None
    assert args.bank == "emokern_out/bank/smollm2-135m-instruct.json"


def test_a_page_that_goes_away_stops_its_generation():
    model, tok = tiny_chat_model()
    be = HFBackend(model, tok, tiny_chat_bank(model), model_name="tiny", limits=Limits(max_new_tokens=5000))
    with serve(create_app(be)) as url:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{url}/api/generate", json=body(max_new_tokens=5000)) as r:
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        break  # the page closes the stream (Stop, or the tab is closed) after the first token
            job_id = None
            for _ in range(600):  # the worker stops at its next token and keeps the trace of what it made
                job_id = next((f"g{i}" for i in range(1, 4) if be.trace(f"g{i}") is not None), None)
                if job_id:
                    break
                threading.Event().wait(0.05)
            assert job_id is not None
            assert be.trace(job_id).projections.shape[1] < 1000
            after = events(c.post(f"{url}/api/generate", json=body(max_new_tokens=3)).text)
    be.close()
    assert by_name(after, "done")[0]["n_generated"] == 3


def test_the_command_serves_a_saved_model_and_bank(tmp_path):
    import subprocess
    import sys

    model, tok = tiny_chat_model()
    bank = tiny_chat_bank(model)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    bank.save(tmp_path / "bank")
    proc = subprocess.Popen([sys.executable, "-m", "emokern", "ui", "--model", str(tmp_path / "model"), "--bank",
                             str(tmp_path / "bank.json"), "--port", "0", "--dtype", "float32", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("emokern ui: http://127.0.0.1:"), line
        url = line.split()[2]
        with httpx.Client(timeout=60) as c:
            assert c.get(url).status_code == 200
            info = c.get(url + "api/info").json()
            assert info["emotions"] == list(bank.names) and info["backend"] == "hf"
            assert by_name(events(c.post(url + "api/generate", json=body(max_new_tokens=3)).text), "done")
    finally:
        proc.terminate()
        proc.wait(30)
