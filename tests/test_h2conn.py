"""The sans-IO HTTP/2 + gRPC connection core, driven with bytes alone (no socket, no event loop):
frame by frame, including what grpcio's client never sends (CONTINUATION, padding, tiny
windows, protocol errors)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import hpack
import pytest

from extproc import wire
from extproc.transport import frames as f
from extproc.transport import h2conn
from extproc.transport.h2conn import H2Connection
from extproc.transport.hpackcache import CachingDecoder, table_neutral
from extproc.transport.session import Metadata
from tests import ext_proc_msgs as m

Frame = tuple[int, int, int, bytes]


def grpc_message(msg: Any, compressed: bool = False) -> bytes:
    data = msg.SerializeToString()
    return struct.pack(">BL", int(compressed), len(data)) + data


def reply_size(body: bytes) -> int:
    """Wire size (with the 5-byte prefix) of echo's answer to a response body chunk."""
    return 5 + len(wire.replace_response_chunk(body).SerializeToString())


class EchoSession:
    """Answers each message; response bodies are echoed back (so sizes flow both ways)."""

    def __init__(self, owner: Sessions, metadata: Metadata) -> None:
        self.owner, self.metadata = owner, metadata
        self.received = 0
        self.closes = 0

    @property
    def finished(self) -> bool:
        return self.owner.stop_after is not None and self.received >= self.owner.stop_after

    def on_message(self, msg: wire.ProcessingRequest) -> wire.ProcessingResponse | None:
        self.received += 1
        if self.owner.fail:
            raise ValueError("boom 100% \u00e9")
        kind = msg.WhichOneof("request")
        assert kind is not None
        if msg.observability_mode:
            return None
        if kind == wire.RESPONSE_BODY:
            return wire.replace_response_chunk(msg.response_body.body)
        return wire.continue_response(kind)

    def close(self) -> None:
        self.closes += 1
        self.owner.closed_unfinished += not self.finished


class Sessions:
    def __init__(self) -> None:
        self.opened: list[EchoSession] = []
        self.stop_after: int | None = None
        self.fail = False
        self.refuse = False
        self.closed_unfinished = 0

    def __call__(self, metadata: Metadata) -> EchoSession:
        if self.refuse:
            raise RuntimeError("no sessions today")
        s = EchoSession(self, metadata)
        self.opened.append(s)
        return s


