"""The h2 connection core under arbitrary input: random frame sequences (valid, malformed and out
of order), cut at random points, fed as bytes to a connection serving the real ext_proc
service. Whatever arrives, nothing escapes receive(), what we send is well-formed HTTP/2,
nothing is sent once the connection is closed, and when the connection ends every stream is
closed and every session closed exactly once."""

from __future__ import annotations

import struct

import hpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import wire
from extproc.config import AttributionSettings
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from extproc.transport import frames as f
from extproc.transport.h2conn import H2Connection
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink


def _block(*pairs: tuple[str, str]) -> bytes:
    # never-indexed literals: each block decodes the same whatever came before it
    return hpack.Encoder().encode([(k, v, True) for k, v in pairs])


REQUEST = ((":method", "POST"), (":scheme", "http"), (":path", wire.METHOD_PATH), (":authority", "t"),
           ("content-type", "application/grpc"), ("te", "trailers"))
BLOCKS = [
    _block(*REQUEST),
    _block(*REQUEST, ("x-extproc-role", "request")),
    _block(*REQUEST, ("x-extproc-role", "response")),
    _block(*REQUEST[:2], (":path", "/other.Service/Method"), *REQUEST[3:]),
    _block(*REQUEST[:4], ("content-type", "text/plain")),
    _block(("grpc-status", "0")),
    b"\xff\xff\xff",  # not HPACK
]
CHAT = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = [
    m.request_headers(x_team="fuzz"), m.body(CHAT, eos=True), m.body(CHAT[:9]),
    m.body(b"data: {\"choices\":[]}\n\n", response=True, code=200), m.body(b"", response=True, eos=True),
    m.response_headers(), m.headers({":status": "abc"}, response=True),
]


def _grpc(payload: bytes, compressed: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">BL", compressed, len(payload) if length is None else length) + payload


GRPC_PAYLOADS = st.one_of(
    st.sampled_from([_grpc(x.SerializeToString()) for x in MESSAGES]),
    st.builds(lambda b, c: _grpc(b, c), st.binary(max_size=40), st.integers(0, 2)),
    st.builds(lambda n: _grpc(b"\x00", length=n), st.integers(0, 2**32 - 1)),
    st.binary(max_size=12),
)
SIDS = st.sampled_from([0, 1, 1, 3, 3, 5, 2, 0x7FFFFFFF])
FRAMES = st.one_of(
    st.tuples(st.just(f.HEADERS), st.sampled_from([f.END_HEADERS, f.END_HEADERS | f.END_STREAM, 0,
                                                   f.PADDED | f.END_HEADERS]), SIDS, st.sampled_from(BLOCKS)),
    st.tuples(st.just(f.DATA), st.sampled_from([0, f.END_STREAM, f.PADDED]), SIDS, GRPC_PAYLOADS),
    st.tuples(st.just(f.CONTINUATION), st.sampled_from([0, f.END_HEADERS]), SIDS,
              st.one_of(st.sampled_from(BLOCKS), st.binary(max_size=20))),
    st.tuples(st.sampled_from([f.WINDOW_UPDATE, f.RST_STREAM, f.PING, f.SETTINGS, f.GOAWAY, f.PRIORITY,
                               f.PUSH_PROMISE, 0xFA]),
              st.integers(0, 255), SIDS, st.binary(max_size=16)),
    st.tuples(st.just(f.WINDOW_UPDATE), st.just(0), SIDS,
              st.builds(lambda n: struct.pack(">L", n), st.integers(0, 2**32 - 1))),
    st.tuples(st.just(f.SETTINGS), st.just(0), st.just(0),
              st.builds(lambda kvs: b"".join(struct.pack(">HL", k, v) for k, v in kvs),
                        st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=3))),
)


def _parse_frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while pos < len(out):
        assert len(out) - pos >= 9, "truncated frame header"
        hi, lo, ftype, flags, sid = f.FRAME_HEADER.unpack_from(out, pos)
        n = (hi << 16) | lo
        assert n <= f.DEFAULT_MAX_FRAME and pos + 9 + n <= len(out), "frame too large or truncated"
        frames.append((ftype, flags, sid, bytes(out[pos + 9:pos + 9 + n])))
        pos += 9 + n
    return frames


