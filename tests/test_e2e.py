"""End to end: the official openai client -> real Envoy -> sidecar -> simulator, events stored in
real embedded ClickHouse. Token counts must equal what the upstream reported, per request."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import (
    RecordingSink,
    ThreadedSidecar,
    envoy_stats,
    sidecar_settings,
    start_envoy,
    start_sim,
    wait_events,
)
from tests.telemetry_testing import read

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MSG = [{"role": "user", "content": "Tell me about GPU chargeback, with a café and 日本語 example."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    sim, sim_url = start_sim(work, "--enable-prompt-tokens-details", "--tokens-per-second", "0")
    slow, slow_url = start_sim(work, "--tokens-per-second", "40")
    rec = RecordingSink()
    reader = InMemoryMetricReader()
    sc = ThreadedSidecar(sidecar_settings(work), extra_sinks=[rec], metric_readers=[reader]).start()
    envoy, url, admin = start_envoy(work, sim_url, sc.sidecar.grpc_port)
    envoy_slow, slow_envoy_url, admin_slow = start_envoy(work, slow_url, sc.sidecar.grpc_port)

    class Stack:
        pass

    s = Stack()
    s.url, s.slow_url, s.sim_url, s.sidecar, s.rec = url, slow_envoy_url, sim_url, sc, rec
    s.reader = reader
    s.envoy_admins = (admin, admin_slow)
    yield s
    for proc in (envoy, envoy_slow):
        proc.stop()
    sc.stop()
    sim.stop()
    slow.stop()


def _client(url: str, user: str, team: str = "search", feature: str = "qa") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                         default_headers={"x-team": team, "x-feature": feature, "x-user": user})


def _sim_counters(sim_url: str) -> tuple[float, float]:
    with urllib.request.urlopen(f"{sim_url}/metrics", timeout=5) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))

    return total("vllm:prompt_tokens_total"), total("vllm:generation_tokens_total")


def _events(stack, user: str, count: int) -> list:
    return wait_events(stack.rec, user, count)


def _event(stack, user: str):
    return _events(stack, user, 1)[0]


def _stored(stack, user: str) -> dict:
    """The same event as ClickHouse holds it (after a flush)."""
    sc = stack.sidecar
    assert sc.call(sc.sidecar.force_flush())
    rows = sc.call(sc.sidecar.storage.run(lambda c: list(c.query(
        "SELECT * FROM usage_events WHERE labels['user'] = {user:String}",
        parameters={"user": user}).named_results())))
    assert len(rows) == 1, rows
    return rows[0]


def _uid() -> str:
    return "u" + uuid.uuid4().hex[:12]


def _check_stored(stack, user, ev):
    row = _stored(stack, user)
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens"):
        assert row[key] == getattr(ev, key), key
    assert row["labels"]["team"] == ev.labels["team"] and row["request_id"] == ev.request_id


def test_chat_non_streaming(stack):
    user = _uid()
    resp = _client(stack.url, user).chat.completions.create(model=MODEL, messages=MSG, max_tokens=20)
    ev = _event(stack, user)
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens) == (
        resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens)
    assert ev.token_source == 1 and ev.endpoint == "chat" and not ev.stream and ev.http_status == 200
    assert dict(ev.labels) == {"team": "search", "feature": "qa", "user": user, "env": "unattributed"}
    assert ev.request_id and ev.response_model == MODEL and ev.finish_reason in ("stop", "length")
    _check_stored(stack, user, ev)


def test_chat_streaming_without_usage_request_is_metered_and_invisible(stack):
    user = _uid()
    before = _sim_counters(stack.sim_url)
    chunks = list(_client(stack.url, user).chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=30, stream=True))
    after = _sim_counters(stack.sim_url)
    # The client did not ask for usage: it must not see the chunk we made vLLM send.
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    ev = _event(stack, user)
    assert ev.usage_injected and ev.stream and not ev.client_aborted
    assert (ev.prompt_tokens, ev.completion_tokens) == (after[0] - before[0], after[1] - before[1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and ev.time_to_first_token_ns > 0
    _check_stored(stack, user, ev)


@pytest.mark.parametrize("piece", [1, 2, 5])
def test_a_stream_whose_first_bytes_come_in_small_writes_is_metered_and_invisible(stack, piece):
    """The upstream writes its first event a few bytes at a time: Envoy forwards `d`, `da`, ...
    as the first body message. The framing must not be decided from those bytes' length."""
    user = _uid()
    before = _sim_counters(stack.sim_url)
    chunks = list(_client(stack.url, user).chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=12, stream=True,
        extra_headers={"x-sim-first-write-bytes": str(piece)}))
    after = _sim_counters(stack.sim_url)
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    ev = _event(stack, user)
    assert not ev.error, ev.error_detail
    assert ev.token_source == 1 and ev.usage_injected and not ev.client_aborted
    assert (ev.prompt_tokens, ev.completion_tokens) == (after[0] - before[0], after[1] - before[1])
    _check_stored(stack, user, ev)


