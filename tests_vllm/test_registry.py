"""Vectors registered at run time and the "steered" (fired) record, through ``vllm serve`` on 127.0.0.1.

One compiled server with ``EMOKERN_VLLM_REGISTRY_SLOTS=2`` and an admin token (the test bank of conftest): the token
is required, bad payloads are 400/409/413 and the server keeps serving, steering by a registered name equals
steering by the bank emotion with the same vector, replacing a name in place never lets a request read KV blocks
computed with the old vector, a deleted name is refused, and the response says which layers and positions the
steering touched (none for a scope that covered nothing). Off by default: tests_vllm/test_server.py."""

import base64
import http.client
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import LAYERS
from test_server import ROOT, _call, _free_port, _kill_group, _model, wait_healthy

TOKEN = "registry-test-token"


def _req(url, body=None, method=None, token=TOKEN, raw: bytes = None):
    """``_call`` with the admin token (None: without the header)."""
    headers = {} if token is None else {"X-Emokern-Admin-Token": token}
    return _call(url, body, headers=headers, method=method, raw=raw, timeout=300)


@pytest.fixture(scope="module")
def server(bank, hf, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("registry") / "serve.log"
    env = dict(os.environ, VLLM_PLUGINS="emokern", VLLM_CPU_KVCACHE_SPACE="2", VLLM_USE_AOT_COMPILE="0",
               EMOKERN_VLLM_REGISTRY_SLOTS="2", EMOKERN_VLLM_ADMIN_TOKEN=TOKEN)
    command = [str(ROOT / ".venv-vllm/bin/python"), "-P", "-m", "vllm.entrypoints.openai.api_server", "--model",
               _model(), "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port)]
    assert os.path.abspath(sys.executable).startswith(str(ROOT / ".venv-vllm")), "run in .venv-vllm: make test-vllm"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base, log
    finally:
        _kill_group(proc)


def _directions(bank, name, layers=LAYERS):
    """The bank's raw vector of ``name`` at each installed layer, as the endpoint's ``directions``."""
    k = bank.names.index(name)
    return {str(layer): bank.vectors[bank.layer_slot(layer), k].float().tolist() for layer in layers}


def _register(base, name, directions):
    return _req(base + "/v1/emokern/vectors", {"name": name, "directions": directions})


def _chat(base, spec=None, max_tokens=12, content="Tell me about your morning.", logprobs=False):
    body = {"model": _model(), "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}
    if logprobs:
        body |= {"logprobs": True, "top_logprobs": 5}
    if spec is not None:
        body["vllm_xargs"] = {"emokern": json.dumps(spec)}
    return _req(base + "/v1/chat/completions", body, token=None)


def _first_logprobs(body) -> dict:
    return {t["token"]: t["logprob"] for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def _distance(a: dict, b: dict) -> float:
    """The largest log-probability difference over the tokens in both top lists (a missing token: 10)."""
    common = set(a) & set(b)
    return max([abs(a[t] - b[t]) for t in common] + [10.0 * (len(common) < min(len(a), len(b)))])


def _text(body):
    return body["choices"][0]["message"]["content"]


def test_admin_token_is_required(server, bank):
    base, _ = server
    directions = _directions(bank, "calm")
    status, error = _req(base + "/v1/emokern/vectors", {"name": "t", "directions": directions}, token=None)
    assert status == 401 and "X-Emokern-Admin-Token" in error["error"]
    status, error = _req(base + "/v1/emokern/vectors", {"name": "t", "directions": directions}, token="wrong")
    assert status == 403 and error["error"] == "wrong X-Emokern-Admin-Token"
    assert _req(base + "/v1/emokern/vectors", token="wrong")[0] == 403
    assert _req(base + "/v1/emokern/vectors/t", method="DELETE", token=None)[0] == 401
    assert _req(base + "/v1/emokern/vectors") == (200, {"slots": 2, "vectors": []})


def test_without_a_token_only_loopback_clients_are_admitted(monkeypatch):
    from emokern.engines.vllm.registry import AdminError, check_admin

    monkeypatch.delenv("EMOKERN_VLLM_ADMIN_TOKEN", raising=False)
    check_admin(None, "127.0.0.1")
    check_admin(None, "::1")
    for host in ("10.0.0.7", "192.168.1.2", None, "not-an-address"):
        with pytest.raises(AdminError) as info:
            check_admin(None, host)
        assert info.value.status == 403


def test_bad_payloads_are_refused_and_the_server_keeps_serving(server, bank):
    base, log = server
    good = _directions(bank, "calm")
    d = len(good[str(LAYERS[0])])
    url = base + "/v1/emokern/vectors"
    cases = [
        ({"name": "x", "directions": dict(good, **{str(LAYERS[0]): [1.0] * (d - 1)})}, 400, f"must have {d} numbers"),
        ({"name": "x", "directions": dict(good, **{str(LAYERS[0]): [float("nan")] + [1.0] * (d - 1)})}, 400,
         "not finite"),
        ({"name": "x", "directions": dict(good, **{str(LAYERS[0]): [float("inf")] * d})}, 400, "not finite"),
        ({"name": "x", "directions": dict(good, **{str(LAYERS[0]): [0.0] * d})}, 400, "zero length"),
        ({"name": "x", "directions": dict(good, **{"3": [1.0] * d})}, 400, "layer '3' is not installed"),
        ({"name": "x", "directions": {str(LAYERS[0]): good[str(LAYERS[0])]}}, 400, "no direction for installed"),
        ({"name": "x", "directions": dict(good, **{str(LAYERS[0]): ["a"] * d})}, 400, "a list of"),
        ({"name": "../x", "directions": good}, 400, "'name'"),
        ({"name": "x", "directions": good, "gguf": ""}, 400, "exactly one of"),
        ({"name": "x", "gguf": "not base64!"}, 400, "not base64"),
        ({"name": "x", "gguf": base64.b64encode(b"GGUF" + b"\0" * 64).decode()}, 400, "not a llama.cpp control"),
        ({"name": "calm", "directions": good}, 409, "one of the bank's emotions"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, want, text in cases:
        status, error = _req(url, body)
        assert status == want and text in error.get("error", ""), (body if len(str(body)) < 300 else text, error)
    assert _req(url, raw=b'{"name": "x", "directions": ')[0] == 400
    assert _req(url, raw=b"[" * 200000)[0] == 400  # nested past Python's recursion limit
    assert _req(url, {"name": "all", "directions": good})[0] == 400  # the monitor's keyword
    # a body announced larger than the limit is answered 413 before it is read
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=60)
    conn.putrequest("POST", "/v1/emokern/vectors")
    for key, value in (("Content-Type", "application/json"), ("Content-Length", str(33 * 1024 * 1024)),
                       ("X-Emokern-Admin-Token", TOKEN)):
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    conn.close()
    assert _req(url) == (200, {"slots": 2, "vectors": []})  # nothing was registered
    status, plain = _chat(base)
    assert status == 200 and _text(plain), f"{plain}\n{log.read_text()[-3000:]}"
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200


def test_steer_and_monitor_by_a_registered_name(server, bank):
    """A name registered with the bank's 'desperate' vector steers exactly as 'desperate' does (same unit vector in
    the same dtype; the other entries of the op's table are identities), and monitors the same projection."""
    base, log = server
    status, answer = _register(base, "despair2", _directions(bank, "desperate"))
    assert status == 200, f"{answer}\n{log.read_text()[-3000:]}"
    assert answer["name"] == "despair2" and answer["layers"] == list(LAYERS) and answer["replaced"] is False
    status, plain = _chat(base)
    assert status == 200
    status, by_bank = _chat(base, {"steer": {"emotions": {"desperate": 3.0}, "layers": [LAYERS[0]]}})
    assert status == 200
    spec = {"steer": {"emotions": {"despair2": 3.0}, "layers": [LAYERS[0]]},
            "monitor": {"emotions": ["despair2", "desperate"]}}
    status, by_name = _chat(base, spec)
    assert status == 200, by_name
    assert _text(by_name) != _text(plain)
    assert _text(by_name) == _text(by_bank)
    (readout,) = by_name["emokern"]
    assert readout["emotions"] == ["despair2", "desperate"] and readout["values"] == "projection"
    assert readout["tokens"] and all(abs(site[0] - site[1]) <= 0.011 for row in readout["tokens"] for site in row)
    n = by_name["usage"]["completion_tokens"]
    prompt = by_name["usage"]["prompt_tokens"]
    assert readout["steered"] == {"layers": [LAYERS[0]], "tokens": prompt + n - 1, "prompt_tokens": prompt,
                                  "generated_tokens": n - 1, "positions": [[0, prompt + n - 1]], "cached": 0}
    status, trace = _req(f"{base}/v1/emokern/trace/{by_name['id']}", token=None)
    assert status == 200 and trace["names"] == ["despair2", "desperate"] and trace["neutral_mean"] is None
    assert trace["steered"]["tokens"] == prompt + n - 1
    status, error = _chat(base, {"monitor": {"emotions": ["despair2"]}, "alert": {"emotion": "despair2"}})
    assert status == 400 and "no neutral statistics" in json.dumps(error)


def test_register_a_control_vector_gguf(server, bank, tmp_path):
    """A llama.cpp control vector exported from the bank's 'calm' (emokern's exporter: residual norm × unit vector
    per layer) registers from base64 and steers as 'calm' does (the same unit direction, up to fp32 rounding)."""
    from emokern.core.control_vectors import export_gguf_control_vector

    base, log = server
    path = tmp_path / "calm.gguf"
    export_gguf_control_vector(bank, path, {"calm": 1.0})
    for held in _req(base + "/v1/emokern/vectors")[1]["vectors"]:
        assert _req(f"{base}/v1/emokern/vectors/{held['name']}", method="DELETE")[0] == 200
    status, answer = _req(base + "/v1/emokern/vectors",
                          {"name": "calm-cv", "gguf": base64.b64encode(path.read_bytes()).decode()})
    assert status == 200 and answer["layers"] == list(LAYERS), f"{answer}\n{log.read_text()[-3000:]}"
    status, by_bank = _chat(base, {"steer": {"emotions": {"calm": 3.0}, "layers": [LAYERS[0]]}}, logprobs=True)
    status_cv, by_cv = _chat(base, {"steer": {"emotions": {"calm-cv": 3.0}, "layers": [LAYERS[0]]}}, logprobs=True)
    status_plain, plain = _chat(base, logprobs=True)
    assert status == status_cv == status_plain == 200
    assert _distance(_first_logprobs(by_cv), _first_logprobs(by_bank)) < 0.05
    assert _distance(_first_logprobs(by_cv), _first_logprobs(plain)) > 0.1


_LONG = " ".join(["The quarterly report was late again, and the team gathered in the small room to talk it over."]
                 * 24) + " What should we do?"


def test_replacing_a_name_never_reuses_blocks_of_the_old_vector(server, bank):
    """Both slots taken, so replacing 'swap' overwrites its own slot (the same index in the op's table): only its
    version separates the cache salts. After the replacement the same long prompt (several KV blocks) steered by
    'swap' must equal steering by the bank emotion of the new vector, computed without a shared prefix."""
    base, log = server
    for held in _req(base + "/v1/emokern/vectors")[1]["vectors"]:  # free both slots (earlier tests registered)
        assert _req(f"{base}/v1/emokern/vectors/{held['name']}", method="DELETE")[0] == 200
    assert _register(base, "swap", _directions(bank, "angry"))[0] == 200
    assert _register(base, "other", _directions(bank, "calm"))[0] == 200
    listing = _req(base + "/v1/emokern/vectors")[1]
    assert sorted(v["name"] for v in listing["vectors"]) == ["other", "swap"], listing
    slot = next(v["slot"] for v in listing["vectors"] if v["name"] == "swap")
    spec = {"steer": {"emotions": {"swap": 2.0}}}
    status, before = _chat(base, spec, content=_LONG, logprobs=True)
    assert status == 200, before
    status, again = _chat(base, spec, content=_LONG)  # the same state: the cache may be read, the output is equal
    assert status == 200 and _text(again) == _text(before)
    status, answer = _register(base, "swap", _directions(bank, "happy"))
    assert status == 200 and answer["replaced"] is True and answer["slot"] == slot, answer
    status, after = _chat(base, spec, content=_LONG, logprobs=True)
    assert status == 200, f"{after}\n{log.read_text()[-3000:]}"
    status, fresh = _chat(base, {"steer": {"emotions": {"happy": 2.0}}}, content=_LONG, logprobs=True)
    status_old, old = _chat(base, {"steer": {"emotions": {"angry": 2.0}}}, content=_LONG, logprobs=True)
    assert status == 200 and status_old == 200
    # the first token's top log-probabilities: the vectors differ there even where the greedy text does not
    assert _first_logprobs(before) == pytest.approx(_first_logprobs(old), abs=0.02)
    gap = _distance(_first_logprobs(fresh), _first_logprobs(old))
    assert gap > 0.1, gap  # the two vectors steer differently here, so reading the old blocks would show
    assert _distance(_first_logprobs(after), _first_logprobs(fresh)) < min(0.02, gap / 10)
    assert _text(after) == _text(fresh)
    # deleted: refused by name, the slot free again
    assert _req(base + "/v1/emokern/vectors/swap", method="DELETE") == (200, {"name": "swap", "deleted": True})
    assert _req(base + "/v1/emokern/vectors/swap", method="DELETE")[0] == 404
    status, error = _chat(base, spec)
    assert status == 400 and "swap" in json.dumps(error)
    assert _register(base, "third", _directions(bank, "proud"))[0] == 200


def _stream_while(base, spec, during, max_tokens=120) -> tuple:
    """Stream a steered chat request, call ``during()`` once its first token has arrived, read the rest; the text
    and the readout chunk."""
    body = {"model": _model(), "messages": [{"role": "user", "content": "Tell me about your morning."}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "vllm_xargs": {"emokern": json.dumps(spec)}}
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events, called = [], False
    for line in response:  # server-sent events, one "data: ..." line each
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        events.append(json.loads(line[6:]))
        if not called and any(c["delta"].get("content") for c in events[-1]["choices"]):
            during()
            called = True
    conn.close()
    assert called
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    return text, events[-1]["emokern"][0]


def test_in_flight_requests_keep_their_version_or_fail(server, bank):
    """A request steered by a name that is replaced while it streams: with a free slot, the new version goes there
    and the request runs to the end with its own version (the same text as without the replacement); with every
    slot taken, the replacement overwrites the slot under it, and the request is failed, not steered with the new
    vector."""
    base, log = server
    for held in _req(base + "/v1/emokern/vectors")[1]["vectors"]:
        assert _req(f"{base}/v1/emokern/vectors/{held['name']}", method="DELETE")[0] == 200
    assert _register(base, "live", _directions(bank, "angry"))[0] == 200
    spec = {"steer": {"emotions": {"live": 3.0}, "layers": [LAYERS[0]]}}
    quiet, readout = _stream_while(base, spec, lambda: None)
    assert readout["error"] is None and readout["steered"]["tokens"] > 0
    replaced = []
    text, readout = _stream_while(base, spec, lambda: replaced.append(
        _register(base, "live", _directions(bank, "happy"))))
    assert replaced[0][0] == 200 and replaced[0][1]["replaced"] is True, replaced
    assert readout["error"] is None and text == quiet
    live_slot = replaced[0][1]["slot"]
    assert _register(base, "filler", _directions(bank, "calm"))[0] == 200  # now every slot holds a name
    replaced.clear()
    text, readout = _stream_while(base, spec, lambda: replaced.append(
        _register(base, "live", _directions(bank, "proud"))))
    assert replaced[0][0] == 200 and replaced[0][1]["slot"] == live_slot  # in place: no free slot
    assert readout["error"] and "no longer held" in readout["error"], (readout, log.read_text()[-2000:])
    assert text != quiet  # with ignore_eos a failed request runs on to its length, unsteered
    status, plain = _chat(base)
    assert status == 200 and _text(plain)


def test_fired_record_for_scopes_that_touch_tokens_and_none(server):
    base, _ = server
    status, body = _chat(base, {"steer": {"emotions": {"calm": 0.5}, "scope": "generated"}}, max_tokens=6)
    assert status == 200, body
    prompt, n = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    (readout,) = body["emokern"]
    assert readout["tokens"] == [] and readout["emotions"] == [] and readout["values"] is None
    assert readout["steered"] == {"layers": list(LAYERS), "tokens": n - 1, "prompt_tokens": 0,
                                  "generated_tokens": n - 1, "positions": [[prompt, prompt + n - 1]], "cached": 0}
    # one generated token: it is never fed back, so the generated scope covers nothing
    status, body = _chat(base, {"steer": {"emotions": {"calm": 0.5}, "scope": "generated"}}, max_tokens=1)
    assert status == 200
    assert body["emokern"][0]["steered"] == {"layers": list(LAYERS), "tokens": 0, "prompt_tokens": 0,
                                             "generated_tokens": 0, "positions": [], "cached": 0}
    status, body = _chat(base, {"steer": {"emotions": {"calm": 0.5}, "scope": "prompt", "layers": [LAYERS[1]]}},
                         max_tokens=4)
    steered = body["emokern"][0]["steered"]
    prompt = body["usage"]["prompt_tokens"]
    assert steered["layers"] == [LAYERS[1]] and steered["generated_tokens"] == 0
    assert steered["tokens"] + steered["cached"] == prompt and steered["positions"][-1][1] == prompt
    status, plain = _chat(base)
    assert status == 200 and "emokern" not in plain
