"""``emokern ui --vllm`` against a stand-in for a vLLM server with the emokern plugin (no vLLM here: the stand-in
answers ``/v1/models``, streamed ``/v1/completions`` and ``/v1/emokern/trace/{id}`` in the shapes documented in
``emokern/engines/vllm/server.py``, checks the spec with the plugin's own parser, and makes up projections). What
this checks: the request the UI sends (prompt ids, spec in ``vllm_xargs``, sampling), how it reads the stream and the
trace, error relay, and that requests from two tabs reach the server at the same time (no queue on this path). It
does not check vLLM itself; ``tests_vllm/`` does that in vLLM's environment."""

import asyncio
import json
import math
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from emokern.engines.vllm import spec as vllm_spec
from emokern.ui.app import create_app
from emokern.ui.requests import SpecLayers
from emokern.ui.vllm_backend import VLLMBackend
from emokern.testing.chat import tiny_chat_bank, tiny_chat_model
from tests.ui_server import serve

LAYER = 2


class FakeVLLM:
    """Generates ``max_tokens`` letters; the projection of emotion k at position t is ``0.01 * t + k`` plus, for a
    steered emotion, its strength x 10 (so the page's readouts show which steering a request had)."""

    def __init__(self, bank, tokenizer):
        self.tok = tokenizer
        self.bank, self.loaded = bank, SpecLayers.of(bank, [LAYER])
        self.bodies, self.records = [], {}
        self.in_flight = self.max_in_flight = 0
        self.n = 0

    def app(self):
        async def models(request):
            return JSONResponse({"data": [{"id": "tiny-served"}]})

        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            try:
                vllm_spec.parse(body["vllm_xargs"]["emokern"], self.loaded)
            except vllm_spec.SpecError as exc:
                return JSONResponse({"error": {"message": str(exc), "type": "BadRequestError", "code": 400}}, 400)
            self.n += 1
            rid = f"cmpl-{self.n}"
            W, N, K = len(body["prompt"]), body["max_tokens"], len(self.bank.names)
            raw = json.loads(body["vllm_xargs"]["emokern"])  # (parsed above only to refuse what the plugin refuses)
            items = raw.get("steer") or []
            push = {self.bank.index(name): value * 10 for item in (items if isinstance(items, list) else [items])
                    for name, value in item["emotions"].items()}
            letters = [chr(ord("a") + (body["seed"] + i) % 26) for i in range(N)]
            ids = [self.tok(c, add_special_tokens=False)["input_ids"][0] for c in letters]
            rows = [[[0.01 * t + k + (push.get(k, 0.0) if t >= W else 0.0) for k in range(K)]]
                    for t in range(W + N - 1)]
            mean = self.bank.neutral_mean[[self.bank.layer_slot(LAYER)]].tolist()
            std = self.bank.neutral_std[[self.bank.layer_slot(LAYER)]].tolist()
            self.records[rid] = {"layers": [LAYER], "names": list(self.bank.names), "prompt_len": W,
                                 "length": len(rows), "projections": rows, "neutral_mean": mean, "neutral_std": std,
                                 "alert": None, "error": None}

            async def stream():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    for i, (tok, letter) in enumerate(zip(ids, letters)):
                        await asyncio.sleep(0.02)
                        chunk = {"id": rid, "object": "text_completion", "choices": [
                            {"index": 0, "text": letter, "token_ids": [tok],
                             "finish_reason": "length" if i == N - 1 else None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    z = [[[round((r[0][k] - mean[0][k]) / std[0][k], 2) for k in range(K)]] for r in rows[W:]]
                    readout = {"layers": [LAYER], "emotions": list(self.bank.names), "values": "zscore",
                               "tokens": z, "alert": None, "error": None}
                    yield f"data: {json.dumps({'id': rid, 'choices': [], 'emokern': [readout]})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(stream(), media_type="text/event-stream")

        async def trace(request):
            record = self.records.pop(request.path_params["rid"], None)
            if record is None:
                return JSONResponse({"error": "no emokern trace is held"}, 404)
            return JSONResponse(record)

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/emokern/trace/{rid}", trace)])


def events(text):
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = tiny_chat_model()
    bank = tiny_chat_bank(model)
    tok_dir = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(tok_dir)
    fake = FakeVLLM(bank, tok)
    with serve(fake.app()) as vllm_url:
        backend = VLLMBackend.connect(vllm_url, bank, tokenizer=str(tok_dir), layers=[LAYER])
        with serve(create_app(backend)) as ui_url:
            yield fake, backend, ui_url, tok


def post(url, payload):
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/api/generate", json=payload)
        return r.status_code, (events(r.text) if r.status_code == 200 else r.json())


def body(**kw):
    return {"messages": [{"role": "user", "content": "Hi there"}], "max_new_tokens": 6, "temperature": 0.5,
            "seed": 4, **kw}


def test_request_shape_stream_and_readouts(setup):
    fake, backend, url, tok = setup
    status, evs = post(url, body(steer=[{"emotions": {"calm": 0.5}, "scope": "generated"}]))
    assert status == 200
    sent = fake.bodies[-1]
    assert sent["model"] == "tiny-served" and sent["stream"] is True and sent["seed"] == 4
    assert sent["prompt"] == tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    spec = json.loads(sent["vllm_xargs"]["emokern"])
    assert spec["steer"] == [{"emotions": {"calm": 0.5}, "scope": "generated"}]
    assert spec["monitor"] == {"emotions": "all", "layers": [LAYER], "prompt": True}
    names = [e for e, _ in evs]
    assert names[0] == "start" and names[-1] == "done" and names.count("token") == 6
    done = [d for e, d in evs if e == "done"][0]
    W = done["n_prompt"]
    assert "".join(done["tokens"][W:]) == "".join(chr(ord("a") + (4 + i) % 26) for i in range(6))
    readout = [d for e, d in evs if e == "readout"][0]
    assert readout["start"] == 0 and len(readout["z"]) == W + 5  # prompt and reply, the last token never read
    k = backend.bank.index("calm")
    # tiny bank: neutral mean 0, std 1, so z = projection; calm's steering shows on the reply only
    assert readout["z"][W - 1][k] == pytest.approx(0.01 * (W - 1) + k, abs=0.006)
    assert readout["z"][W + 1][k] == pytest.approx(0.01 * (W + 1) + k + 5.0, abs=0.006)
    trace = backend.trace(done["id"])
    assert trace.tokens[0] == done["tokens"] and math.isnan(float(trace.projections[0, -1, 0, 0]))


def test_refusals_are_relayed_as_messages(setup):
    fake, backend, url, _ = setup
    status, err = post(url, body(steer=[{"emotions": {"calm": 0.5}, "layers": [1]}]))
    assert status == 400 and "steer.layers" in err["error"]  # checked here first: the server has the op at 2 only
    status, err = post(url, body(steer=[{"emotions": {"clam": 0.5}}]))
    assert status == 400 and "did you mean 'calm'" in err["error"]


def test_two_tabs_reach_the_server_together_with_their_own_steering(setup):
    fake, backend, url, _ = setup
    fake.max_in_flight = 0
    results = {}

    def run(name, strength):
        results[name] = post(url, body(max_new_tokens=10, steer=[{"emotions": {"calm": strength}}]))[1]

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("up", 0.5), ("down", -0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fake.max_in_flight == 2  # batched by the server, not queued here
    k = backend.bank.index("calm")
    for name, sign in (("up", 1), ("down", -1)):
        evs = results[name]
        assert not [d for e, d in evs if e == "queued"]
        W = [d for e, d in evs if e == "done"][0]["n_prompt"]
        z = [d for e, d in evs if e == "readout"][0]["z"]
        assert z[W + 2][k] == pytest.approx(0.01 * (W + 2) + k + sign * 5.0, abs=0.006)


def test_unreachable_server_is_one_clear_error(tmp_path):
    model, tok = tiny_chat_model()
    with pytest.raises(ValueError, match="cannot reach a vLLM server"):
        VLLMBackend.connect("http://127.0.0.1:9", tiny_chat_bank(model), tokenizer="unused")
