"""UsageEvent -> OTel metrics, read in memory: exact values and exact attribute sets."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.config import ConfigError, Settings
from extproc.events import EventSink, TokenSource, UsageEvent
from extproc.telemetry import UsageMetrics
from extproc.telemetry import names as n
from tests.telemetry_testing import MetricsSnapshot, read

MS = 1_000_000
LABELS = {"team": "search", "feature": "autocomplete", "user": "alice", "env": "prod"}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def event(**kw) -> UsageEvent:
    base = dict(
        event_id="e1", request_id="r1", endpoint="chat", path="/v1/chat/completions",
        method="POST", request_model=MODEL, response_model=MODEL, stream=True, http_status=200,
        prompt_tokens=100, completion_tokens=21, cached_tokens=64, reasoning_tokens=5,
        total_tokens=121, token_source=TokenSource.UPSTREAM_USAGE,
        time_to_first_token_ns=50 * MS, duration_ns=250 * MS, metered=True, labels=LABELS,
    )
    base.update(kw)
    return UsageEvent(**base)


def make(settings: Settings | None = None, **kw) -> tuple[UsageMetrics, InMemoryMetricReader]:
    settings = settings or Settings()
    settings.metrics.prometheus = False
    reader = InMemoryMetricReader()
    return UsageMetrics.from_settings(settings, extra_readers=[reader], **kw), reader


GEN_AI = {
    n.OPERATION: "chat", n.PROVIDER: "vllm", n.REQUEST_MODEL: MODEL, n.RESPONSE_MODEL: MODEL,
}
ATTRIBUTED = {**GEN_AI, "team": "search", "feature": "autocomplete", "env": "prod"}
REQUEST = {
    "endpoint": "chat", "http.status_class": "2xx", "metered": True, "client_aborted": False,
    "token.source": "upstream_usage", "team": "search", "feature": "autocomplete",
    "env": "prod", n.REQUEST_MODEL: MODEL,
}


def test_is_an_event_sink() -> None:
    metrics, _ = make()
    sink: EventSink = metrics
    assert callable(sink.emit)


def test_streaming_chat_exact_values_and_attributes() -> None:
    metrics, reader = make()
    metrics.emit(event())
    metrics.emit(event(prompt_tokens=3000, completion_tokens=1, cached_tokens=0,
                       reasoning_tokens=0, duration_ns=1000 * MS, time_to_first_token_ns=900 * MS))
    snap = read(reader)

    usage_in = snap.point(n.TOKEN_USAGE, {**ATTRIBUTED, n.TOKEN_TYPE: "input"})
    assert (usage_in.count, usage_in.sum) == (2, 3100)
    assert tuple(usage_in.explicit_bounds) == n.TOKEN_BUCKETS
    assert usage_in.explicit_bounds[-1] == 67108864
    # 100 -> (64, 256], 3000 -> (1024, 4096]
    assert list(usage_in.bucket_counts) == [0, 0, 0, 0, 1, 0, 1] + [0] * 8
    usage_out = snap.point(n.TOKEN_USAGE, {**ATTRIBUTED, n.TOKEN_TYPE: "output"})
    assert (usage_out.count, usage_out.sum) == (2, 22)
    assert len(snap.attribute_sets(n.TOKEN_USAGE)) == 2  # the user label is not configured

    duration = snap.point(n.REQUEST_DURATION, GEN_AI)
    assert duration.count == 2 and duration.sum == pytest.approx(1.25)
    assert tuple(duration.explicit_bounds) == n.DURATION_BUCKETS
    ttft = snap.point(n.TIME_TO_FIRST_TOKEN, GEN_AI)
    assert ttft.count == 2 and ttft.sum == pytest.approx(0.95)
    tpot = snap.point(n.TIME_PER_OUTPUT_TOKEN, GEN_AI)
    # only the first event has > 1 output token: (0.25 - 0.05) / (21 - 1)
    assert tpot.count == 1 and tpot.sum == pytest.approx(0.01)

    for token_type, value in (("input", 3100), ("output", 22), ("cached", 64), ("reasoning", 5)):
        assert snap.value(n.TOKENS, {**ATTRIBUTED, "token.type": token_type}) == value
    assert snap.series_count(n.TOKENS) == 4
    assert snap.value(n.REQUESTS, REQUEST) == 2
    assert snap.series_count(n.REQUESTS) == 1
    assert n.COST not in snap.names()  # no pricing configured


def test_non_streaming_has_no_ttft_or_tpot() -> None:
    metrics, reader = make()
    metrics.emit(event(stream=False, time_to_first_token_ns=0))
    snap = read(reader)
    assert snap.point(n.REQUEST_DURATION, GEN_AI).count == 1
    assert n.TIME_TO_FIRST_TOKEN not in snap.names()
    assert n.TIME_PER_OUTPUT_TOKEN not in snap.names()


@pytest.mark.parametrize(("endpoint", "operation"), [
    ("chat", "chat"), ("completions", "text_completion"), ("embeddings", "embeddings"),
])
def test_operation_names(endpoint: str, operation: str) -> None:
    metrics, reader = make()
    completion = 0 if endpoint == "embeddings" else 7
    metrics.emit(event(endpoint=endpoint, stream=False, completion_tokens=completion,
                       cached_tokens=0, reasoning_tokens=0))
    snap = read(reader)
    attrs = {**ATTRIBUTED, n.OPERATION: operation}
    assert snap.point(n.TOKEN_USAGE, {**attrs, n.TOKEN_TYPE: "input"}).sum == 100
    types = {a[n.TOKEN_TYPE] for a in snap.attribute_sets(n.TOKEN_USAGE)}
    # embeddings produce no output tokens: no output observation in the histogram
    assert types == ({"input"} if endpoint == "embeddings" else {"input", "output"})
    assert snap.value(n.TOKENS, {**attrs, "token.type": "output"}) == completion
    assert snap.value(n.REQUESTS, {**REQUEST, "endpoint": endpoint}) == 1


def test_errors_set_error_type() -> None:
    metrics, reader = make()
    metrics.emit(event(stream=False, http_status=503, error="upstream_error",
                       token_source=TokenSource.NONE, prompt_tokens=0, completion_tokens=0,
                       cached_tokens=0, reasoning_tokens=0, response_model=""))
    metrics.emit(event(stream=False, http_status=429, token_source=TokenSource.NONE,
                       response_model="", prompt_tokens=0, completion_tokens=0))
    snap = read(reader)
    no_resp = {k: v for k, v in GEN_AI.items() if k != n.RESPONSE_MODEL}
    assert snap.point(n.REQUEST_DURATION, {**no_resp, "error.type": "upstream_error"}).count == 1
    assert snap.point(n.REQUEST_DURATION, {**no_resp, "error.type": "429"}).count == 1
    assert n.TOKEN_USAGE not in snap.names()  # nothing counted (token source NONE)
    assert n.TOKENS not in snap.names()
    base = {**REQUEST, "token.source": "none"}
    assert snap.value(n.REQUESTS, {**base, "http.status_class": "5xx",
                                   "error.type": "upstream_error"}) == 1
    assert snap.value(n.REQUESTS, {**base, "http.status_class": "4xx", "error.type": "429"}) == 1


def test_unmetered_only_counts_the_request() -> None:
    metrics, reader = make()
    metrics.emit(UsageEvent(endpoint="unknown", path="/v1/models", method="GET",
                            http_status=200, metered=False, token_source=TokenSource.NONE,
                            labels={"team": "search"}))
    snap = read(reader)
    assert snap.names() & {n.TOKEN_USAGE, n.REQUEST_DURATION, n.TOKENS} == set()
    assert snap.value(n.REQUESTS, {
        "endpoint": "unknown", "http.status_class": "2xx", "metered": False,
        "client_aborted": False, "token.source": "none", "team": "search",
        "feature": "unattributed", "env": "unattributed",
    }) == 1


def test_client_abort_with_tokenizer_counts() -> None:
    metrics, reader = make()
    metrics.emit(event(client_aborted=True, http_status=200, token_source=TokenSource.TOKENIZER,
                       tokenizer="o200k_base", error="client_aborted"))
    snap = read(reader)
    assert snap.value(n.REQUESTS, {**REQUEST, "client_aborted": True,
                                   "token.source": "tokenizer",
                                   "error.type": "client_aborted"}) == 1
    assert snap.value(n.TOKENS, {**ATTRIBUTED, "token.type": "output"}) == 21


def test_label_selection_provider_and_missing_labels() -> None:
    settings = Settings(provider_name="my-vllm")
    settings.metrics.labels = ["team", "user"]
    metrics, reader = make(settings)
    metrics.emit(event(labels={"team": "search", "feature": "x"}))
    snap = read(reader)
    attrs = {**GEN_AI, n.PROVIDER: "my-vllm", "team": "search", "user": "unattributed"}
    assert snap.point(n.TOKEN_USAGE, {**attrs, n.TOKEN_TYPE: "input"}).sum == 100


def test_labels_on_latency_option() -> None:
    settings = Settings()
    settings.metrics.labels_on_latency = True
    metrics, reader = make(settings)
    metrics.emit(event())
    snap = read(reader)
    assert snap.point(n.TIME_TO_FIRST_TOKEN, ATTRIBUTED).count == 1


def test_colliding_label_name_is_refused() -> None:
    settings = Settings()
    settings.metrics.labels = ["team", "token_type"]
    with pytest.raises(ConfigError):
        make(settings)


def test_pricing_hook_records_cost() -> None:
    def price(ev: UsageEvent) -> float | None:
        return ev.prompt_tokens * 0.5e-6 + ev.completion_tokens * 2e-6

    metrics, reader = make(pricing=price)
    metrics.emit(event())
    metrics.emit(event())
    snap = read(reader)
    assert snap.value(n.COST, ATTRIBUTED) == pytest.approx(2 * (50e-6 + 42e-6))


async def test_emit_never_raises_and_counts_failures() -> None:
    def broken(_ev: UsageEvent) -> float:
        raise ZeroDivisionError

    metrics, reader = make(pricing=broken)
    metrics.emit(event())  # pricing fails after everything else was recorded
    metrics.emit(UsageEvent())  # an empty event is recorded as an unknown request
    assert metrics.record_errors == 1
    snap = read(reader)
    assert snap.point(n.TIME_PER_OUTPUT_TOKEN, GEN_AI).count == 1
    assert snap.value(n.RECORD_ERRORS) == 1
    await metrics.shutdown()
    metrics.emit(event())  # after shutdown: ignored, no exception
    await metrics.shutdown()  # idempotent


async def test_lifecycle() -> None:
    metrics, reader = make()
    await metrics.start()
    metrics.emit(event())
    assert await metrics.force_flush(timeout=5)
    assert metrics.vllm is None
    await metrics.shutdown(timeout=5)
    assert isinstance(read(reader), MetricsSnapshot)
