"""The h2 transport driven frame by frame: what grpcio's client never sends (CONTINUATION,
padding, tiny windows, protocol errors)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import hpack
import pytest

from extproc import wire
from extproc.transport import frames as f
from extproc.transport import h2server
from extproc.transport.hpackcache import CachingDecoder, table_neutral
from tests import ext_proc_msgs as m

pytestmark = pytest.mark.timeout(20)

Frame = tuple[int, int, int, bytes]


def grpc_message(msg: Any, compressed: bool = False) -> bytes:
    data = msg.SerializeToString()
    return struct.pack(">BL", int(compressed), len(data)) + data


def reply_size(body: bytes) -> int:
    """Wire size (with the 5-byte prefix) of echo's answer to a response body chunk."""
    return 5 + len(wire.replace_response_chunk(body).SerializeToString())


class Handlers:
    def __init__(self) -> None:
        self.finished = asyncio.Event()
        self.cancelled = 0
        self.stop_after: int | None = None

    async def echo(self, requests: AsyncIterator[wire.ProcessingRequest], context: Any) -> AsyncIterator[wire.ProcessingResponse]:
        n = 0
        try:
            async for req in requests:
                n += 1
                kind = req.WhichOneof("request")
                if kind == wire.RESPONSE_BODY:
                    yield wire.replace_response_chunk(req.response_body.body)
                else:
                    yield wire.continue_response(kind)
                if self.stop_after is not None and n >= self.stop_after:
                    return
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finished.set()


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.server_settings: dict[int, int] = {}

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        writer.write(f.PREFACE + f.settings(settings or {}))
        ftype, flags, _, payload = await c.read()
        assert ftype == f.SETTINGS and not flags, "server must open with SETTINGS"
        c.server_settings = dict(f.SETTING.iter_unpack(payload))
        c.send(f.SETTINGS, f.ACK, 0)
        return c

    def send(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.writer.write(f.frame(ftype, flags, sid, payload))

    def block(self, path: str = wire.METHOD_PATH, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        return self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", "t"), ("content-type", "application/grpc"),
                                    ("te", "trailers"), *extra])

    def open(self, sid: int, end_stream: bool = False) -> None:
        self.send(f.HEADERS, f.END_HEADERS | (f.END_STREAM if end_stream else 0), sid, self.block())

    async def read(self, timeout: float = 5) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        hi, lo, ftype, flags, sid = f.FRAME_HEADER.unpack(head)
        payload = await asyncio.wait_for(self.reader.readexactly((hi << 16) | lo), timeout)
        return ftype, flags, sid & 0x7FFFFFFF, payload

    async def until(self, pred: Any, timeout: float = 5) -> list[Frame]:
        """Frames up to and including the first matching `pred`."""
        out = []
        while True:
            fr = await self.read(timeout)
            out.append(fr)
            if pred(fr):
                return out

    async def quiet(self, seconds: float = 0.15) -> list[Frame]:
        """Whatever arrives within `seconds` (to show nothing more is sent)."""
        out = []
        try:
            while True:
                out.append(await self.read(seconds))
        except TimeoutError:
            return out

    async def goaway(self) -> tuple[int, int]:
        frames = await self.until(lambda fr: fr[0] == f.GOAWAY)
        last, code = struct.unpack(">LL", frames[-1][3][:8])
        return last, code

    async def closed(self) -> bool:
        try:
            while True:
                await self.read(2)
        except asyncio.IncompleteReadError:
            return True

    def headers(self, fr: Frame) -> dict[bytes, bytes]:
        return dict(self.decoder.decode(fr[3], raw=True))

    def close(self) -> None:
        self.writer.close()


def data_payload(frames: list[Frame], sid: int) -> bytes:
    return b"".join(p for t, _, s, p in frames if t == f.DATA and s == sid)


def is_end(sid: int):
    return lambda fr: fr[0] in (f.HEADERS, f.DATA) and fr[2] == sid and fr[1] & f.END_STREAM


@pytest.fixture
async def served():
    handlers = Handlers()
    server = h2server.H2GrpcServer(handlers.echo, max_concurrent_streams=3)
    port = await server.listen("127.0.0.1:0")
    yield server, port, handlers
    await server.stop(0.5)


