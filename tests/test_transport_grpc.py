"""The h2 transport (asyncio glue + connection core) against grpcio's own client: what a
conformant gRPC peer expects, over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from extproc import wire
from extproc.transport import H2GrpcServer, h2conn, start_h2_server
from extproc.transport.grpcio_server import client_stub
from extproc.transport.session import Metadata
from tests import ext_proc_msgs as m

pytestmark = pytest.mark.timeout(30)


class Tracked:
    """A session whose lifecycle the test can observe: answers every message (response bodies
    echoed back, so sizes flow both ways)."""

    def __init__(self, owner: Sessions, metadata: Metadata) -> None:
        self.owner, self.metadata = owner, metadata
        self.received = 0
        self.closed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.owner.stop_after is not None and self.received >= self.owner.stop_after

    def on_message(self, msg: wire.ProcessingRequest) -> wire.ProcessingResponse | None:
        self.received += 1
        if self.owner.fail:
            raise ValueError("boom 100% \u00e9")
        kind = msg.WhichOneof("request")
        assert kind is not None
        if kind == wire.RESPONSE_BODY:
            return wire.replace_response_chunk(msg.response_body.body)
        return wire.continue_response(kind)

    def close(self) -> None:
        assert not self.closed.is_set(), "closed twice"
        if not self.finished:
            self.owner.unfinished += 1
        self.closed.set()


class Sessions:
    def __init__(self, *, stop_after: int | None = None, fail: bool = False) -> None:
        self.stop_after, self.fail = stop_after, fail
        self.opened: list[Tracked] = []
        self.unfinished = 0  # closed before they finished: reset, deadline, stop

    def __call__(self, metadata: Metadata) -> Tracked:
        s = Tracked(self, metadata)
        self.opened.append(s)
        return s


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


async def _serve(sessions: Sessions, listen: str = "127.0.0.1:0") -> tuple[H2GrpcServer, grpc.aio.Channel, str]:
    server, port = await start_h2_server(sessions, listen)
    target = listen if listen.startswith("unix:") else f"127.0.0.1:{port}"
    return server, grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS), target


async def _collect(call: Any) -> list[wire.ProcessingResponse]:
    return [r async for r in call]


async def test_one_stream_three_messages():
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
    try:
        msgs = [m.request_headers(), m.body(b"{}", eos=True), m.response_headers()]
        out = await _collect(client_stub(ch)(iter(msgs)))
        assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_headers"]
        await asyncio.wait_for(sessions.opened[0].closed.wait(), 5)
    finally:
        await ch.close()
        await server.stop(1)


async def test_many_concurrent_streams_keep_order():
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
    stub = client_stub(ch)

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
        await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in sessions.opened)), 5)
        assert len(sessions.opened) == 300 and server.open_streams() == 0
    finally:
        await ch.close()
        await server.stop(1)


@pytest.mark.parametrize("size", [70_000, 5 * 1024 * 1024])
async def test_large_messages_both_ways(size, monkeypatch):
    # 5 MiB exceeds our 4 MiB stream receive window and grpcio's windows: both sides must
    # exchange WINDOW_UPDATEs mid-message.
    drained = []
    real = h2conn.H2Connection._drain_stream
    monkeypatch.setattr(h2conn.H2Connection, "_drain_stream", lambda self, s: (drained.append(s.id), real(self, s)))
    server, ch, _ = await _serve(Sessions())
    try:
        payloads = [bytes([i]) * size for i in range(3)]
        out = await _collect(client_stub(ch)(iter([m.body(p, response=True) for p in payloads])))
        assert [r.response_body.response.body_mutation.body for r in out] == payloads
        if size > 4 * 1024 * 1024:
            assert drained, "send-side flow control was never exercised"
    finally:
        await ch.close()
        await server.stop(1)


async def test_server_finishes_before_client_half_close():
    sessions = Sessions(stop_after=1)
    server, ch, _ = await _serve(sessions)
    try:
        call = client_stub(ch)()
        await call.write(m.request_headers())
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert sessions.opened[0].closed.is_set() and sessions.unfinished == 0
        # the connection is still good for new streams
        out = await _collect(client_stub(ch)(iter([m.request_headers()])))
        assert len(out) == 1
    finally:
        await ch.close()
        await server.stop(1)


async def test_client_cancellation_closes_the_session():
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
    try:
        call = client_stub(ch)()
        await call.write(m.request_headers())
        await call.read()
        call.cancel()
        await asyncio.wait_for(sessions.opened[0].closed.wait(), 5)
        assert sessions.unfinished == 1 and server.open_streams() == 0
    finally:
        await ch.close()
        await server.stop(1)


async def test_unknown_method_is_unimplemented():
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
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
        assert not sessions.opened
    finally:
        await ch.close()
        await server.stop(1)


async def test_session_exception_is_unknown_with_message():
    sessions = Sessions(fail=True)
    server, ch, _ = await _serve(sessions)
    try:
        call = client_stub(ch)(iter([m.request_headers()]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(call)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        assert "boom 100% \u00e9" in err.value.details()  # percent-encoded on the wire
        assert sessions.opened[0].closed.is_set()
    finally:
        await ch.close()
        await server.stop(1)


async def test_deadline_closes_the_session():
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
    try:
        call = client_stub(ch)(timeout=0.3)
        await call.write(m.request_headers())
        await call.read()
        # the client never half-closes: only the deadline ends it (ours, or grpcio's own timer;
        # tests/test_h2conn.py tests ours alone)
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(sessions.opened[0].closed.wait(), 5)
        assert sessions.unfinished == 1
    finally:
        await ch.close()
        await server.stop(1)


async def test_stop_drains_then_cancels_in_flight_streams():
    sessions = Sessions()
    server, ch, target = await _serve(sessions)
    stub = client_stub(ch)
    try:
        slow_call = stub()
        await slow_call.write(m.request_headers("/slow"))
        await slow_call.read()
        quick_call = stub()
        await quick_call.write(m.request_headers("/quick"))
        await quick_call.read()
        slow, quick = sessions.opened
        stopping = asyncio.create_task(server.stop(0.5))
        await asyncio.sleep(0)  # one step: stop() has sent its GOAWAYs and waits for the grace
        assert server.stopping and not stopping.done()
        await quick_call.done_writing()  # finishes within grace
        assert await quick_call.read() is grpc.aio.EOF
        assert await quick_call.code() == grpc.StatusCode.OK
        assert quick.closed.is_set() and not slow.closed.is_set()
        await stopping
        assert slow.closed.is_set() and sessions.unfinished == 2  # both were still open to more
        assert await slow_call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert not server.connections
        async with grpc.aio.insecure_channel(target) as ch2:
            with pytest.raises(grpc.aio.AioRpcError):
                await _collect(client_stub(ch2)(iter([m.request_headers()]), timeout=1))
    finally:
        await ch.close()


async def test_stop_returns_once_the_last_stream_ends():
    """The grace is a limit, not a wait: stop() returns when the streams are done."""
    sessions = Sessions()
    server, ch, _ = await _serve(sessions)
    try:
        call = client_stub(ch)()
        await call.write(m.request_headers())
        await call.read()
        stopping = asyncio.create_task(server.stop(60))
        await asyncio.sleep(0)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 10)
        assert sessions.opened[0].closed.is_set() and not server.connections
    finally:
        await ch.close()


async def test_unix_socket_metadata_and_peer(tmp_path):
    sessions = Sessions()
    path = tmp_path / "extproc.sock"
    server, port = await start_h2_server(sessions, f"unix:{path}")
    assert port == 0
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            call = client_stub(ch)(metadata=(("x-k", "v"),), timeout=10)
            await call.write(m.request_headers())
            await call.read()
            (conn,) = server.connections
            assert conn.conn.peer.startswith("unix:")
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        assert ("x-k", "v") in sessions.opened[0].metadata
    finally:
        await server.stop(1)
