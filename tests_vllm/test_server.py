"""The OpenAI-compatible server end to end on 127.0.0.1, started by the README's own commands: the serve block of its
vLLM section runs as printed from the checkout's root (``bash``; only the port is changed, to a free one), with the
test bank in ``EMOKERN_VLLM_BANK`` / ``EMOKERN_VLLM_LAYERS`` (conftest) in place of the bank of ``make demo``, and the
README's chat ``curl`` then answers. Then: a steered, monitored chat request (spec as a JSON string in
``vllm_xargs``) and its trace from ``GET /v1/emokern/trace/{id}``, the same from ``/v1/completions``, bad specs and
requests that used to kill the engine answered 400 while the server keeps serving, and 404 for an unknown id. One
compiled server (the README's command has no ``--enforce-eager``), its process group killed at the end."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import LAYERS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_serve_block() -> str:
    """The bash block of the README's "Over HTTP" paragraph."""
    text = (ROOT / "README.md").read_text()
    start = text.index("Over HTTP, from the checkout's root")
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, "the README's vLLM section lost its serve block"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body=None, headers=None, method=None, raw: bytes = None, timeout: float = 120):
    """``(status, JSON answer)`` of a request with a JSON ``body`` (or the bytes ``raw``) and extra ``headers``."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def server(bank, hf, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    lines = _readme_serve_block().replace("8000", str(port)).splitlines()
    end = next(i for i, line in enumerate(lines) if line.rstrip().endswith("&"))
    serve, curl = "\n".join(lines[:end + 1]), "\n".join(lines[end + 1:])
    assert lines[0].startswith("MODEL=") and ".venv-vllm/bin/python -P" in serve and "--host 127.0.0.1" in serve
    assert "curl" in curl
    assert os.path.abspath(sys.executable).startswith(str(ROOT / ".venv-vllm")), "run in .venv-vllm: make test-vllm"
    with open(log, "w") as out:  # "wait": the server runs in the block's background, bash stays its parent
        proc = subprocess.Popen(["bash", "-c", serve + "\nwait"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        # the README's chat request, as printed (without the trace placeholder), MODEL defined as printed
        chat = "\n".join([lines[0]] + [line for line in curl.splitlines() if "chatcmpl-..." not in line])
        answer = subprocess.run(["bash", "-c", chat], cwd=ROOT, capture_output=True, text=True, timeout=300)
        body = json.loads(answer.stdout)
        assert body["choices"][0]["message"]["content"], body
        status, trace = _call(f"{base}/v1/emokern/trace/{body['id']}")
        assert status == 200 and trace["length"] == sum(body["usage"][k] for k in ("prompt_tokens",
                                                                                      "completion_tokens")) - 1
        yield base, log
    finally:
        _kill_group(proc)


def wait_healthy(base: str, proc, log, seconds: float = 600) -> None:
    """Return once ``base/health`` answers 200; fail the test with the log's tail when the server exits or
    ``seconds`` pass."""
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"vllm serve did not come up (exit {proc.poll()}); log:\n{log.read_text()[-4000:]}")
        time.sleep(2)


def _kill_group(proc) -> None:
    """Stop the API server, its engine core and its worker (one process group)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            os.killpg(proc.pid, 0)  # children may outlive the leader
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass


def _model() -> str:
    from emokern.core.models import model_cache_dir

    return str(model_cache_dir("smollm2-135m-instruct"))


def _chat(base, spec=None, max_tokens=12):
    body = {"model": _model(), "messages": [{"role": "user", "content": "Tell me about your morning."}],
            "temperature": 0, "max_tokens": max_tokens}
    if spec is not None:
        body["vllm_xargs"] = {"emokern": json.dumps(spec)}
    return _call(base + "/v1/chat/completions", body)


