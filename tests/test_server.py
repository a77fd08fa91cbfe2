"""The gRPC stream loop over a real grpc.aio server and client: one event per request, hybrid
pairing of request and response streams, orphan sweep, errors answered not raised."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest

from extproc import wire
from extproc.config import AttributionSettings
from extproc.exchange import CORRELATION_HEADER
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from extproc.transport import start_h2_server
from extproc.transport.grpcio_server import client_stub, start_grpc_server
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink


class _Sink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def emit(self, event) -> None:  # noqa: ANN001
        super().emit(event)
        self.arrived.set()


@pytest.fixture(params=["grpcio", "h2"])
async def served(request):
    stats, rec = SidecarStats(), _Sink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             [rec], stats)
    if request.param == "grpcio":
        server, port = await start_grpc_server(service.open_stream, "127.0.0.1:0")
    else:
        server, port = await start_h2_server(service.open_stream, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield service, rec, client_stub(channel)
    await channel.close()
    await server.stop(0)


async def _call(stub, msgs, role: str | None = None, observe: bool = False) -> list:
    for msg in msgs:
        msg.observability_mode = observe
    metadata = (("x-extproc-role", role),) if role else None
    return [r async for r in stub(iter(msgs), metadata=metadata)]


CHAT = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
STREAM = m.sse(orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": "yo"}, "finish_reason": "stop"}]}),
               orjson.dumps({"model": "m", "choices": [], "usage": USAGE}), "[DONE]")


async def test_one_event_per_stream_and_stream_closed_at_response_end(served):
    service, rec, stub = served
    out = await _call(stub, [m.request_headers(x_team="a"), m.body(CHAT, eos=True), m.response_headers(),
                             m.body(STREAM, response=True, eos=True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_headers",
                                                      "response_body"]
    assert len(rec.events) == 1 and rec.events[0].prompt_tokens == 4
    # the usage chunk vLLM sent because we asked is not forwarded
    assert b"usage" not in out[3].response_body.response.body_mutation.body


async def test_response_headers_skipped_status_from_attribute_and_sse_from_the_body(served):
    """Envoy's shipped configs skip response headers: the status comes as the response.code
    attribute with the first body message, and the body shows it is SSE."""
    service, rec, stub = served
    out = await _call(stub, [m.request_headers(x_team="a"), m.body(CHAT, eos=True),
                             m.body(STREAM[:40], response=True, code=200),
                             m.body(STREAM[40:], response=True, eos=True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_body",
                                                      "response_body"]
    (ev,) = rec.events
    assert ev.http_status == 200 and ev.prompt_tokens == 4 and ev.completion_tokens == 2 and not ev.error
    assert b"usage" not in out[3].response_body.response.body_mutation.body


async def test_response_headers_skipped_error_status_and_json_body(served):
    service, rec, stub = served
    error = orjson.dumps({"object": "error", "message": "model overloaded", "code": 503})
    await _call(stub, [m.request_headers(x_team="a"), m.body(CHAT, eos=True),
                       m.body(error, response=True, eos=True, code=503)])
    (ev,) = rec.events
    assert ev.http_status == 503 and ev.error == "upstream_error" and "overloaded" in ev.error_detail


async def test_response_headers_skipped_without_the_attribute_is_read_from_the_body(served):
    """An Envoy not configured with response_attributes: status unknown (0), tokens still counted."""
    service, rec, stub = served
    await _call(stub, [m.request_headers(x_team="a"), m.body(CHAT, eos=True),
                       m.body(STREAM, response=True, eos=True)])
    (ev,) = rec.events
    assert ev.http_status == 0 and ev.completion_tokens == 2 and ev.token_source == 1


async def test_hybrid_request_and_response_streams_make_one_event(served):
    service, rec, stub = served
    req_side = await _call(stub, [m.request_headers(x_team="hy"), m.body(CHAT, eos=True)], role="request")
    mutation = req_side[0].request_headers.response.header_mutation.set_headers[0].header
    assert mutation.key == CORRELATION_HEADER
    assert orjson.loads(req_side[1].request_body.response.body_mutation.body)["stream_options"]["include_usage"]
    assert not rec.events and len(service.pending) == 1
    # Envoy forwards the request with the header the request filter added
    headers = m.request_headers(x_team="hy", **{CORRELATION_HEADER.replace("-", "_"): mutation.raw_value.decode()})
    out = await _call(stub, [headers, m.response_headers(), m.body(STREAM, response=True, eos=True)],
                      role="response", observe=True)
    assert out == []  # observability mode: no answers
    assert not service.pending
    (ev,) = rec.events
    assert ev.labels["team"] == "hy" and ev.usage_injected and ev.completion_tokens == 2 and not ev.client_aborted


async def test_orphan_request_stream_is_swept_and_flagged(served):
    service, rec, stub = served
    await _call(stub, [m.request_headers(x_team="lost"), m.body(CHAT, eos=True)], role="request")
    assert service.sweep_pending(max_age_s=60) == 0 and not rec.events
    assert service.sweep_pending(max_age_s=0) == 1
    (ev,) = rec.events
    assert ev.error == "response_not_observed" and ev.labels["team"] == "lost" and ev.client_aborted


async def test_hybrid_unmetered_path_is_counted_once_by_the_response_stream(served):
    service, rec, stub = served
    out = await _call(stub, [m.request_headers("/v1/models", method="GET")], role="request")
    assert out[0].mode_override.response_header_mode == wire.ProcessingMode.SKIP
    assert not rec.events and not service.pending
    await _call(stub, [m.request_headers("/v1/models", method="GET"), m.response_headers(200, "application/json")],
                role="response", observe=True)
    (ev,) = rec.events
    assert not ev.metered and service.stats.unmetered_requests == 1


async def test_handler_bug_is_answered_with_continue_and_flagged(served, monkeypatch):
    service, rec, stub = served
    from extproc.processors.chat import ChatProcessor

    def boom(self, *a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(ChatProcessor, "on_response_chunk", boom)
    out = await _call(stub, [m.request_headers(), m.body(CHAT, eos=True), m.response_headers(),
                             m.body(STREAM, response=True, eos=True)])
    assert out[3] == wire.continue_response(wire.RESPONSE_BODY)
    (ev,) = rec.events
    assert ev.error == "internal_error" and "bug" in ev.error_detail
    assert service.stats.errors["response_body"] == 1


async def test_cancelled_stream_still_emits_an_aborted_event(served):
    service, rec, stub = served
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    call = stub(requests())
    for msg in (m.request_headers(x_team="gone"), m.body(CHAT, eos=True), m.response_headers(),
                m.body(STREAM[:40], response=True)):
        await queue.put(msg)
        await call.read()
    call.cancel()  # what Envoy does when the client goes away
    await asyncio.wait_for(rec.arrived.wait(), 5)
    (ev,) = rec.events
    assert ev.client_aborted and ev.labels["team"] == "gone"
    assert service.stats.streams_cancelled == 1