async def test_settings_exchange_and_ping(served):
    server, port, _ = served
    c = await RawClient.connect(port)
    assert c.server_settings[f.SETTINGS_MAX_CONCURRENT_STREAMS] == 3
    assert c.server_settings[f.SETTINGS_INITIAL_WINDOW_SIZE] == h2server.STREAM_WINDOW
    frames = await c.until(lambda fr: fr[0] == f.SETTINGS and fr[1] & f.ACK)
    wu = [p for t, _, s, p in frames if t == f.WINDOW_UPDATE and s == 0]
    assert wu and struct.unpack(">L", wu[0])[0] == h2server.CONN_WINDOW - f.DEFAULT_WINDOW
    c.send(f.PING, 0, 0, b"12345678")
    assert await c.until(lambda fr: fr[0] == f.PING) == [(f.PING, f.ACK, 0, b"12345678")]
    c.send(f.PING, f.ACK, 0, b"87654321")  # an ACK is not answered
    c.send(0xFA, 0, 0, b"ext")  # unknown frame type: ignored
    c.send(f.PING, 0, 0, b"abcdefgh")
    assert (await c.until(lambda fr: fr[0] == f.PING))[-1][3] == b"abcdefgh"
    c.close()


async def test_continuation_padding_priority_and_message_framing(served):
    _, port, _ = served
    c = await RawClient.connect(port)
    block = c.block()
    a, b, rest = block[:10], block[10:20], block[20:]
    # HEADERS padded + priority, then two CONTINUATIONs
    c.send(f.HEADERS, f.PADDED | f.PRIORITY_FLAG, 1, bytes([3]) + struct.pack(">LB", 0, 15) + a + b"\0\0\0")
    c.send(f.CONTINUATION, 0, 1, b)
    c.send(f.CONTINUATION, f.END_HEADERS, 1, rest)
    msgs = [m.body(b"one", response=True), m.body(b"two", response=True), m.body(b"x" * 3000, response=True)]
    wire_bytes = b"".join(grpc_message(x) for x in msgs)
    split = len(grpc_message(msgs[0])) + len(grpc_message(msgs[1])) + 100
    # two whole messages and part of the third in one padded DATA frame, the rest in another
    c.send(f.DATA, f.PADDED, 1, bytes([7]) + wire_bytes[:split] + b"\0" * 7)
    c.send(f.PRIORITY, 0, 1, struct.pack(">LB", 0, 200))
    c.send(f.DATA, f.END_STREAM, 1, wire_bytes[split:])
    frames = await c.until(is_end(1))
    heads = [fr for fr in frames if fr[0] == f.HEADERS]
    assert c.headers(heads[0]) == {b":status": b"200", b"content-type": b"application/grpc"}
    assert c.headers(heads[1]) == {b"grpc-status": b"0"}
    data = data_payload(frames, 1)
    bodies = []
    while data:
        n = struct.unpack(">L", data[1:5])[0]
        bodies.append(wire.ProcessingResponse.FromString(data[5:5 + n]).response_body.response.body_mutation.body)
        data = data[5 + n:]
    assert bodies == [b"one", b"two", b"x" * 3000]
    assert not [fr for fr in frames if fr[0] == f.RST_STREAM]  # client had half-closed
    c.close()


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
async def test_bad_preface(served, raw):
    _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    c = RawClient(reader, writer)
    assert (await c.goaway())[1] == f.PROTOCOL_ERROR
    assert await c.closed()