def test_steered_chat_and_its_trace(server, bank):
    server, log = server
    status, plain = _chat(server)
    assert status == 200
    spec = {"steer": {"emotions": {"desperate": 3.0}, "layers": [10]}, "monitor": {"emotions": ["calm", "desperate"]}}
    status, steered = _chat(server, spec)
    assert status == 200, steered
    assert steered["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    status, trace = _call(f"{server}/v1/emokern/trace/{steered['id']}")
    assert status == 200, trace
    usage = steered["usage"]
    assert trace["names"] == ["calm", "desperate"] and trace["layers"] == list(LAYERS)
    assert trace["prompt_len"] == usage["prompt_tokens"]
    # every fed position: the prompt and all generated tokens but the last
    assert trace["length"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    values = trace["projections"]
    assert len(values) == trace["length"] and all(v is not None for t in values for s in t for v in s)
    assert max(abs(v) for t in values for s in t for v in s) > 1.0  # the compiled graph wrote the live buffer
    assert trace["neutral_std"] == [[1.0, 1.0]] * len(LAYERS)
    assert _call(f"{server}/v1/emokern/trace/{steered['id']}")[0] == 404  # handed over once


def test_bad_spec_is_a_400_and_the_server_keeps_serving(server):
    server, log = server
    status, error = _chat(server, {"steer": {"emotions": {"calmm": 0.1}}})
    assert status == 400, f"{error}\n{log.read_text()[-3000:]}"
    assert "did you mean 'calm'" in json.dumps(error)
    status, error = _chat(server, {"steer": {"emotions": {"calm": "lots"}}})
    assert status == 400 and "must be a number" in json.dumps(error)
    assert _chat(server, {"monitor": True})[0] == 200


def test_unknown_trace_is_404(server):
    server, _ = server
    status, error = _call(f"{server}/v1/emokern/trace/chatcmpl-nothing")
    assert status == 404 and "no emokern trace" in error["error"]


def test_requests_that_killed_the_engine_are_400_and_the_server_keeps_serving(server):
    """Strengths that overflowed fp32 in the worker (HTTP 500, engine dead) are refused with the limit; a plain
    request then succeeds and /health answers."""
    server, log = server
    status, error = _chat(server, {"steer": {"emotions": {"desperate": 1e37}}})
    assert status == 400, f"{error}\n{log.read_text()[-3000:]}"
    assert "must be at most 100 in size (residual norms); got 1e+37" in json.dumps(error)
    status, error = _chat(server, {"steer": {"emotions": {"desperate": 1e39}, "relative": False}})
    assert status == 400 and "'relative': false at layer" in json.dumps(error), error
    status, error = _chat(server, {"steer": {"emotions": {"desperate": 1e30}, "mode": "scale"}})
    assert status == 400 and "scale factor for 'desperate' must be between -100 and 100" in json.dumps(error), error
    status, plain = _chat(server)
    assert status == 200 and plain["choices"][0]["message"]["content"]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200


def test_completions_trace_by_the_response_id(server):
    server, _ = server
    status, body = _call(server + "/v1/completions", {
        "model": _model(), "prompt": "The tests keep failing and", "max_tokens": 6, "temperature": 0,
        "vllm_xargs": {"emokern": json.dumps({"monitor": {"emotions": ["calm"]}})}})
    assert status == 200 and body["id"].startswith("cmpl-"), body
    status, trace = _call(f"{server}/v1/emokern/trace/{body['id']}")
    assert status == 200, trace
    usage = body["usage"]
    assert trace["length"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert trace["names"] == ["calm"] and trace["error"] is None


def _stream(url: str, body: dict) -> list:
    """The ``data:`` events of a streamed response, decoded (``[DONE]`` kept as the string)."""
    request = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read().decode()
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_readouts_in_the_response_and_the_stream(server):
    """A monitored request's response carries its per-token readout (z-scores: the test bank's neutral statistics
    are 0 / 1, so they equal the projections of the trace, to 2 decimals), streamed as the chunk before [DONE]."""
    server, _ = server
    spec = {"monitor": {"emotions": ["desperate", "calm"]}}
    status, body = _chat(server, spec, max_tokens=10)
    assert status == 200, body
    (readout,) = body["emokern"]
    n = body["usage"]["completion_tokens"]
    assert readout["emotions"] == ["desperate", "calm"] and readout["layers"] == list(LAYERS)
    assert readout["values"] == "zscore" and readout["error"] is None
    assert len(readout["tokens"]) == n - 1 and all(len(row) == len(LAYERS) and len(row[0]) == 2
                                                    for row in readout["tokens"])
    status, trace = _call(f"{server}/v1/emokern/trace/{body['id']}")  # still held for the full trace
    assert status == 200
    generated = trace["projections"][trace["prompt_len"]:]
    assert len(generated) == n - 1
    for row, want in zip(readout["tokens"], generated):
        assert all(abs(v - round(w, 2)) <= 0.011 for site, wsite in zip(row, want) for v, w in zip(site, wsite))

    chat = {"model": _model(), "messages": [{"role": "user", "content": "Tell me about your morning."}],
            "temperature": 0, "max_tokens": 10, "vllm_xargs": {"emokern": json.dumps(spec)}}
    events = _stream(server + "/v1/chat/completions", chat)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["id"] == events[0]["id"]
    assert last["emokern"][0]["tokens"][:n - 1] == readout["tokens"]  # greedy: the same tokens as above
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"])
    assert text == body["choices"][0]["message"]["content"]
    # plain requests are untouched
    status, plain = _chat(server)
    assert status == 200 and "emokern" not in plain
    events = _stream(server + "/v1/chat/completions", {k: v for k, v in chat.items() if k != "vllm_xargs"})
    assert all("emokern" not in e for e in events[:-1])


def test_vector_registration_is_off_by_default(server, bank):
    """Without EMOKERN_VLLM_REGISTRY_SLOTS the registration endpoints do not exist, whoever asks; a client's own
    pins are dropped, so a registered-looking name is refused like any unknown one; the steering record is there."""
    server, _ = server
    vector = {str(layer): [1.0] * bank.vectors.shape[-1] for layer in LAYERS}
    assert _call(server + "/v1/emokern/vectors", {"name": "x", "directions": vector})[0] == 404
    assert _call(server + "/v1/emokern/vectors")[0] == 404
    body = {"model": _model(), "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 3,
            "vllm_xargs": {"emokern": json.dumps({"steer": {"emotions": {"x": 0.1}}}), "emokern_pins": "{}"}}
    status, error = _call(server + "/v1/chat/completions", body)
    assert status == 400 and "'x' is not in this bank" in json.dumps(error), error
    status, steered = _chat(server, {"steer": {"emotions": {"calm": 0.1}, "layers": [LAYERS[1]]}}, max_tokens=4)
    assert status == 200 and steered["emokern"][0]["steered"]["layers"] == [LAYERS[1]]