def test_chat_streaming_with_usage_and_cached_tokens(stack):
    user = _uid()
    client = _client(stack.url, user)
    for _ in range(2):  # the second request hits the simulated prefix cache
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=MSG * 3, max_tokens=10, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].choices == []
    usage = chunks[-1].usage
    ev = _events(stack, user, 2)[-1]
    assert not ev.usage_injected
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    assert ev.cached_tokens == cached


@pytest.mark.parametrize("stream", [False, True])
def test_n_greater_than_one(stack, stream):
    user = _uid()
    before = _sim_counters(stack.sim_url)
    result = _client(stack.url, user).chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, n=3,
                                                            stream=stream)
    if stream:
        indexes = {c.choices[0].index for c in result if c.choices}
        assert indexes == {0, 1, 2}
    else:
        assert len(result.choices) == 3
    after = _sim_counters(stack.sim_url)
    ev = _event(stack, user)
    assert ev.choices == 3 and len(ev.finish_reason.split(",")) == 3
    assert (ev.prompt_tokens, ev.completion_tokens) == (after[0] - before[0], after[1] - before[1])


@pytest.mark.parametrize("stream", [False, True])
def test_completions(stack, stream):
    user = _uid()
    before = _sim_counters(stack.sim_url)
    result = _client(stack.url, user).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                                       stream=stream)
    if stream:
        assert "".join(c.choices[0].text for c in result if c.choices)
    after = _sim_counters(stack.sim_url)
    ev = _event(stack, user)
    assert ev.endpoint == "completions" and ev.stream == stream
    assert (ev.prompt_tokens, ev.completion_tokens) == (after[0] - before[0], after[1] - before[1])
    _check_stored(stack, user, ev)


def test_embeddings(stack):
    user = _uid()
    resp = _client(stack.url, user).embeddings.create(model=MODEL, input=["hello world", "naïve café"])
    ev = _event(stack, user)
    assert ev.endpoint == "embeddings" and ev.completion_tokens == 0
    assert ev.prompt_tokens == resp.usage.prompt_tokens == ev.total_tokens
    _check_stored(stack, user, ev)


def test_client_disconnect_mid_stream_still_produces_event(stack):
    user = _uid()
    stream = _client(stack.slow_url, user).chat.completions.create(model=MODEL, messages=MSG, max_tokens=200,
                                                                  stream=True)
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
        if got >= 5:
            break
    stream.close()  # the client goes away; the simulator is still generating
    ev = _event(stack, user)
    assert ev.client_aborted
    assert ev.token_source == 2 and ev.tokenizer.startswith("hf:")  # the model's own tokenizer
    assert 5 <= ev.completion_tokens < 200
    assert ev.prompt_tokens > 0
    _check_stored(stack, user, ev)


def test_unknown_path_passes_through_unmetered(stack):
    user = _uid()
    models = _client(stack.url, user).models.list()
    assert models.data[0].id == MODEL
    ev = _event(stack, user)
    assert not ev.metered and ev.endpoint == "unknown" and ev.http_status == 200 and ev.path == "/v1/models"


def test_upstream_error_is_flagged(stack):
    user = _uid()
    client = _client(stack.url, user)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=MSG, extra_headers={"x-sim-fail": "500"})
    ev = _event(stack, user)
    assert ev.http_status == 500 and ev.error == "upstream_error" and ev.prompt_tokens == 0


def test_unknown_model_404_is_flagged(stack):
    user = _uid()
    with pytest.raises(openai.NotFoundError):
        _client(stack.url, user).chat.completions.create(model="nope", messages=MSG, stream=True)
    ev = _event(stack, user)
    assert ev.http_status == 404 and ev.error == "upstream_error" and "nope" in ev.error_detail


@pytest.mark.parametrize(("body", "kind"), [(b'{"model": "x", "messages": [', "malformed_request_json"),
                                            (b'\xff\xfe\x00garbage', "non_utf8_request")])
