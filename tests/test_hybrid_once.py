"""Hybrid mode counts a request once when Envoy gave up on the request filter's stream.

Envoy fails open after message_timeout (or a reset of the request filter's stream): the request
goes upstream without the correlation header the sidecar's late answer would have added, so the
response filter's stream cannot find its request stream by it. Both streams still carry the same
x-request-id (generate_request_id in the shipped hybrid config). Message shapes are those of
envoy/envoy-hybrid.yaml: the request filter sends request headers and a BUFFERED body; the
response filter sends request headers, then response body messages in observability mode with
the status as the response.code attribute on the first one, and a final empty end-of-stream body.
"""

from __future__ import annotations

import orjson

from extproc.config import AttributionSettings
from extproc.exchange import CORRELATION_HEADER
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

CHAT = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
STREAM = m.sse(
    orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": "he"}}]}),
    orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": "stop"}]}),
    orjson.dumps({"model": "m", "choices": [], "usage": USAGE}),
    "[DONE]",
)


def _service() -> tuple[ExtProcService, RecordingSink]:
    stats, rec = SidecarStats(), RecordingSink()
    ctx = ProcessorContext(TokenizerRegistry())
    return ExtProcService(Attribution(AttributionSettings(), stats), ctx, [rec], stats), rec


def _observed(msg):  # noqa: ANN001, ANN202
    msg.observability_mode = True
    return msg


def _response_stream(service: ExtProcService, headers) -> None:  # noqa: ANN001
    s = service.open_stream([("x-extproc-role", "response")])
    for msg in (headers, m.body(STREAM, response=True, code=200), m.body(b"", response=True, eos=True)):
        assert s.on_message(_observed(msg)) is None
    s.close()


def _request_stream_answered_too_late(service: ExtProcService, *, body: bool, team: str = "late"):  # noqa: ANN202
    """The request filter's stream: its answers came after Envoy's message_timeout, so Envoy
    applied none of them and reset the stream."""
    s = service.open_stream([("x-extproc-role", "request")])
    s.on_message(m.request_headers(x_team=team))
    if body:
        s.on_message(m.body(CHAT, eos=True))
    return s


def test_request_stream_timed_out_on_headers_counts_once():
    service, rec = _service()
    req = _request_stream_answered_too_late(service, body=False)
    _response_stream(service, m.request_headers(x_team="late"))  # no correlation header
    req.close()  # Envoy reset it
    service.sweep_pending(max_age_s=0)
    (ev,) = rec.events
    assert (ev.prompt_tokens, ev.completion_tokens, ev.labels["team"]) == (7, 2, "late")
    assert not ev.client_aborted and ev.error == ""
    assert not service.pending and service.stats.hybrid_paired_by_request_id == 1


def test_request_stream_timed_out_on_body_counts_once_with_the_request_it_read():
    service, rec = _service()
    req = _request_stream_answered_too_late(service, body=True)
    _response_stream(service, m.request_headers(x_team="late"))
    req.close()
    service.sweep_pending(max_age_s=0)
    (ev,) = rec.events
    assert ev.request_model == "m" and ev.completion_tokens == 2 and ev.prompt_tokens == 7


def test_response_stream_first_then_the_late_request_stream_counts_once():
    """The request stream's late message may be read after the response stream's (another
    transport's scheduling): the response stream metered alone, the request stream must not
    leave a second event for the sweep."""
    service, rec = _service()
    _response_stream(service, m.request_headers(x_team="late"))
    req = _request_stream_answered_too_late(service, body=True)
    req.close()
    service.sweep_pending(max_age_s=0)
    (ev,) = rec.events
    assert ev.completion_tokens == 2 and ev.labels["team"] == "late"
    assert not service.pending


def test_request_ids_reused_by_clients_do_not_pair_other_requests():
    """A client may send its own x-request-id (Envoy keeps it from internal clients): a request
    paired by correlation id is not taken by another request's response stream that has none,
    and each request is counted once."""
    service, rec = _service()
    a = service.open_stream([("x-extproc-role", "request")])
    answer = a.on_message(m.request_headers(x_team="a"))
    cid = answer.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    a.on_message(m.body(CHAT, eos=True))
    a.close()
    # b's request stream timed out; its response stream has the same x-request-id, no correlation
    b = _request_stream_answered_too_late(service, body=True)
    _response_stream(service, m.request_headers(x_team="late"))
    b.close()
    _response_stream(service, m.request_headers(x_team="a", **{CORRELATION_HEADER.replace("-", "_"): cid}))
    service.sweep_pending(max_age_s=0)
    assert sorted(ev.labels["team"] for ev in rec.events) == ["a", "late"]
    assert all(ev.completion_tokens == 2 and not ev.error for ev in rec.events)


def test_orphan_without_response_stream_is_still_swept_once():
    service, rec = _service()
    req = _request_stream_answered_too_late(service, body=True)
    req.close()
    service.sweep_pending(max_age_s=0)
    service.sweep_pending(max_age_s=0)
    (ev,) = rec.events
    assert ev.error == "response_not_observed"


def test_two_late_requests_with_the_same_id_and_labels_count_twice_not_four_times():
    """Nothing tells two such requests apart: neither is paired by guess, each response stream
    meters alone, and the sweep does not count their request streams again."""
    service, rec = _service()
    first = _request_stream_answered_too_late(service, body=True)
    second = _request_stream_answered_too_late(service, body=True)
    _response_stream(service, m.request_headers(x_team="late"))
    _response_stream(service, m.request_headers(x_team="late"))
    first.close()
    second.close()
    service.sweep_pending(max_age_s=0)
    assert [ev.completion_tokens for ev in rec.events] == [2, 2]
    assert service.stats.hybrid_duplicates_dropped == 2 and not service.pending


def test_a_response_stream_whose_exchange_was_taken_pairs_with_the_late_one():
    """b's response stream (no header) took a's exchange, the only one pending then; a's
    response stream (header) then pairs with b's late request stream: two events, not three."""
    service, rec = _service()
    a = service.open_stream([("x-extproc-role", "request")])
    answer = a.on_message(m.request_headers(x_team="t"))
    cid = answer.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    a.close()
    _response_stream(service, m.request_headers(x_team="t"))  # b's, before b's late request stream
    b = _request_stream_answered_too_late(service, body=False, team="t")
    b.close()
    _response_stream(service, m.request_headers(x_team="t", **{CORRELATION_HEADER.replace("-", "_"): cid}))
    service.sweep_pending(max_age_s=0)
    assert [ev.completion_tokens for ev in rec.events] == [2, 2]
    assert all(not ev.error for ev in rec.events)


def test_unpaired_response_streams_are_remembered_up_to_a_bound(monkeypatch):
    import extproc.server

    monkeypatch.setattr(extproc.server, "_MAX_METERED_ALONE", 1)
    service, rec = _service()
    _response_stream(service, m.request_headers(x_team="a"))
    _response_stream(service, m.request_headers(x_team="b", x_request_id="rid-2"))
    assert len(rec.events) == 2 and len(service._metered_alone) == 1
    assert service.stats.errors["hybrid_unpaired_overflow"] == 1