class CountingService(ExtProcService):
    """The real service, counting session closes per session."""

    closes: dict[int, int]

    def open_stream(self, metadata=()):  # noqa: ANN001, ANN201
        session = super().open_stream(metadata)
        real = session.close
        key = id(session)
        self.closes[key] = 0

        def close() -> None:
            self.closes[key] += 1
            real()

        return _Counted(session, close)


class _Counted:
    def __init__(self, session, close) -> None:  # noqa: ANN001
        self._s, self.close = session, close

    @property
    def finished(self) -> bool:
        return self._s.finished

    def on_message(self, msg):  # noqa: ANN001, ANN201
        return self._s.on_message(msg)


def _drive(preface: bool, frames: list, cuts: list[int]) -> tuple[SidecarStats, list]:
    stats = SidecarStats()
    service = CountingService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                              [RecordingSink()], stats)
    service.closes = {}
    conn = H2Connection(service.open_stream, max_concurrent_streams=4)
    conn.initiate()
    written = conn.data_to_send()
    data = (f.PREFACE + f.settings({}) if preface else b"") + b"".join(
        f.frame(t, fl, sid, p[:f.DEFAULT_MAX_FRAME]) for t, fl, sid, p in frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        was_closed = conn.closed
        conn.receive(data[a:b])
        out = conn.data_to_send()
        assert not (was_closed and out), "sent after the connection was closed"
        written += out
    conn.connection_lost()
    assert conn.data_to_send() == b""
    assert conn.closed and not conn.streams
    assert stats.streams_opened == stats.streams_closed
    assert all(n == 1 for n in service.closes.values()), service.closes
    assert stats.events_emitted <= stats.streams_opened
    sent = _parse_frames(written)
    assert sent and sent[0][0] == f.SETTINGS and not sent[0][1] & f.ACK
    goaways = [struct.unpack(">LL", p[:8]) for t, _, _, p in sent if t == f.GOAWAY]
    for _, code in goaways:
        assert code in (f.NO_ERROR, f.PROTOCOL_ERROR, f.FRAME_SIZE_ERROR, f.FLOW_CONTROL_ERROR,
                        f.COMPRESSION_ERROR, f.STREAM_CLOSED, f.INTERNAL_ERROR, f.ENHANCE_YOUR_CALM)
    return stats, sent


def test_the_harness_serves_a_well_formed_exchange():
    """The fuzz test's harness is not vacuous: a well-formed stream, cut into 1-byte pieces,
    is answered and metered."""
    stream = b"".join(_grpc(x.SerializeToString()) for x in (
        m.request_headers(x_team="fuzz"), m.body(CHAT, eos=True),
        m.body(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n', response=True,
               code=200),
        m.body(b"data: [DONE]\n\n", response=True, eos=True)))
    frames = [(f.HEADERS, f.END_HEADERS, 1, BLOCKS[0]), (f.DATA, f.END_STREAM, 1, stream)]
    stats, sent = _drive(True, frames, list(range(0, 2000, 1)))
    assert stats.streams_opened == 1 and stats.events_emitted == 1
    answers = b"".join(p for t, _, sid, p in sent if t == f.DATA and sid == 1)
    assert answers.count(b"\x00\x00\x00") >= 4  # four length-prefixed answers
    decoder = hpack.Decoder()
    heads = [(fl, dict(decoder.decode(p))) for t, fl, sid, p in sent if t == f.HEADERS and sid == 1]
    assert [h.get(":status") for _, h in heads] == ["200", None]
    assert heads[-1][0] & f.END_STREAM and heads[-1][1]["grpc-status"] == "0"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preface=st.booleans() | st.just(True), frames=st.lists(FRAMES, max_size=25),
       cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_arbitrary_frames_never_escape_and_leave_nothing_open(preface, frames, cuts):
    _drive(preface, frames, cuts)
