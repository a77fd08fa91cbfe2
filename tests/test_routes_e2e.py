"""No path around the meter: every spelling of an inference route, sent through the real Envoy to
the simulator (which routes like vLLM's ASGI server), is either metered with the simulator's
own token counts, or not served at all (and then counted unmetered, or refused)."""

from __future__ import annotations

import http.client
import json
import uuid
from urllib.parse import urlparse

import pytest

from tests.stack import metered_stack, sidecar_settings, wait_events
from tests.test_e2e import MODEL, MSG, _sim_counters

ALIASES = [
    "/v1/chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/v1/x/%2e%2e/chat/completions",
    "/v1/%63hat/completions",
    "/v1/chat/completions?x=1",
    "/v1/chat/completions/",
    "/V1/Chat/Completions",
    "/v1/chat/completions/.",
    "/v1/chat/completions%00",
]


def _post(url: str, path: str, user: str) -> tuple[int, bytes]:
    """http.client sends the path byte for byte (httpx and urllib would normalize it)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 7}).encode()
    conn.request("POST", path, body, {"content-type": "application/json", "x-user": user, "x-team": "routes"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


@pytest.fixture(params=[("sync", "pass"), ("sync", "refuse"), ("hybrid", "refuse"), ("observe", "pass")],
                ids=lambda p: "-".join(p))
def stack(request, sim, tmp_path):
    mode, unknown_post = request.param
    settings = sidecar_settings(tmp_path, metering={"unknown_post": unknown_post})
    with metered_stack(tmp_path, sim, settings, mode=mode) as (url, rec, sc):
        yield mode, unknown_post, url, rec, sc


def test_every_alias_is_metered_or_not_served(stack, sim):
    mode, unknown_post, url, rec, sc = stack
    served = []
    for path in ALIASES:
        user = "r" + uuid.uuid4().hex[:10]
        before, streams = _sim_counters(sim), sc.sidecar.stats.streams_opened
        status, body = _post(url, path, user)
        after = _sim_counters(sim)
        truth = (after[0] - before[0], after[1] - before[1])
        if truth == (0, 0) and status == 400 and sc.sidecar.stats.streams_opened == streams:
            continue  # Envoy refused the path itself (a NUL byte): no filter, no upstream saw it
        ev = wait_events(rec, user, 1)[0]
        if truth != (0, 0):  # the model ran: the request must be metered, exactly
            served.append(path)
            assert status == 200, (path, status, body[:200])
            assert ev.metered and ev.endpoint == "chat", path
            assert ev.token_source == 1 and (ev.prompt_tokens, ev.completion_tokens) == truth, path
            continue
        assert status != 200, (path, body[:200])
        assert not ev.metered, path
        if unknown_post == "refuse" and status == 404 and ev.error == "refused_path":
            err = json.loads(body)["error"]
            assert err["code"] == "unmetered_path" and err["type"] == "invalid_request_error"
        else:
            assert ev.error == "", (path, ev.error)
    # the spellings vLLM itself serves as chat are all served and metered
    for path in ("/v1/chat/completions", "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions",
                 "/v1//chat/completions", "/v1/./chat/completions", "/v1/x/../chat/completions",
                 "/v1/%63hat/completions", "/v1/chat/completions?x=1"):
        assert path in served, path
    assert "/V1/Chat/Completions" not in served and "/v1/chat/completions/" not in served
    refused = sc.sidecar.stats.refused_requests
    assert (refused > 0) == (unknown_post == "refuse"), refused
    assert not sc.sidecar.service.pending


NON_INFERENCE = [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hello there"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [128000, 15339]}),
    ("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("GET", "/metrics", None),
    ("GET", "/version", None),
]


def test_non_inference_routes_pass_and_are_counted_unmetered(stack, sim):
    mode, unknown_post, url, rec, sc = stack
    u = urlparse(url)
    for method, path, body in NON_INFERENCE:
        user = "n" + uuid.uuid4().hex[:10]
        before = _sim_counters(sim)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request(method, path, json.dumps(body).encode() if body is not None else None,
                     {"content-type": "application/json", "x-user": user})
        resp = conn.getresponse()
        status, content = resp.status, resp.read()
        conn.close()
        assert status == 200, (path, content[:200])
        ev = wait_events(rec, user, 1)[0]
        assert not ev.metered and ev.endpoint == "unknown" and not ev.error and ev.token_source == 3, path
        if path in ("/tokenize", "/v1/messages/count_tokens"):
            assert _sim_counters(sim) == before  # counted, nothing generated
    assert sc.sidecar.stats.refused_requests == 0