def _bad_hpack(c: RawClient) -> None:
    c.send(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff\x0f")


@pytest.mark.parametrize("action,code", [
    (lambda c: c.send(f.DATA, 0, 0, b"x"), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.DATA, 0, 5, b"x"), f.PROTOCOL_ERROR),  # idle stream
    (lambda c: c.send(f.PING, 0, 0, b"short"), f.FRAME_SIZE_ERROR),
    (lambda c: c.send(f.PING, 0, 1, b"12345678"), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", f.MAX_WINDOW)), f.FLOW_CONTROL_ERROR),
    (lambda c: c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_MAX_FRAME_SIZE, 100)), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_INITIAL_WINDOW_SIZE, 2**31)), f.FLOW_CONTROL_ERROR),
    (lambda c: c.send(f.SETTINGS, 0, 0, b"\0\0\0"), f.FRAME_SIZE_ERROR),
    (lambda c: c.send(f.SETTINGS, f.ACK, 0, f.SETTING.pack(1, 1)), f.FRAME_SIZE_ERROR),
    (lambda c: c.send(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\0\0\0\2"), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.HEADERS, f.END_HEADERS, 2, c.block()), f.PROTOCOL_ERROR),  # even id
    (lambda c: c.send(f.CONTINUATION, f.END_HEADERS, 1, c.block()), f.PROTOCOL_ERROR),
    (lambda c: (c.send(f.HEADERS, 0, 1, c.block()), c.send(f.PING, 0, 0, b"12345678")), f.PROTOCOL_ERROR),
    (lambda c: c.send(f.RST_STREAM, 0, 9, struct.pack(">L", 8)), f.PROTOCOL_ERROR),  # idle stream
    (lambda c: c.send(f.DATA, 0, 1, b"x" * (f.DEFAULT_MAX_FRAME + 1)), f.FRAME_SIZE_ERROR),
    (lambda c: c.send(f.DATA, f.PADDED, 1, b"\x09abc"), f.PROTOCOL_ERROR),
    (_bad_hpack, f.COMPRESSION_ERROR),
])
async def test_connection_errors_send_goaway(served, action, code):
    server, port, _ = served
    c = await RawClient.connect(port)
    action(c)
    last, got = await c.goaway()
    assert got == code
    assert await c.closed()


async def test_first_frame_must_be_settings(served):
    _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f.PREFACE + f.ping(b"12345678"))
    assert (await RawClient(reader, writer).goaway())[1] == f.PROTOCOL_ERROR


async def test_send_flow_control_stream_window(served):
    _, port, _ = served
    c = await RawClient.connect(port, {f.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    c.open(1)
    body = b"y" * 3000
    c.send(f.DATA, 0, 1, grpc_message(m.body(body, response=True)))
    size = reply_size(body)
    frames = await c.until(lambda fr: fr[0] == f.DATA)
    frames += await c.quiet()
    assert len(data_payload(frames, 1)) == 1000  # exactly the window, then nothing
    c.send(f.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1500))
    frames = await c.until(lambda fr: fr[0] == f.DATA) + await c.quiet()
    assert len(data_payload(frames, 1)) == 1500
    c.send(f.DATA, f.END_STREAM, 1, b"")  # trailers must wait behind the blocked data
    assert not [fr for fr in await c.quiet() if fr[0] == f.HEADERS]
    # raising INITIAL_WINDOW_SIZE applies to open streams too
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_INITIAL_WINDOW_SIZE, 100_000))
    frames = await c.until(is_end(1))
    assert len(data_payload(frames, 1)) == size - 2500
    assert c.headers(frames[-1]) == {b"grpc-status": b"0"}
    c.close()


async def test_send_flow_control_connection_window_and_frame_size(served):
    _, port, _ = served
    c = await RawClient.connect(port, {f.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    bodies = {1: b"a" * 50_000, 3: b"b" * 50_000}
    for sid, body in bodies.items():
        c.open(sid)
        msg = grpc_message(m.body(body, response=True))
        for i in range(0, len(msg), f.DEFAULT_MAX_FRAME):
            c.send(f.DATA, 0, sid, msg[i:i + f.DEFAULT_MAX_FRAME])
        c.send(f.DATA, f.END_STREAM, sid, b"")
    frames = await c.until(lambda fr: fr[0] == f.DATA)
    frames += await c.quiet(0.3)
    sent = sum(len(p) for t, _, _, p in frames if t == f.DATA)
    assert sent == f.DEFAULT_WINDOW  # the connection window, shared by both streams
    assert max(len(p) for t, _, _, p in frames if t == f.DATA) <= f.DEFAULT_MAX_FRAME
    # a larger MAX_FRAME_SIZE is honoured
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_MAX_FRAME_SIZE, 40_000))
    c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20))
    def ended() -> set[int]:
        return {s for t, fl, s, _ in frames if t == f.HEADERS and fl & f.END_STREAM}

    while len(ended()) < 2:
        frames.append(await c.read())
    for sid, body in bodies.items():
        assert len(data_payload(frames, sid)) == reply_size(body)
    assert max(len(p) for t, _, _, p in frames if t == f.DATA) > f.DEFAULT_MAX_FRAME
    c.close()