def test_malformed_request_body_is_flagged(stack, body, kind):
    user = _uid()
    req = urllib.request.Request(f"{stack.url}/v1/chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json", "x-user": user, "x-team": "t"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400  # the upstream's answer, passed through
    ev = _event(stack, user)
    assert ev.error == kind and ev.http_status == 400


def test_label_injection_is_neutralised(stack):
    user = _uid()
    _client(stack.url, user, team="x'); DROP TABLE usage_events; --").chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=3)
    ev = _event(stack, user)
    assert ev.labels["team"] == "invalid"
    assert _stored(stack, user)["labels"]["team"] == "invalid"


def test_envoy_saw_no_ext_proc_failures(stack):
    for admin in stack.envoy_admins:
        stats = envoy_stats(admin)
        failures = {k: v for k, v in stats.items()
                    if any(w in k for w in ("failed", "failure_mode_allowed", "timeout", "msgs_errored")) and v}
        assert not failures, failures
        assert stats.get("http.ingress.ext_proc.streams_started", 0) > 0


def _sum_points(snapshot, name: str, **match: str) -> float:
    total = 0.0
    for attrs in snapshot.attribute_sets(name):
        if all(attrs.get(k) == v for k, v in match.items()):
            point = snapshot.point(name, attrs)
            total += point.sum if hasattr(point, "bucket_counts") else point.value
    return total


def test_metrics_after_real_requests_equal_the_events(stack):
    team = "t" + uuid.uuid4().hex[:8]
    users = [_uid() for _ in range(4)]
    for i, user in enumerate(users):
        client = _client(stack.url, user, team=team, feature="metrics")
        if i % 2:
            list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=9 + i, stream=True))
        else:
            client.completions.create(model=MODEL, prompt="count me", max_tokens=5 + i)
    events = [_event(stack, u) for u in users]
    snap = read(stack.reader)
    want_in = sum(e.prompt_tokens for e in events)
    want_out = sum(e.completion_tokens for e in events)
    assert _sum_points(snap, "extproc.tokens", team=team, **{"token.type": "input"}) == want_in
    assert _sum_points(snap, "extproc.tokens", team=team, **{"token.type": "output"}) == want_out
    assert _sum_points(snap, "gen_ai.client.token.usage", team=team, **{"gen_ai.token.type": "input"}) == want_in
    assert _sum_points(snap, "extproc.requests", team=team) == 4
    ops = {a["gen_ai.operation.name"] for a in snap.attribute_sets("gen_ai.client.token.usage") if a.get("team") == team}
    assert ops == {"chat", "text_completion"}
    ttft = [a for a in snap.attribute_sets("gen_ai.server.time_to_first_token")]
    assert ttft, "streaming requests record time to first token"

    # The same numbers over HTTP from the admin port, parsed as Prometheus text.
    port = stack.sidecar.sidecar.admin_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    got = {"input": 0.0, "output": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "extproc_tokens":
            for sample in family.samples:
                if sample.labels.get("team") == team and sample.labels.get("token_type") in got:
                    got[sample.labels["token_type"]] += sample.value
    assert got == {"input": want_in, "output": want_out}
    live = [s.value for f in text_string_to_metric_families(text) if f.name == "extproc_tokens_live_output"
            for s in f.samples if s.name.endswith("_total")]
    assert live and live[0] > 0  # deltas counted while the streams ran


def test_raw_events_and_hourly_rollup_agree(stack):
    sc = stack.sidecar
    assert sc.call(sc.sidecar.force_flush())
    cols = "count(), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(total_tokens)"
    raw = sc.call(sc.sidecar.storage.run(lambda c: c.query(f"SELECT {cols} FROM usage_events").result_rows[0]))
    rolled = sc.call(sc.sidecar.storage.run(lambda c: c.query(
        "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(total_tokens) "
        "FROM usage_hourly").result_rows[0]))
    assert raw[0] >= 20  # the requests of this module
    assert tuple(raw) == tuple(rolled)
    assert raw[0] == len(stack.rec.events)


def test_admin_stats_endpoint_is_json(stack):
    port = stack.sidecar.sidecar.admin_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=5) as r:
        data = json.loads(r.read())
    assert data["messages"]["request_headers"] >= 1 and data["events_emitted"] >= 1
    assert data["storage"]["events_dropped"] == 0