class Timers:
    """A fake clock for grpc-timeout: timers fire when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None], list[bool]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Any:
        cancelled = [False]
        self.pending.append((delay, callback, cancelled))

        class _Timer:
            def cancel(self) -> None:
                cancelled[0] = True

        return _Timer()

    def fire_all(self) -> None:
        for _, cb, cancelled in self.pending:
            if not cancelled[0]:
                cb()


def parse_frames(out: bytes) -> list[Frame]:
    frames, pos = [], 0
    while pos < len(out):
        hi, lo, ftype, flags, sid = f.FRAME_HEADER.unpack_from(out, pos)
        n = (hi << 16) | lo
        assert pos + 9 + n <= len(out), "truncated frame"
        frames.append((ftype, flags, sid & 0x7FFFFFFF, bytes(out[pos + 9:pos + 9 + n])))
        pos += 9 + n
    return frames


class Peer:
    """The client side, in bytes: what it sends goes straight into the core, what the core
    queued comes back as frames."""

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.server_settings: dict[int, int] = {}

    @classmethod
    def connect(cls, conn: H2Connection, settings: dict[int, int] | None = None) -> Peer:
        p = cls(conn)
        conn.initiate()
        p.raw(f.PREFACE + f.settings(settings or {}))
        frames = p.frames()
        assert frames[0][0] == f.SETTINGS and not frames[0][1], "server must open with SETTINGS"
        p.server_settings = dict(f.SETTING.iter_unpack(frames[0][3]))
        p.opening = frames
        p.send(f.SETTINGS, f.ACK, 0)
        return p

    def raw(self, data: bytes) -> None:
        self.conn.receive(data)

    def send(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.conn.receive(f.frame(ftype, flags, sid, payload))

    def frames(self) -> list[Frame]:
        return parse_frames(self.conn.data_to_send())

    def block(self, path: str = wire.METHOD_PATH, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        return self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", "t"), ("content-type", "application/grpc"),
                                    ("te", "trailers"), *extra])

    def open(self, sid: int, end_stream: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.send(f.HEADERS, f.END_HEADERS | (f.END_STREAM if end_stream else 0), sid, self.block(extra=extra))

    def headers(self, fr: Frame) -> dict[bytes, bytes]:
        return dict(self.decoder.decode(fr[3], raw=True))

    def goaway(self, frames: list[Frame]) -> tuple[int, int]:
        (payload,) = [p for t, _, _, p in frames if t == f.GOAWAY]
        return struct.unpack(">LL", payload[:8])


def data_payload(frames: list[Frame], sid: int) -> bytes:
    return b"".join(p for t, _, s, p in frames if t == f.DATA and s == sid)


def ends(frames: list[Frame], sid: int) -> list[Frame]:
    return [fr for fr in frames if fr[0] in (f.HEADERS, f.DATA) and fr[2] == sid and fr[1] & f.END_STREAM]


@pytest.fixture
def sessions() -> Sessions:
    return Sessions()


@pytest.fixture
def conn(sessions: Sessions) -> H2Connection:
    return H2Connection(sessions, max_concurrent_streams=3, peer="test")


def test_settings_exchange_and_ping(conn):
    c = Peer.connect(conn)
    assert c.server_settings[f.SETTINGS_MAX_CONCURRENT_STREAMS] == 3
    assert c.server_settings[f.SETTINGS_INITIAL_WINDOW_SIZE] == h2conn.STREAM_WINDOW
    wu = [p for t, _, s, p in c.opening if t == f.WINDOW_UPDATE and s == 0]
    assert wu and struct.unpack(">L", wu[0])[0] == h2conn.CONN_WINDOW - f.DEFAULT_WINDOW
    assert (f.SETTINGS, f.ACK, 0, b"") in c.opening  # the client's SETTINGS acknowledged
    c.send(f.PING, 0, 0, b"12345678")
    assert c.frames() == [(f.PING, f.ACK, 0, b"12345678")]
    c.send(f.PING, f.ACK, 0, b"87654321")  # an ACK is not answered
    c.send(0xFA, 0, 0, b"ext")  # unknown frame type: ignored
    assert c.frames() == []
    c.send(f.PING, 0, 0, b"abcdefgh")
    assert c.frames() == [(f.PING, f.ACK, 0, b"abcdefgh")]
    assert not conn.closed


def test_bytes_cut_anywhere_parse_the_same(conn, sessions):
    """The preface, frame headers and messages split across reads, one byte at a time."""
    conn.initiate()
    c = Peer(conn)
    stream = f.PREFACE + f.settings({}) + f.frame(f.HEADERS, f.END_HEADERS, 1, c.block()) + f.frame(
        f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()) + grpc_message(m.body(b"x", response=True)))
    for i in range(len(stream)):
        conn.receive(stream[i:i + 1])
    frames = c.frames()
    assert [(t, fl & f.END_STREAM) for t, fl, s, _ in frames if s == 1] == [
        (f.HEADERS, 0), (f.DATA, 0), (f.DATA, 0), (f.HEADERS, f.END_STREAM)]
    assert sessions.opened[0].received == 2 and sessions.opened[0].closes == 1


def test_continuation_padding_priority_and_message_framing(conn):
    c = Peer.connect(conn)
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
    frames = c.frames()
    heads = [fr for fr in frames if fr[0] == f.HEADERS]
    assert c.headers(heads[0]) == {b":status": b"200", b"content-type": b"application/grpc"}
    assert c.headers(heads[1]) == {b"grpc-status": b"0"} and heads[1][1] & f.END_STREAM
    data = data_payload(frames, 1)
    bodies = []
    while data:
        n = struct.unpack(">L", data[1:5])[0]
        bodies.append(wire.ProcessingResponse.FromString(data[5:5 + n]).response_body.response.body_mutation.body)
        data = data[5 + n:]
    assert bodies == [b"one", b"two", b"x" * 3000]
    assert not [fr for fr in frames if fr[0] == f.RST_STREAM]  # client had half-closed


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
def test_bad_preface(conn, raw):
    conn.initiate()
    c = Peer(conn)
    c.frames()
    c.raw(raw)
    assert c.goaway(c.frames())[1] == f.PROTOCOL_ERROR
    assert conn.closed


def _bad_hpack(c: Peer) -> None:
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
    (lambda c: (c.send(f.HEADERS, 0, 1, c.block()),
                [c.send(f.CONTINUATION, 0, 1, b"\x82" * 16_000) for _ in range(5)]), f.ENHANCE_YOUR_CALM),
    (_bad_hpack, f.COMPRESSION_ERROR),
])
def test_connection_errors_send_goaway_and_close(conn, sessions, action, code):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)  # an open stream's session is closed with the connection
    action(c)
    frames = c.frames()
    last, got = c.goaway(frames)
    assert got == code and last == 1
    assert conn.closed and not conn.streams
    assert [s.closes for s in sessions.opened] == [1]
    c.send(f.PING, 0, 0, b"12345678")  # after the GOAWAY nothing is read or sent
    assert c.frames() == []


def test_first_frame_must_be_settings(conn):
    conn.initiate()
    c = Peer(conn)
    c.frames()
    c.raw(f.PREFACE + f.ping(b"12345678"))
    assert c.goaway(c.frames())[1] == f.PROTOCOL_ERROR


def test_send_flow_control_stream_window(conn):
    c = Peer.connect(conn, {f.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    c.frames()
    c.open(1)
    body = b"y" * 3000
    c.send(f.DATA, 0, 1, grpc_message(m.body(body, response=True)))
    size = reply_size(body)
    assert len(data_payload(c.frames(), 1)) == 1000  # exactly the window, then nothing
    c.send(f.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1500))
    assert len(data_payload(c.frames(), 1)) == 1500
    c.send(f.DATA, f.END_STREAM, 1, b"")  # trailers must wait behind the blocked data
    assert not [fr for fr in c.frames() if fr[0] == f.HEADERS]
    # raising INITIAL_WINDOW_SIZE applies to open streams too
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_INITIAL_WINDOW_SIZE, 100_000))
    frames = c.frames()
    assert len(data_payload(frames, 1)) == size - 2500
    (end,) = ends(frames, 1)
    assert c.headers(end) == {b"grpc-status": b"0"}
    assert not conn.streams


def test_send_flow_control_connection_window_and_frame_size(conn):
    c = Peer.connect(conn, {f.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    c.frames()
    bodies = {1: b"a" * 50_000, 3: b"b" * 50_000}
    for sid, body in bodies.items():
        c.open(sid)
        msg = grpc_message(m.body(body, response=True))
        for i in range(0, len(msg), f.DEFAULT_MAX_FRAME):
            c.send(f.DATA, 0, sid, msg[i:i + f.DEFAULT_MAX_FRAME])
        c.send(f.DATA, f.END_STREAM, sid, b"")
    frames = c.frames()
    sent = sum(len(p) for t, _, _, p in frames if t == f.DATA)
    assert sent == f.DEFAULT_WINDOW  # the connection window, shared by both streams
    assert max(len(p) for t, _, _, p in frames if t == f.DATA) <= f.DEFAULT_MAX_FRAME
    # a larger MAX_FRAME_SIZE is honoured
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_MAX_FRAME_SIZE, 40_000))
    c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20))
    frames += c.frames()
    assert {s for t, fl, s, _ in frames if t == f.HEADERS and fl & f.END_STREAM} == {1, 3}
    for sid, body in bodies.items():
        assert len(data_payload(frames, sid)) == reply_size(body)
    assert max(len(p) for t, _, _, p in frames if t == f.DATA) > f.DEFAULT_MAX_FRAME


def test_receive_window_credit(conn):
    c = Peer.connect(conn, {f.SETTINGS_INITIAL_WINDOW_SIZE: 8 << 20})
    c.send(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 8 << 20))  # room for the echo
    c.frames()
    c.open(1)
    msg = grpc_message(m.body(b"z" * (3 << 20), response=True))  # one 3 MiB message
    for i in range(0, len(msg), f.DEFAULT_MAX_FRAME):
        c.send(f.DATA, 0, 1, msg[i:i + f.DEFAULT_MAX_FRAME])
    frames = c.frames()
    credited = sum(struct.unpack(">L", p)[0] for t, _, s, p in frames if t == f.WINDOW_UPDATE and s == 1)
    assert credited >= h2conn.STREAM_WINDOW // 4  # credit flowed mid-message
    conn_credit = sum(struct.unpack(">L", p)[0] for t, _, s, p in frames if t == f.WINDOW_UPDATE and s == 0)
    assert conn_credit == 0  # 3 MiB is below a quarter of the connection window
    assert len(data_payload(frames, 1)) == reply_size(b"z" * (3 << 20))
    c.send(f.DATA, f.END_STREAM, 1, b"")
    assert ends(c.frames(), 1)


def test_header_table_size_change_is_acknowledged_in_next_block(conn):
    c = Peer.connect(conn, {f.SETTINGS_HEADER_TABLE_SIZE: 0})
    c.frames()
    c.open(1, end_stream=True)
    (end,) = ends(c.frames(), 1)
    assert end[3][:1] == f.TABLE_SIZE_ZERO  # trailers-only block starts with a size update
    assert c.headers(end)[b"grpc-status"] == b"0"
    c.send(f.SETTINGS, 0, 0, f.SETTING.pack(f.SETTINGS_HEADER_TABLE_SIZE, 100))
    c.open(3, end_stream=True)
    (end,) = ends(c.frames(), 3)
    assert end[3][:1] == f.TABLE_SIZE_ZERO
    c.open(5, end_stream=True)
    (end,) = ends(c.frames(), 5)
    assert end[3][:1] != f.TABLE_SIZE_ZERO


def test_headers_with_end_stream_open_and_close_a_session(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.open(1, end_stream=True, extra=(("x-extproc-role", "request"), ("x-bin", "\u00e9")))
    (end,) = ends(c.frames(), 1)
    assert c.headers(end) == {b":status": b"200", b"content-type": b"application/grpc", b"grpc-status": b"0"}
    (s,) = sessions.opened
    assert ("x-extproc-role", "request") in s.metadata and ("te", "trailers") in s.metadata
    assert not [k for k, _ in s.metadata if k.startswith(":")]
    assert s.closes == 1 and not conn.streams


def test_rst_stream_closes_the_session(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    assert data_payload(c.frames(), 1)
    c.send(f.RST_STREAM, 0, 1, struct.pack(">L", f.CANCEL))
    (s,) = sessions.opened
    assert s.closes == 1 and sessions.closed_unfinished == 1 and not conn.streams
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))  # in flight after the reset: ignored
    c.send(f.WINDOW_UPDATE, 0, 1, struct.pack(">L", 10))
    c.send(f.PING, 0, 0, b"stillok!")
    assert c.frames() == [(f.PING, f.ACK, 0, b"stillok!")]
    assert s.received == 1 and s.closes == 1


def test_session_finished_before_half_close(conn, sessions):
    sessions.stop_after = 1
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()) + grpc_message(m.request_headers()))
    frames = c.frames()
    kinds = [(t, fl & f.END_STREAM) for t, fl, s, _ in frames if s == 1]
    assert kinds == [(f.HEADERS, 0), (f.DATA, 0), (f.HEADERS, f.END_STREAM), (f.RST_STREAM, 0)]
    assert struct.unpack(">L", frames[-1][3])[0] == f.NO_ERROR
    assert sessions.opened[0].received == 1  # the second message, after the end, is not delivered
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()))  # crossed in flight: ignored
    c.send(f.PING, 0, 0, b"stillok!")
    assert c.frames() == [(f.PING, f.ACK, 0, b"stillok!")]
    assert sessions.closed_unfinished == 0 and sessions.opened[0].closes == 1


def test_observability_mode_answers_nothing(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    msg = m.request_headers()
    msg.observability_mode = True
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(msg))
    frames = c.frames()
    assert not data_payload(frames, 1)
    (end,) = ends(frames, 1)
    assert c.headers(end)[b"grpc-status"] == b"0"


def test_client_trailers_end_the_request_stream(conn):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, c.encoder.encode([("x-trailer", "1")]))
    (end,) = ends(c.frames(), 1)
    assert c.headers(end) == {b"grpc-status": b"0"}


@pytest.mark.parametrize("payload,status", [
    (grpc_message(m.request_headers(), compressed=True), b"12"),
    (b"\0\0\0\0\x05\x01", b"13"),  # stream ends mid-message
    (b"\0\0\0\0\x02\xff\xff", b"13"),  # not protobuf
    (struct.pack(">BL", 0, h2conn.MAX_MESSAGE + 1), b"8"),
])
def test_bad_messages_end_stream_with_status(conn, sessions, payload, status):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, f.END_STREAM, 1, payload)
    (end,) = ends(c.frames(), 1)
    assert c.headers(end)[b"grpc-status"] == status
    assert [s.closes for s in sessions.opened] == [1] and not conn.streams


def test_session_exception_is_unknown_with_message(conn, sessions):
    sessions.fail = True
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    frames = c.frames()
    (end,) = ends(frames, 1)
    trailers = c.headers(end)
    assert trailers[b"grpc-status"] == b"2"
    assert trailers[b"grpc-message"] == b"Unexpected ValueError: boom 100%25 %C3%A9"  # percent-encoded
    assert [fr[0] for fr in frames if fr[2] == 1][-1] == f.RST_STREAM  # the client was still sending
    assert sessions.opened[0].closes == 1 and not conn.closed


def test_session_factory_exception_is_unknown(conn, sessions):
    sessions.refuse = True
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    (end,) = ends(c.frames(), 1)
    assert c.headers(end)[b"grpc-status"] == b"2" and not conn.streams and not conn.closed


def test_deadline_ends_the_stream():
    sessions, timers = Sessions(), Timers()
    conn = H2Connection(sessions, schedule=timers)
    c = Peer.connect(conn)
    c.frames()
    c.open(1, extra=(("grpc-timeout", "300m"),))
    c.open(3, extra=(("grpc-timeout", "bogus"),))  # malformed: ignored, like grpcio
    c.open(5, extra=(("grpc-timeout", "2S"),))
    c.send(f.DATA, f.END_STREAM, 5, grpc_message(m.request_headers()))  # ends in time: timer cancelled
    assert [d for d, _, _ in timers.pending] == [0.3, 2.0]
    c.frames()
    timers.fire_all()
    frames = c.frames()
    (end,) = ends(frames, 1)
    assert c.headers(end)[b"grpc-status"] == b"4"
    assert not ends(frames, 5) and list(conn.streams) == [3]
    assert [s.closes for s in sessions.opened] == [1, 0, 1]


def test_http_level_rejections(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, c.encoder.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", wire.METHOD_PATH), (":authority", "t")]))
    assert c.headers(ends(c.frames(), 1)[0]) == {b":status": b"405"}
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3, c.encoder.encode(
        [(":method", "POST"), (":scheme", "http"), (":path", wire.METHOD_PATH), ("content-type", "text/plain")]))
    assert c.headers(ends(c.frames(), 3)[0]) == {b":status": b"415"}
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 5, c.block(extra=(("grpc-encoding", "gzip"),)))
    trailers = c.headers(ends(c.frames(), 5)[0])
    assert trailers[b"grpc-status"] == b"12" and trailers[b"grpc-accept-encoding"] == b"identity"
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 7, c.block(path="/other.Service/Method"))
    trailers = c.headers(ends(c.frames(), 7)[0])
    assert trailers[b"grpc-status"] == b"12" and trailers[b"grpc-message"] == b"Method not found: /other.Service/Method"
    c.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 9, c.encoder.encode([(":method", "POST")]))
    assert c.frames() == [(f.RST_STREAM, 0, 9, struct.pack(">L", f.PROTOCOL_ERROR))]
    assert not sessions.opened and not conn.streams and not conn.closed


def test_concurrent_stream_limit(conn):
    c = Peer.connect(conn)
    c.frames()
    for sid in (1, 3, 5, 7):
        c.open(sid)
    assert c.frames() == [(f.RST_STREAM, 0, 7, struct.pack(">L", f.REFUSED_STREAM))]
    c.send(f.DATA, f.END_STREAM, 1, b"")  # one finishes: room for a new one
    assert ends(c.frames(), 1)
    c.open(9, end_stream=True)
    assert ends(c.frames(), 9)


def test_goaway_from_client_closes_when_idle(conn):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.GOAWAY, 0, 0, struct.pack(">LL", 0, f.NO_ERROR))
    assert not conn.closed  # stream 1 is still open
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()))  # open stream completes
    (end,) = ends(c.frames(), 1)
    assert c.headers(end) == {b"grpc-status": b"0"}
    assert conn.closed


def test_drain_sends_two_goaways(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    c.frames()
    conn.start_drain()
    conn.start_drain()  # once only
    frames = c.frames()
    assert c.goaway(frames) == (f.MAX_WINDOW, f.NO_ERROR)
    (ping,) = [p for t, _, _, p in frames if t == f.PING]
    c.open(3)  # crossed the first GOAWAY: still served
    c.send(f.PING, f.ACK, 0, ping)
    assert c.goaway(c.frames()) == (3, f.NO_ERROR)
    c.open(5, end_stream=True)  # after the final GOAWAY: refused
    assert c.frames() == [(f.RST_STREAM, 0, 5, struct.pack(">L", f.REFUSED_STREAM))]
    for sid in (1, 3):
        c.send(f.DATA, f.END_STREAM, sid, b"")
        assert ends(c.frames(), sid)
    assert conn.closed and sessions.closed_unfinished == 2  # echo sessions never "finish" by themselves
    assert [s.closes for s in sessions.opened] == [1, 1]


def test_final_goaway_then_cancel_streams(conn, sessions):
    c = Peer.connect(conn)
    c.frames()
    c.open(1)
    c.open(3)
    conn.final_goaway()
    assert c.goaway(c.frames()) == (3, f.NO_ERROR) and not conn.closed
    conn.cancel_streams()
    assert c.frames() == [(f.RST_STREAM, 0, sid, struct.pack(">L", f.CANCEL)) for sid in (1, 3)]
    assert conn.closed and [s.closes for s in sessions.opened] == [1, 1]


def test_connection_lost_closes_every_session_once(conn, sessions):
    c = Peer.connect(conn)
    c.open(1)
    c.open(3)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    conn.connection_lost()
    assert conn.closed and not conn.streams and c.frames() == []
    assert [s.closes for s in sessions.opened] == [1, 1]
    conn.connection_lost()
    c.send(f.PING, 0, 0, b"12345678")
    assert c.frames() == [] and [s.closes for s in sessions.opened] == [1, 1]


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


class LaterAnswer:
    """A Deferred the test resolves by hand (what an asyncio future is to the core)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], object]] = []
        self.value: wire.ProcessingResponse | None = None
        self.error: BaseException | None = None

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        self.callbacks.append(fn)

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self.error

    def result(self) -> wire.ProcessingResponse | None:
        return self.value

    def resolve(self, value: wire.ProcessingResponse | None = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        for fn in self.callbacks:
            fn(self)


class DeferringSessions(Sessions):
    """The first message of every stream is answered later (a budget check against Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.later: list[LaterAnswer] = []
        self.order: list[str] = []

    def __call__(self, metadata: Metadata) -> EchoSession:
        owner = self
        session = super().__call__(metadata)
        plain = session.on_message

        def on_message(msg: wire.ProcessingRequest) -> Any:
            kind = msg.WhichOneof("request")
            assert kind is not None
            owner.order.append(kind)
            if kind == wire.REQUEST_HEADERS:
                session.received += 1
                later = LaterAnswer()
                owner.later.append(later)
                return later
            return plain(msg)

        session.on_message = on_message  # type: ignore[method-assign]
        return session


def _messages(frames: list[Frame], sid: int) -> list[wire.ProcessingResponse]:
    data, out = data_payload(frames, sid), []
    while data:
        n = struct.unpack(">L", data[1:5])[0]
        out.append(wire.ProcessingResponse.FromString(data[5:5 + n]))
        data = data[5 + n:]
    return out


def test_a_deferred_answer_holds_the_streams_later_messages_in_order():
    sessions = DeferringSessions()
    woken: list[int] = []
    conn = H2Connection(sessions, peer="test", on_output=lambda: woken.append(1))
    c = Peer.connect(conn)
    c.open(1)
    # the request headers (deferred), then a body and the end of the stream in the same read
    c.send(f.DATA, f.END_STREAM, 1, grpc_message(m.request_headers()) + grpc_message(m.body(b"abc", response=True)))
    assert sessions.order == [wire.REQUEST_HEADERS]  # the body waits behind the answer
    assert data_payload(c.frames(), 1) == b"" and not ends(c.frames(), 1)
    sessions.later[0].resolve(wire.continue_response(wire.REQUEST_HEADERS))
    assert woken == [1]  # the I/O side is told to write outside receive()
    frames = c.frames()
    answers = _messages(frames, 1)
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "response_body"]
    assert sessions.order == [wire.REQUEST_HEADERS, wire.RESPONSE_BODY]
    assert ends(frames, 1) and sessions.opened[0].closes == 1  # the stream ends once both are out


def test_a_deferred_answer_that_fails_ends_only_its_stream():
    sessions = DeferringSessions()
    conn = H2Connection(sessions, peer="test")
    c = Peer.connect(conn)
    c.open(1)
    c.send(f.DATA, 0, 1, grpc_message(m.request_headers()))
    sessions.later[0].resolve(error=RuntimeError("ledger gone"))
    frames = c.frames()
    (trailers,) = [fr for fr in frames if fr[0] == f.HEADERS and fr[2] == 1 and fr[1] & f.END_STREAM]
    assert c.headers(trailers)[b"grpc-status"] == b"2"  # UNKNOWN
    assert sessions.opened[0].closes == 1 and not conn.closed
