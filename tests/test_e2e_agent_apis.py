"""The Responses API and the Anthropic Messages API through the real Envoy, with the official
`openai` and `anthropic` SDKs, in sync, hybrid and observe mode: the stored usage equals what the
simulator counted, and the client's bytes are vLLM's (nothing injected, nothing removed)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import uuid

import anthropic
import openai
import orjson
import pytest

from tests.stack import metered_stack, wait_events
from tests.test_e2e import MODEL, _sim_counters


@pytest.fixture(params=["sync", "hybrid", "observe"])
def stack(request, sim, tmp_path):
    with metered_stack(tmp_path, sim, mode=request.param) as (url, rec, sc):
        yield request.param, url, rec, sc


def _headers(user: str) -> dict[str, str]:
    return {"x-team": "agents", "x-user": user}


def _responses(url: str, user: str, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers=_headers(user))
    kwargs = dict(model=MODEL, instructions="Answer briefly.", max_output_tokens=12,
                  input=[{"role": "user", "content": "What is a chargeback?"}])
    if stream:
        events = list(client.responses.create(stream=True, **kwargs))
        assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens > 0
    else:
        assert client.responses.create(**kwargs).output_text


def _messages(url: str, user: str, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, default_headers=_headers(user))
    kwargs = dict(model=MODEL, max_tokens=12, system="Answer briefly.",
                  messages=[{"role": "user", "content": "What is a chargeback?"}])
    if stream:
        with client.messages.stream(**kwargs) as s:
            text = "".join(s.text_stream)
            assert s.get_final_message().usage.output_tokens > 0 and text
    else:
        assert client.messages.create(**kwargs).content[0].text


@pytest.mark.parametrize("api", [_responses, _messages], ids=["responses", "messages"])
def test_sdk_traffic_is_metered_exactly(stack, sim, api):
    mode, url, rec, sc = stack
    for stream in (False, True, False, True):
        user = "a" + uuid.uuid4().hex[:10]
        before = _sim_counters(sim)
        api(url, user, stream)
        after = _sim_counters(sim)
        truth = (after[0] - before[0], after[1] - before[1])
        ev = wait_events(rec, user, 1)[0]
        assert ev.metered and not ev.error and not ev.client_aborted, (ev.error, ev.error_detail)
        assert ev.endpoint == api.__name__.strip("_") and ev.operation == "chat" and ev.stream == stream
        # both APIs carry usage in every framing, observe mode included: never the tokenizer
        assert ev.token_source == 1 and not ev.usage_injected
        assert (ev.prompt_tokens, ev.completion_tokens) == truth
        assert ev.total_tokens == sum(truth)
    assert not sc.sidecar.service.pending


_VOLATILE = re.compile(rb'"(created_at|created)":\d+')


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 9, "stream": True}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/messages", {"model": "not-served", "max_tokens": 9, "stream": True,
                      "messages": [{"role": "user", "content": "Hi"}]}),
])
def test_client_bytes_are_vllms(stack, sim, path, body):
    """The same request straight to the simulator and through Envoy and the sidecar: the same
    bytes (but for the creation time), in every mode."""
    mode, url, rec, sc = stack
    rid = uuid.uuid4().hex
    got = []
    for base in (sim, url):
        req = urllib.request.Request(base + path, data=orjson.dumps(body), method="POST", headers={
            "content-type": "application/json", "x-request-id": rid, "x-user": rid})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, content = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, content = err.code, err.read()
        got.append((status, _VOLATILE.sub(b"", content)))
    assert got[0] == got[1]
    ev = wait_events(rec, rid, 1)[0]
    assert ev.metered and ev.token_source == (1 if got[0][0] == 200 else 3)
    if got[0][0] != 200:
        assert ev.error == "upstream_error" and "not-served" in ev.error_detail


def _raw(url: str, path: str, body: dict, headers: dict[str, str]) -> bytes:
    req = urllib.request.Request(url + path, data=orjson.dumps(body), method="POST",
                                 headers={"content-type": "application/json", **headers})
    out = b""
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            while chunk := r.read(1):
                out += chunk
    except Exception:  # noqa: BLE001 - the upstream dropped the connection mid-stream, as asked
        pass
    return out


def test_small_first_writes_and_aborts(stack, sim):
    """An upstream that writes the first event a byte at a time is metered as if it had not; a
    stream the upstream drops mid-way is flagged, with the Messages API's exact input count."""
    mode, url, rec, sc = stack
    msgs = {"model": MODEL, "max_tokens": 12, "stream": True, "messages": [{"role": "user", "content": "Hi there"}]}
    resp = {"model": MODEL, "max_output_tokens": 12, "stream": True, "input": "Hi there"}
    for path, body in (("/v1/messages", msgs), ("/v1/responses", resp)):
        user = "w" + uuid.uuid4().hex[:10]
        before = _sim_counters(sim)
        out = _raw(url, path, body, {"x-user": user, "x-sim-first-write-bytes": "1"})
        after = _sim_counters(sim)
        ev = wait_events(rec, user, 1)[0]
        assert out.startswith(b"event: ") and not ev.error and not ev.client_aborted, (path, ev.error_detail)
        assert ev.token_source == 1 and (ev.prompt_tokens, ev.completion_tokens) == (
            after[0] - before[0], after[1] - before[1]), path

    user = "x" + uuid.uuid4().hex[:10]
    before = _sim_counters(sim)
    out = _raw(url, "/v1/messages", msgs, {"x-user": user, "x-sim-abort-after": "4"})
    after = _sim_counters(sim)
    ev = wait_events(rec, user, 1)[0]
    assert b"message_stop" not in out  # (how much of it reaches the client is Envoy's affair)
    assert ev.client_aborted and ev.token_source == 2
    assert ev.prompt_tokens == after[0] - before[0]  # message_start's input_tokens, exact
    assert 0 < ev.completion_tokens <= after[1] - before[1]
