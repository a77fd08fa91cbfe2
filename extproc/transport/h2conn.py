"""A sans-IO HTTP/2 + gRPC server connection: bytes in, bytes out, sessions called in between.

No socket, no event loop: `receive(data)` parses frames, runs each complete request message
through its stream's session (extproc.transport.session) and queues the frames to send;
`data_to_send()` hands them over; `closed` says the socket should be closed once they are
written. Flow control (both directions), HPACK, CONTINUATION, RST_STREAM, GOAWAY and the
two-step graceful shutdown all live here, so all of it is tested with bytes alone
(tests/test_h2conn.py). The asyncio glue (h2server.py) only moves bytes and runs timers.

Why not the h2 library (grpclib) or grpcio: both cost several times the CPU of this core per
stream (README, Performance); this serves exactly what Envoy's ext_proc filter speaks:
prior-knowledge cleartext HTTP/2, one method, identity encoding, and uses `hpack` for header
blocks only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from hpack import HPACKError

from extproc._pb.ext_proc_wire_pb2 import ProcessingRequest, ProcessingResponse
from extproc.transport import frames as f
from extproc.transport import grpcproto as g
from extproc.transport.hpackcache import CachingDecoder, Headers
from extproc.transport.session import Deferred, Metadata, SessionFactory
from extproc.transport.stream import STREAM_WINDOW, Stream
from extproc.transport.timers import Schedule

log = logging.getLogger(__name__)

METHOD_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# Receive window per connection (per stream: STREAM_WINDOW): large, so Envoy never waits for a
# WINDOW_UPDATE; credit goes back in quarters.
CONN_WINDOW = 16 << 20
MAX_CONCURRENT_STREAMS = 10_000
MAX_MESSAGE = 64 << 20  # as the grpcio server is configured
MAX_HEADER_BLOCK = 64 << 10
DRAIN_PING = b"drain\x00\x00\x00"

# protobuf parses any bytes-like object (a partial message is reassembled in a bytearray)
_parse = cast(Callable[[bytes | bytearray], ProcessingRequest], ProcessingRequest.FromString)
_serialize = ProcessingResponse.SerializeToString


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: int, debug: str = "") -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


class H2Connection:
    """The server side of one HTTP/2 connection serving one gRPC bidi-streaming method."""

    def __init__(self, sessions: SessionFactory, *, peer: str = "",
                 max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
                 schedule: Schedule | None = None, method_path: bytes = METHOD_PATH,
                 on_output: Callable[[], None] | None = None) -> None:
        self.sessions = sessions
        # Called when output was queued outside receive() (a deferred answer came in).
        self.on_output: Callable[[], None] = on_output or (lambda: None)
        self.peer = peer
        self.max_concurrent_streams = max_concurrent_streams
        self.schedule = schedule  # None: grpc-timeout is ignored
        self.method_path = method_path
        self.streams: dict[int, Stream] = {}
        self.buf = b""
        self.preface_ok = False
        self.got_settings = False
        self.closed = False  # nothing more is read or queued; the socket should close
        self.last_stream_id = 0
        self.decoder = CachingDecoder(MAX_HEADER_BLOCK)
        # CONTINUATION reassembly
        self.hdr_stream_id = 0
        self.hdr_flags = 0
        self.hdr_parts: list[bytes] = []
        self.hdr_size = 0
        # send side
        self.out: list[bytes] = []
        self.send_window = f.DEFAULT_WINDOW
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.table_update = True  # prefix our next header block with a table size update
        self.blocked: dict[int, Stream] = {}
        # receive side
        self.recv_window = CONN_WINDOW
        self.credit_owed = 0
        # shutdown
        self.draining = False  # first GOAWAY sent, still accepting streams
        self.accepting = True  # false after the final GOAWAY
        self.goaway_received = False

    # --- the interface to the I/O side ------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server's connection preface (SETTINGS) and the connection window."""
        self.out.append(f.settings({
            f.SETTINGS_MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
            f.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            f.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }) + f.window_update(0, CONN_WINDOW - f.DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one write."""
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def connection_lost(self) -> None:
        """The socket is gone: every open stream ends (its session closes), nothing is sent."""
        self.closed = True
        self.out.clear()
        for s in list(self.streams.values()):
            self._close_stream(s)

    def close(self) -> None:
        """Stop reading; what is queued is still to be written, then the socket closes."""
        self.closed = True

    def start_drain(self) -> None:
        """GOAWAY(max id) + PING: streams in flight are still accepted; the final GOAWAY, with the
        real last stream id, follows the PING's ACK (RFC 9113 6.8)."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.out.append(f.goaway(f.MAX_WINDOW, f.NO_ERROR) + f.ping(DRAIN_PING))

    def final_goaway(self) -> None:
        if not self.accepting or self.closed:
            return
        self.accepting = False
        self.out.append(f.goaway(self.last_stream_id, f.NO_ERROR))
        if not self.streams:
            self.close()

    def cancel_streams(self) -> None:
        """RST_STREAM(CANCEL) on every open stream (server stop after the grace period)."""
        for s in list(self.streams.values()):
            self.reset_stream(s, f.CANCEL)

    def receive(self, data: bytes) -> None:
        """Process bytes read from the socket. Never raises for anything the peer sends."""
        if self.closed:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        try:
            if not self.preface_ok:
                if n < 24:
                    if not f.PREFACE.startswith(data):
                        raise H2ConnectionError(f.PROTOCOL_ERROR, "bad connection preface")
                    self.buf = data
                    return
                if data[:24] != f.PREFACE:
                    raise H2ConnectionError(f.PROTOCOL_ERROR, "bad connection preface")
                self.preface_ok = True
                pos = 24
            unpack = f.FRAME_HEADER.unpack_from
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(data, pos)
                length = (hi << 16) | lo
                if length > f.DEFAULT_MAX_FRAME:
                    raise H2ConnectionError(f.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                end = pos + 9 + length
                if end > n:
                    break
                payload = data[pos + 9:end]
                pos = end
                sid &= 0x7FFFFFFF
                if self.hdr_stream_id and ftype != f.CONTINUATION:
                    raise H2ConnectionError(f.PROTOCOL_ERROR, "expected CONTINUATION")
                if not self.got_settings and ftype != f.SETTINGS:
                    raise H2ConnectionError(f.PROTOCOL_ERROR, "first frame must be SETTINGS")
                if ftype == f.DATA:
                    self._on_data(flags, sid, payload)
                elif ftype == f.HEADERS:
                    self._on_headers(flags, sid, payload)
                elif ftype == f.WINDOW_UPDATE:
                    self._on_window_update(sid, payload)
                elif ftype == f.SETTINGS:
                    self._on_settings(flags, sid, payload)
                elif ftype == f.PING:
                    self._on_ping(flags, sid, payload)
                elif ftype == f.RST_STREAM:
                    self._on_rst_stream(sid, payload)
                elif ftype == f.CONTINUATION:
                    self._on_continuation(flags, sid, payload)
                elif ftype == f.GOAWAY:
                    self._on_goaway(sid, payload)
                elif ftype == f.PRIORITY:
                    self._on_priority(sid, payload)
                elif ftype == f.PUSH_PROMISE:
                    raise H2ConnectionError(f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # other types are extensions: ignored (RFC 9113 5.5)
                if self.closed:
                    return
            if pos < n:
                self.buf = data[pos:]
            if self.credit_owed >= CONN_WINDOW // 4:
                self.out.append(f.window_update(0, self.credit_owed))
                self.recv_window += self.credit_owed
                self.credit_owed = 0
        except H2ConnectionError as exc:
            self._connection_error(exc.code, exc.debug)

    # --- output -----------------------------------------------------------------------------

    def _headers_frame(self, stream_id: int, block: bytes, flags: int) -> bytes:
        if self.table_update:
            self.table_update = False
            block = f.TABLE_SIZE_ZERO + block
        return f.frame(f.HEADERS, f.END_HEADERS | flags, stream_id, block)

    def send_message(self, s: Stream, data: bytes) -> None:
        """One serialized response message on `s`, as far as the flow-control windows allow."""
        if not s.headers_sent:
            s.headers_sent = True
            self.out.append(self._headers_frame(s.id, f.GRPC_RESPONSE_HEADERS, 0))
        n = len(data) + 5
        if s.pending is None and n <= s.send_window and n <= self.send_window and n <= self.peer_max_frame:
            s.send_window -= n
            self.send_window -= n
            self.out.append(f.DATA_MESSAGE_HEADER.pack(n >> 16, n & 0xFFFF, f.DATA, 0, s.id, 0, n - 5))
            self.out.append(data)
            return
        framed = f.U32.pack(n - 5)
        if s.pending is None:
            s.pending = bytearray(b"\x00" + framed + data)
        else:
            s.pending += b"\x00" + framed + data
        self._drain_stream(s)

    def _drain_stream(self, s: Stream) -> None:
        """Send as much of s.pending as both windows and the peer's frame size allow."""
        buf = s.pending
        assert buf is not None
        while buf and s.send_window > 0 and self.send_window > 0:
            k = min(len(buf), s.send_window, self.send_window, self.peer_max_frame)
            self.out.append(f.frame(f.DATA, 0, s.id, bytes(buf[:k])))
            del buf[:k]
            s.send_window -= k
            self.send_window -= k
        self.blocked.pop(s.id, None)
        if buf:
            self.blocked[s.id] = s  # to the back: round robin between blocked streams
            return
        s.pending = None
        if s.pending_trailers is not None:
            block, s.pending_trailers = s.pending_trailers, None
            self._send_trailers(s, block)

    def _drain_blocked(self) -> None:
        for s in list(self.blocked.values()):
            if self.send_window <= 0:
                break
            if s.send_window > 0:
                self._drain_stream(s)

    def finish(self, s: Stream, code: int, message: str = "",
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """End the stream with a gRPC status (trailers-only if nothing was sent yet)."""
        if s.closed or s.pending_trailers is not None:
            return
        block = g.trailers_block(code, message, extra)
        if not s.headers_sent:
            s.headers_sent = True
            block = f.GRPC_RESPONSE_HEADERS + block
        if s.pending is not None:
            s.pending_trailers = block  # after the queued DATA
        else:
            self._send_trailers(s, block)

    def _send_trailers(self, s: Stream, block: bytes) -> None:
        self.out.append(self._headers_frame(s.id, block, f.END_STREAM))
        if not s.remote_closed:
            # The client may still be sending: tell it to stop, as grpc-core does.
            self.out.append(f.rst_stream(s.id, f.NO_ERROR))
        self._close_stream(s)

    def _http_reject(self, s: Stream, status: int) -> None:
        s.headers_sent = True
        self._send_trailers(s, f.status(status))

    def reset_stream(self, s: Stream, code: int) -> None:
        if not s.closed:
            self.out.append(f.rst_stream(s.id, code))
        self._close_stream(s)

    def fail_stream(self, s: Stream, code: int, message: str) -> None:
        """A receive-side error on one stream: status to the client, session closed."""
        self.finish(s, code, message)
        if s.pending_trailers is not None:  # stuck behind flow control: do not wait for them
            self.reset_stream(s, f.CANCEL)

    def _close_stream(self, s: Stream) -> None:
        if s.closed:
            return
        s.closed = True
        session, s.session = s.session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                log.exception("closing ext_proc session on stream %d", s.id)
        del self.streams[s.id]
        self.blocked.pop(s.id, None)
        s.pending = None
        if s.deadline is not None:
            s.deadline.cancel()
            s.deadline = None
        if not self.streams and (self.goaway_received or not self.accepting):
            self.close()

    def _connection_error(self, code: int, debug: str) -> None:
        if self.closed:
            return
        log.debug("h2 connection error %d from %s: %s", code, self.peer, debug)
        self.out.append(f.goaway(self.last_stream_id, code, debug.encode()[:256]))
        self.close()
        for s in list(self.streams.values()):
            self._close_stream(s)

    # --- input ------------------------------------------------------------------------------

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise H2ConnectionError(f.FLOW_CONTROL_ERROR, "connection window exceeded")
        self.credit_owed += size
        if sid == 0:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "DATA on stream 0")
        if flags & f.PADDED:
            payload = _strip_padding(payload)
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise H2ConnectionError(f.PROTOCOL_ERROR, "DATA on idle stream")
            return  # a stream we closed: in-flight data is dropped (the connection is credited)
        if s.remote_closed:
            self.reset_stream(s, f.STREAM_CLOSED)
            return
        s.recv_window -= size
        if s.recv_window < 0:
            self.reset_stream(s, f.FLOW_CONTROL_ERROR)
            return
        s.credit_owed += size
        if payload:
            self._on_stream_bytes(s, payload)
        if flags & f.END_STREAM and not s.closed:
            self._remote_end(s)
        elif s.credit_owed >= STREAM_WINDOW // 4 and not s.closed:
            self.out.append(f.window_update(s.id, s.credit_owed))
            s.recv_window += s.credit_owed
            s.credit_owed = 0

    def _on_stream_bytes(self, s: Stream, payload: bytes) -> None:
        """Split gRPC length-prefixed messages (several per frame, or one over many frames) and
        run each through the session."""
        buf = s.buf
        if buf is not None:
            buf += payload
            data: bytes | bytearray = buf
        else:
            data = payload
        n = len(data)
        pos = 0
        while n - pos >= 5:
            compressed = data[pos]
            mlen = f.U32.unpack_from(data, pos + 1)[0]
            if compressed:
                self.fail_stream(s, g.UNIMPLEMENTED, "compressed messages are not supported (identity only)")
                return
            if mlen > MAX_MESSAGE:
                self.fail_stream(s, g.RESOURCE_EXHAUSTED, f"message of {mlen} bytes exceeds {MAX_MESSAGE}")
                return
            end = pos + 5 + mlen
            if end > n:
                break
            try:
                msg = _parse(data[pos + 5:end])
            except Exception as exc:
                self.fail_stream(s, g.INTERNAL, f"cannot parse request message: {exc}")
                return
            pos = end
            if not self._deliver(s, msg):
                return
        if pos == n:
            s.buf = None
        elif buf is None:
            s.buf = bytearray(data[pos:])
        elif pos:
            del buf[:pos]

    def _deliver(self, s: Stream, msg: ProcessingRequest) -> bool:
        """The session's answer, queued in this same receive(). False: the stream is over."""
        session = s.session
        assert session is not None
        if s.deferred is not None:  # an earlier answer is still coming: keep the order
            s.held.append(msg)
            return True
        try:
            resp = session.on_message(msg)
        except Exception as exc:
            log.exception("ext_proc session failed on stream %d", s.id)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return False
        if s.closed:
            return False
        if resp is not None and not isinstance(resp, ProcessingResponse):
            s.deferred = resp

            def done(fut: Deferred, s: Stream = s) -> None:
                self._deferred_done(s, fut)

            resp.add_done_callback(done)
            return True
        return self._answered(s, resp)

    def _answered(self, s: Stream, resp: ProcessingResponse | None) -> bool:
        if resp is not None:
            self.send_message(s, _serialize(resp))
        assert s.session is not None
        if s.session.finished:
            self.finish(s, g.OK)
            return False
        return True

    def _deferred_done(self, s: Stream, fut: Deferred) -> None:
        """A deferred answer is ready (outside receive()): send it, then what waited behind it;
        `on_output` tells the I/O side there is something to write."""
        s.deferred = None
        if not (s.closed or self.closed or fut.cancelled()):
            self._resume(s, fut)
        self.on_output()

    def _resume(self, s: Stream, fut: Deferred) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("ext_proc session's deferred answer failed on stream %d: %r", s.id, exc)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return
        if not self._answered(s, fut.result()):
            return
        while s.held and s.deferred is None:
            if not self._deliver(s, s.held.popleft()):
                return
        if s.remote_closed and not s.held and s.deferred is None and not s.closed:
            self.finish(s, g.OK)

    def _remote_end(self, s: Stream) -> None:
        s.remote_closed = True
        if s.buf:
            self.fail_stream(s, g.INTERNAL, "stream ended inside a message")
            return
        if s.deferred is not None or s.held:
            return  # the deferred answer, then what waits behind it, go first
        self.finish(s, g.OK)  # the client is done sending; the session closes with it

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & f.PADDED:
            payload = _strip_padding(payload)
        if flags & f.PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2ConnectionError(f.FRAME_SIZE_ERROR, "short PRIORITY fields")
            payload = payload[5:]  # dependency and weight: we do not schedule by priority
        if flags & f.END_HEADERS:
            self._on_header_block(flags, sid, payload)
        else:
            self.hdr_stream_id, self.hdr_flags = sid, flags
            self.hdr_parts, self.hdr_size = [payload], len(payload)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self.hdr_stream_id or sid != self.hdr_stream_id:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self.hdr_parts.append(payload)
        self.hdr_size += len(payload)
        if self.hdr_size > MAX_HEADER_BLOCK:
            raise H2ConnectionError(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            block = b"".join(self.hdr_parts)
            self.hdr_stream_id, self.hdr_parts = 0, []
            self._on_header_block(self.hdr_flags, sid, block)

    def _decode(self, block: bytes) -> Headers:
        try:
            return self.decoder.decode(block)
        except HPACKError as exc:
            raise H2ConnectionError(f.COMPRESSION_ERROR, f"header block: {exc}") from None

    def _on_header_block(self, flags: int, sid: int, block: bytes) -> None:
        # Decode every block, even for streams we refuse: HPACK state is per connection.
        headers = self._decode(block)
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client: must end the stream
            if s.remote_closed:
                self.reset_stream(s, f.STREAM_CLOSED)
            elif not flags & f.END_STREAM:
                self.reset_stream(s, f.PROTOCOL_ERROR)
            else:
                self._remote_end(s)
            return
        if sid <= self.last_stream_id:
            return  # a stream we already closed; its trailers may have been in flight
        if not sid & 1:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "even stream id from a client")
        self.last_stream_id = sid
        if not self.accepting or len(self.streams) >= self.max_concurrent_streams:
            self.out.append(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        self._open_stream(sid, headers, bool(flags & f.END_STREAM))

    def _open_stream(self, sid: int, headers: Headers, end_stream: bool) -> None:
        s = Stream(sid, self.peer_initial_window)
        s.remote_closed = end_stream
        self.streams[sid] = s
        path = method = ctype = timeout = encoding = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                ctype = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
        if method is None or path is None:
            self.reset_stream(s, f.PROTOCOL_ERROR)  # malformed request (RFC 9113 8.1.1)
            return
        if method != b"POST":
            self._http_reject(s, 405)
            return
        if ctype is None or not ctype.startswith(b"application/grpc"):
            self._http_reject(s, 415)
            return
        if path != self.method_path:
            self.finish(s, g.UNIMPLEMENTED, f"Method not found: {path.decode('latin-1')}")
            return
        if encoding is not None and encoding != b"identity":
            self.finish(s, g.UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')} is not supported",
                        ((b"grpc-accept-encoding", b"identity"),))
            return
        if timeout is not None and self.schedule is not None:
            seconds = g.parse_timeout(timeout)
            if seconds is not None:
                s.deadline = self.schedule(seconds, lambda: self._deadline_exceeded(s))
        try:
            s.session = self.sessions(_metadata(headers))
        except Exception as exc:
            log.exception("opening an ext_proc session on stream %d", sid)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return
        if end_stream:
            self._remote_end(s)

    def _deadline_exceeded(self, s: Stream) -> None:
        s.deadline = None
        if not s.closed:
            self.fail_stream(s, g.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = f.U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise H2ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > f.MAX_WINDOW:
                raise H2ConnectionError(f.FLOW_CONTROL_ERROR, "connection window overflow")
            if self.blocked:
                self._drain_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise H2ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return
        if inc == 0:
            self.reset_stream(s, f.PROTOCOL_ERROR)
            return
        s.send_window += inc
        if s.send_window > f.MAX_WINDOW:
            self.reset_stream(s, f.FLOW_CONTROL_ERROR)
        elif s.pending is not None:
            self._drain_stream(s)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise H2ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS length")
        grew = False
        for off in range(0, len(payload), 6):
            ident, value = f.SETTING.unpack_from(payload, off)
            if ident == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise H2ConnectionError(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():  # applies to open streams too (RFC 9113 6.9.2)
                    s.send_window += delta
                    if s.send_window > f.MAX_WINDOW:
                        raise H2ConnectionError(f.FLOW_CONTROL_ERROR, "stream window overflow")
                grew = grew or delta > 0
            elif ident == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise H2ConnectionError(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == f.SETTINGS_HEADER_TABLE_SIZE:
                self.table_update = True
            elif ident == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise H2ConnectionError(f.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
        self.got_settings = True
        self.out.append(f.SETTINGS_ACK)
        if grew and self.blocked:
            self._drain_blocked()

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ConnectionError(f.FRAME_SIZE_ERROR, "PING length")
        if not flags & f.ACK:
            self.out.append(f.ping(payload, ack=True))
        elif payload == DRAIN_PING and self.draining:
            self.final_goaway()

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(f.FRAME_SIZE_ERROR, "RST_STREAM length")
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise H2ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on idle stream")
            return
        self._close_stream(s)  # nothing more may be sent on it

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ConnectionError(f.FRAME_SIZE_ERROR, "GOAWAY length")
        _, code = f.U32X2.unpack_from(payload)
        if code != f.NO_ERROR:
            log.info("h2 peer %s sent GOAWAY code %d: %r", self.peer, code, payload[8:200])
        # The client opens no new streams; ours finish, then the connection closes.
        self.goaway_received = True
        if not self.streams:
            self.close()

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            s = self.streams.get(sid)
            if s is not None:
                self.reset_stream(s, f.FRAME_SIZE_ERROR)
            else:
                self.out.append(f.rst_stream(sid, f.FRAME_SIZE_ERROR))


def _metadata(headers: Headers) -> Metadata:
    return tuple((k.decode(), v.decode("utf-8", "replace")) for k, v in headers if not k.startswith(b":"))


def _strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise H2ConnectionError(f.FRAME_SIZE_ERROR, "PADDED frame without pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ConnectionError(f.PROTOCOL_ERROR, "padding exceeds payload")
    return payload[1:len(payload) - pad]