async def test_receive_window_credit(served):
    _, port, _ = served
    c = await RawClient.connect(port, {f.SETTINGS_INITIAL_WINDOW_SIZE: 8 << 20})
    c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 8 << 20))  # room for the echo
    c.open(1)
    msg = grpc_message(m.body(b"z" * (3 << 20), response=True))  # one 3 MiB message
    for i in range(0, len(msg), f.DEFAULT_MAX_FRAME):
        c.send(f.DATA, 0, 1, msg[i:i + f.DEFAULT_MAX_FRAME])
    frames = await c.until(lambda fr: fr[0] == f.DATA)
    credited = sum(struct.unpack(">L", p)[0] for t, _, s, p in frames if t == f.WINDOW_UPDATE and s == 1)
    assert credited >= h2server.STREAM_WINDOW // 4  # credit flowed mid-message
    c.send(f.DATA, f.END_STREAM, 1, b"")
    await c.until(is_end(1))
    c.close()


async def test_header_table_size_change_is_acknowledged_in_next_block(served):
    _, port, _ = served
    c = await RawClient.connect(port, {f.SETTINGS_HEADER_TABLE_SIZE: 0})
    c.open(1, end_stream=True)
    frames = await c.until(is_end(1))
    assert frames[-1][3][:1] == f.TABLE_SIZE_ZERO  # trailers-only block starts with a size update
    assert c.headers(frames[-1])[b"grpc-status"] == b"0"
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_HEADER_TABLE_SIZE, 100))
    c.open(3, end_stream=True)
    frames = await c.until(is_end(3))
    assert frames[-1][3][:1] == f.TABLE_SIZE_ZERO
    c.open(5, end_stream=True)
    frames = await c.until(is_end(5))
    assert frames[-1][3][:1] != f.TABLE_SIZE_ZERO
    c.close()


async def test_rst_stream_cancels_handler(served):
    server, port, handlers = served
    c = await RawClient.connect(port)
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    await c.until(lambda fr: fr[0] == f.DATA)
    c.send(f.RST_STREAM, 0, 1, struct.pack(">L", f.CANCEL))
    await asyncio.wait_for(handlers.finished.wait(), 5)
    assert handlers.cancelled == 1
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))  # in flight after the reset: ignored
    c.send(f.WINDOW_UPDATE, 0, 1, struct.pack(">L", 10))
    c.send(f.PING, 0, 0, b"stillok!")
    frames = await c.until(lambda fr: fr[0] == f.PING)
    assert not [fr for fr in frames if fr[0] in (f.GOAWAY, f.RST_STREAM)]
    c.close()


async def test_handler_done_before_half_close(served):
    _, port, handlers = served
    handlers.stop_after = 1
    c = await RawClient.connect(port)
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    frames = await c.until(lambda fr: fr[0] == f.RST_STREAM)
    kinds = [(t, fl & f.END_STREAM) for t, fl, s, _ in frames if s == 1]
    assert kinds == [(f.HEADERS, 0), (f.DATA, 0), (f.HEADERS, f.END_STREAM), (f.RST_STREAM, 0)]
    assert struct.unpack(">L", frames[-1][3])[0] == f.NO_ERROR
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()))  # crossed in flight: ignored
    c.send(f.PING, 0, 0, b"stillok!")
    frames = await c.until(lambda fr: fr[0] == f.PING)
    assert not [fr for fr in frames if fr[0] in (f.GOAWAY, f.RST_STREAM)]
    assert handlers.cancelled == 0
    c.close()


async def test_client_trailers_end_the_request_stream(served):
    _, port, _ = served
    c = await RawClient.connect(port)
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, c.encoder.encode([("x-trailer", "1")]))
    frames = await c.until(is_end(1))
    assert c.headers(frames[-1]) == {b"grpc-status": b"0"}
    c.close()


@pytest.mark.parametrize("setup,status", [
    (lambda c: c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers(), compressed=True)), b"12"),
    (lambda c: c.send(f.DATA, f.END_STREAM, 1, b"\0\0\0\0\x05\x01"), b"13"),  # stream ends mid-message
    (lambda c: c.send(f.DATA, f.END_STREAM, 1, b"\0\0\0\0\x02\xff\xff"), b"13"),  # not protobuf
])
async def test_bad_messages_end_stream_with_status(served, setup, status):
    server, port, handlers = served
    c = await RawClient.connect(port)
    c.open(1)
    setup(c)
    frames = await c.until(is_end(1))
    assert c.headers(frames[-1])[b"grpc-status"] == status
    await asyncio.sleep(0)
    assert not server.tasks  # the handler task was cancelled before it ever ran: not leaked
    c.close()


