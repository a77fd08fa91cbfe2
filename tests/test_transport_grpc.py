"""The h2 transport against grpcio's own client: what a conformant gRPC peer expects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from extproc import wire
from extproc.transport import h2server, start_h2_server
from tests import ext_proc_msgs as m

pytestmark = pytest.mark.timeout(30)


def _body_reply(data: bytes) -> wire.ProcessingResponse:
    return wire.replace_response_chunk(data)


async def echo(requests: AsyncIterator[wire.ProcessingRequest], context: Any) -> AsyncIterator[wire.ProcessingResponse]:
    """Answers each message; response bodies are echoed back (so sizes flow both ways)."""
    async for req in requests:
        kind = req.WhichOneof("request")
        if kind == wire.RESPONSE_BODY:
            yield _body_reply(req.response_body.body)
        else:
            yield wire.continue_response(kind)


class Tracker:
    """A handler whose lifecycle the test can observe."""

    def __init__(self, *, stop_after: int | None = None, block: bool = False) -> None:
        self.stop_after = stop_after
        self.block = block
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled = 0
        self.received = 0
        self.contexts: list[Any] = []

    async def __call__(self, requests: AsyncIterator[wire.ProcessingRequest], context: Any) -> AsyncIterator[wire.ProcessingResponse]:
        self.contexts.append(context)
        self.started.set()
        try:
            async for req in requests:
                self.received += 1
                yield wire.continue_response(req.WhichOneof("request"))
                if self.stop_after is not None and self.received >= self.stop_after:
                    return
            if self.block:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finished.set()


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


async def _serve(handler: Any, listen: str = "127.0.0.1:0") -> tuple[h2server.H2GrpcServer, grpc.aio.Channel, str]:
    server, port = await start_h2_server(handler, listen)
    target = listen if listen.startswith("unix:") else f"127.0.0.1:{port}"
    return server, grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS), target


async def _collect(call: Any) -> list[wire.ProcessingResponse]:
    return [r async for r in call]


async def test_one_stream_three_messages():
    server, ch, _ = await _serve(echo)
    try:
        msgs = [m.request_headers(), m.body(b"{}", eos=True), m.response_headers()]
        out = await _collect(wire.client_stub(ch)(iter(msgs)))
        assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_headers"]
    finally:
        await ch.close()
        await server.stop(1)


async def test_many_concurrent_streams_keep_order():
    server, ch, _ = await _serve(echo)
    stub = wire.client_stub(ch)

    async def one(i: int) -> None:
        chunks = [f"{i}:{k}".encode() for k in range(5)]
        call = stub()
        for c in chunks:  # interleaved writes and reads: many streams active at once
            await call.write(m.body(c, response=True))
        await call.done_writing()
        got = [r.response_body.response.body_mutation.body async for r in call]
        assert got == chunks
        assert await call.code() == grpc.StatusCode.OK

    try:
        await asyncio.gather(*(one(i) for i in range(300)))
        assert not server.tasks
    finally:
        await ch.close()
        await server.stop(1)


@pytest.mark.parametrize("size", [70_000, 5 * 1024 * 1024])
async def test_large_messages_both_ways(size, monkeypatch):
    # 5 MiB exceeds our 4 MiB stream receive window and grpcio's windows: both sides must
    # exchange WINDOW_UPDATEs mid-message.
    drained = []
    real = h2server._Connection._drain_stream
    monkeypatch.setattr(h2server._Connection, "_drain_stream", lambda self, s: (drained.append(s.id), real(self, s)))
    server, ch, _ = await _serve(echo)
    try:
        payloads = [bytes([i]) * size for i in range(3)]
        out = await _collect(wire.client_stub(ch)(iter([m.body(p, response=True) for p in payloads])))
        assert [r.response_body.response.body_mutation.body for r in out] == payloads
        if size > 4 * 1024 * 1024:
            assert drained, "send-side flow control was never exercised"
    finally:
        await ch.close()
        await server.stop(1)


async def test_server_finishes_before_client_half_close():
    tracker = Tracker(stop_after=1)
    server, ch, _ = await _serve(tracker)
    try:
        call = wire.client_stub(ch)()
        await call.write(m.request_headers())
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert tracker.finished.is_set() and tracker.cancelled == 0
        # the connection is still good for new streams
        out = await _collect(wire.client_stub(ch)(iter([m.request_headers()])))
        assert len(out) == 1
    finally:
        await ch.close()
        await server.stop(1)


async def test_client_cancellation_runs_handler_finally():
    tracker = Tracker()
    server, ch, _ = await _serve(tracker)
    try:
        call = wire.client_stub(ch)()
        await call.write(m.request_headers())
        await call.read()
        call.cancel()
        await asyncio.wait_for(tracker.finished.wait(), 5)
        assert tracker.cancelled == 1
        assert tracker.contexts[0].cancelled()
        await asyncio.sleep(0.05)
        assert not server.tasks and not any(c.streams for c in server.connections)
    finally:
        await ch.close()
        await server.stop(1)


async def test_unknown_method_is_unimplemented():
    server, ch, _ = await _serve(echo)
    try:
        other = ch.stream_stream("/some.Service/Other", request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(other(iter([])))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "/some.Service/Other" in err.value.details()
        unary = ch.unary_unary("/some.Service/Get", request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(b"x")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await ch.close()
        await server.stop(1)


async def test_handler_exception_is_unknown_with_message():
    async def broken(requests, context):
        async for _ in requests:
            yield wire.continue_response(wire.REQUEST_HEADERS)
            raise ValueError("boom 100% \u00e9")

    server, ch, _ = await _serve(broken)
    try:
        call = wire.client_stub(ch)(iter([m.request_headers()]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(call)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        assert "boom 100% \u00e9" in err.value.details()  # percent-encoded on the wire
    finally:
        await ch.close()
        await server.stop(1)


async def test_deadline_cancels_handler():
    tracker = Tracker(block=True)
    server, ch, _ = await _serve(tracker)
    try:
        call = wire.client_stub(ch)(iter([m.request_headers()]), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(tracker.finished.wait(), 5)
        assert tracker.cancelled == 1
    finally:
        await ch.close()
        await server.stop(1)


async def test_stop_drains_then_cancels_in_flight_streams():
    quick = Tracker()
    slow = Tracker(block=True)

    async def route(requests, context):
        first = await requests.__anext__()
        handler = slow if first.request_headers.headers.headers[1].raw_value == b"/slow" else quick
        async def again():
            yield first
            async for r in requests:
                yield r
        async for resp in handler(again(), context):
            yield resp

    server, ch, target = await _serve(route)
    stub = wire.client_stub(ch)
    try:
        slow_call = stub()
        await slow_call.write(m.request_headers("/slow"))
        await slow_call.read()
        quick_call = stub()
        await quick_call.write(m.request_headers("/quick"))
        await quick_call.read()
        stopping = asyncio.create_task(server.stop(0.5))
        await asyncio.sleep(0.1)
        await quick_call.done_writing()  # finishes within grace
        assert await quick_call.read() is grpc.aio.EOF
        assert await quick_call.code() == grpc.StatusCode.OK
        await stopping
        assert slow.cancelled == 1 and slow.finished.is_set()
        assert await slow_call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert not server.tasks and not server.connections
        async with grpc.aio.insecure_channel(target) as ch2:
            with pytest.raises(grpc.aio.AioRpcError):
                await _collect(wire.client_stub(ch2)(iter([m.request_headers()]), timeout=1))
    finally:
        await ch.close()


async def test_unix_socket_and_context(tmp_path):
    tracker = Tracker()
    path = tmp_path / "extproc.sock"
    server, port = await start_h2_server(tracker, f"unix:{path}")
    assert port == 0
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            out = await _collect(wire.client_stub(ch)(iter([m.request_headers()]), metadata=(("x-k", "v"),),
                                                     timeout=10))
            assert len(out) == 1
        ctx = tracker.contexts[0]
        assert ("x-k", "v") in ctx.invocation_metadata()
        assert ctx.peer().startswith("unix:") and not ctx.cancelled()
    finally:
        await server.stop(1)