async def test_http_level_rejections(served):
    _, port, _ = served
    c = await RawClient.connect(port)
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, c.encoder.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", wire.METHOD_PATH), (":authority", "t")]))
    assert c.headers((await c.until(is_end(1)))[-1]) == {b":status": b"405"}
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3, c.block(extra=(("grpc-encoding", "gzip"),)))
    trailers = c.headers((await c.until(is_end(3)))[-1])
    assert trailers[b"grpc-status"] == b"12" and trailers[b"grpc-accept-encoding"] == b"identity"
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 5, c.encoder.encode([(":method", "POST")]))
    rst = (await c.until(lambda fr: fr[0] == f.RST_STREAM))[-1]
    assert rst[2] == 5 and struct.unpack(">L", rst[3])[0] == f.PROTOCOL_ERROR
    c.close()


async def test_concurrent_stream_limit(served):
    _, port, _ = served
    c = await RawClient.connect(port)
    for sid in (1, 3, 5, 7):
        c.open(sid)
    rst = (await c.until(lambda fr: fr[0] == f.RST_STREAM))[-1]
    assert rst[2] == 7 and struct.unpack(">L", rst[3])[0] == f.REFUSED_STREAM
    c.send(f.DATA, f.END_STREAM, 1, b"")  # one finishes: room for a new one
    await c.until(is_end(1))
    c.open(9, end_stream=True)
    await c.until(is_end(9))
    c.close()


async def test_goaway_from_client_closes_when_idle(served):
    server, port, _ = served
    c = await RawClient.connect(port)
    c.open(1)
    c.send(f.GOAWAY, 0, 0, struct.pack(">LL", 0, f.NO_ERROR))
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()))  # open stream completes
    frames = await c.until(is_end(1))
    assert c.headers(frames[-1]) == {b"grpc-status": b"0"}
    assert await c.closed()


async def test_stop_sends_two_goaways_and_drains():
    handlers = Handlers()
    server = h2server.H2GrpcServer(handlers.echo)
    port = await server.listen("127.0.0.1:0")
    c = await RawClient.connect(port)
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    await c.until(lambda fr: fr[0] == f.DATA)
    stopping = asyncio.create_task(server.stop(5))
    frames = await c.until(lambda fr: fr[0] == f.PING)
    assert struct.unpack(">LL", [p for t, _, _, p in frames if t == f.GOAWAY][0][:8]) == (f.MAX_WINDOW, f.NO_ERROR)
    c.open(3)  # crossed the first GOAWAY: still served
    c.send(f.PING, f.ACK, 0, frames[-1][3])
    assert await c.goaway() == (3, f.NO_ERROR)
    c.open(5, end_stream=True)  # after the final GOAWAY: refused
    rst = (await c.until(lambda fr: fr[0] == f.RST_STREAM))[-1]
    assert rst[2] == 5 and struct.unpack(">L", rst[3])[0] == f.REFUSED_STREAM
    for sid in (1, 3):
        c.send(f.DATA, f.END_STREAM, sid, b"")
        await c.until(is_end(sid))
    await asyncio.wait_for(stopping, 5)
    assert await c.closed() and handlers.cancelled == 0


def test_table_neutral_blocks():
    enc = hpack.Encoder()
    indexing = enc.encode([(":method", "POST"), ("x-custom", "v")])
    assert not table_neutral(indexing)
    indexed = enc.encode([(":method", "POST"), ("x-custom", "v")])  # now all indexed
    assert table_neutral(indexed)
    never = enc.encode([hpack.NeverIndexedHeaderTuple("secret", "s" * 200)])
    assert table_neutral(never)
    assert not table_neutral(b"\x3f\xe1\x1f")  # table size update
    assert not table_neutral(b"\x04\x85ab")  # truncated string
    dec = CachingDecoder(65536)
    assert dec.decode(indexing) == [(b":method", b"POST"), (b"x-custom", b"v")]
    assert dec.decode(indexed) == dec.decode(bytes(indexed)) == [(b":method", b"POST"), (b"x-custom", b"v")]
