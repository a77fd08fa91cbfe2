"""A lean gRPC server for one bidirectional-streaming method, on asyncio.BufferedProtocol.

Why not grpcio or h2: both cost ~175-700 µs of CPU per 3-message stream here (NOTES, and h2's
H2Connection alone measured ~176 µs); this parses frames itself and uses `hpack` for header
blocks only. It serves exactly what Envoy's ext_proc filter speaks: prior-knowledge cleartext
HTTP/2, one method, identity encoding.

Shape: one `_Connection` per socket reads into a buffer of its own (`get_buffer` /
`buffer_updated`), parses frames in `data_received` and queues outgoing frames; everything
queued in one loop iteration goes out in one `transport.write`. Each stream
runs the handler in its own task, fed by `stream.Requests` (an async iterator over a deque).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from hpack import HPACKError

from extproc import wire
from extproc.transport import frames as f
from extproc.transport import grpcproto as g
from extproc.transport.address import parse_listen
from extproc.transport.hpackcache import CachingDecoder
from extproc.transport.stream import STREAM_WINDOW, Requests, Stream, StreamContext

log = logging.getLogger(__name__)

Handler = Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]

# Receive window per connection (per stream: STREAM_WINDOW): large, so Envoy never waits for a
# WINDOW_UPDATE; credit goes back in quarters.
CONN_WINDOW = 16 << 20
# Complete messages a handler has not read yet, per stream, before we stop crediting its window.
QUEUE_LIMIT = 1 << 20
MAX_CONCURRENT_STREAMS = 10_000
MAX_MESSAGE = 64 << 20  # as the grpcio server is configured
MAX_HEADER_BLOCK = 64 << 10
_DRAIN_PING = b"drain\x00\x00\x00"
# Socket reads go into one reusable buffer per connection. With a plain Protocol, asyncio
# allocates 256 KiB per recv(), which glibc serves by mmap, then mremap to size, then munmap:
# three syscalls and fresh pages per read. Below glibc's mmap threshold, so the copy we take
# of each read comes from the heap.
READ_BUFFER = 64 << 10


class _ConnectionError(Exception):
    def __init__(self, code: int, debug: str = "") -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.buf = b""
        self.preface_ok = False
        self.got_settings = False
        self.closed = False
        self.last_stream_id = 0
        self.decoder = CachingDecoder(MAX_HEADER_BLOCK)
        # CONTINUATION reassembly
        self.hdr_stream_id = 0
        self.hdr_flags = 0
        self.hdr_parts: list[bytes] = []
        self.hdr_size = 0
        # send side
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.receiving = False
        self.woke = False  # a handler was woken by this data_received
        self.send_window = f.DEFAULT_WINDOW
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.table_update = True  # prefix our next header block with a table size update
        self.blocked: dict[int, Stream] = {}
        self.write_paused = False
        self.write_waiters: list[asyncio.Future[None]] = []
        # receive side
        self.recv_window = CONN_WINDOW
        self.credit_owed = 0
        # shutdown
        self.draining = False  # first GOAWAY sent, still accepting streams
        self.accepting = True  # false after the final GOAWAY
        self.goaway_received = False
        self.lost: asyncio.Future[None] = self.loop.create_future()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though not always an asyncio.Transport subclass (uvloop's is not)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"ipv4:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix:{peer or ''}"
        self.server.connections.add(self)
        self._write(f.settings({
            f.SETTINGS_MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
            f.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            f.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }) + f.window_update(0, CONN_WINDOW - f.DEFAULT_WINDOW))
        if self.server.stopping:
            self.start_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.connections_closed += 1
        if not self.lost.done():
            self.lost.set_result(None)
        self.out.clear()
        for s in list(self.streams.values()):
            s.reset = True
            self._close_stream(s)
            if s.task is not None:
                s.task.cancel()
        self._wake_writers()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # a copy: frames keep slices of it (payloads, partial frames) past this call
        self.data_received(self.read_buffer[:nbytes].tobytes())

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self.write_waiters = self.write_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- output -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled and not self.receiving:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if out and not self.closed:
            self.out = []
            assert self.transport is not None
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _headers_frame(self, stream_id: int, block: bytes, flags: int) -> bytes:
        if self.table_update:
            self.table_update = False
            block = f.TABLE_SIZE_ZERO + block
        return f.frame(f.HEADERS, f.END_HEADERS | flags, stream_id, block)

    def send_message(self, s: Stream, data: bytes) -> None:
        if not s.headers_sent:
            s.headers_sent = True
            self._write(self._headers_frame(s.id, f.GRPC_RESPONSE_HEADERS, 0))
        n = len(data) + 5
        if s.pending is None and n <= s.send_window and n <= self.send_window and n <= self.peer_max_frame:
            s.send_window -= n
            self.send_window -= n
            self._write(f.DATA_MESSAGE_HEADER.pack(n >> 16, n & 0xFFFF, f.DATA, 0, s.id, 0, n - 5))
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
            self._write(f.frame(f.DATA, 0, s.id, bytes(buf[:k])))
            del buf[:k]
            s.send_window -= k
            self.send_window -= k
        self.blocked.pop(s.id, None)
        if buf:
            self.blocked[s.id] = s  # to the back: round robin between blocked streams
            return
        s.pending = None
        w = s.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
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
        self._write(self._headers_frame(s.id, block, f.END_STREAM))
        if not s.remote_closed:
            # The client may still be sending: tell it to stop, as grpc-core does.
            self._write(f.rst_stream(s.id, f.NO_ERROR))
        self._close_stream(s)

    def _http_reject(self, s: Stream, status: int) -> None:
        s.headers_sent = True
        self._send_trailers(s, f.status(status))

    def reset_stream(self, s: Stream, code: int) -> None:
        if not s.closed:
            self._write(f.rst_stream(s.id, code))
        s.reset = True
        self._close_stream(s)
        if s.task is not None:
            s.task.cancel()

    def fail_stream(self, s: Stream, code: int, message: str) -> None:
        """A receive-side error on one stream: status to the client, handler cancelled."""
        self.finish(s, code, message)
        if s.pending_trailers is not None:  # stuck behind flow control: do not wait for them
            self.reset_stream(s, f.CANCEL)
        elif s.task is not None:
            s.task.cancel()

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
        s.wake()
        w = s.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if not self.streams and (self.goaway_received or not self.accepting):
            self.close()

    def close(self) -> None:
        """Flush what is queued and close the socket."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        assert self.transport is not None
        self.transport.close()

    def _connection_error(self, code: int, debug: str) -> None:
        if self.closed:
            return
        log.debug("h2 connection error %d from %s: %s", code, self.peer, debug)
        self.out.append(f.goaway(self.last_stream_id, code, debug.encode()[:256]))
        self.close()
        for s in list(self.streams.values()):
            s.reset = True
            self._close_stream(s)
            if s.task is not None:
                s.task.cancel()

    # --- graceful shutdown ------------------------------------------------------------------

    def start_drain(self) -> None:
        """GOAWAY(max id) + PING: streams in flight are still accepted; the final GOAWAY, with the
        real last stream id, follows the PING's ACK (RFC 9113 6.8)."""
        if self.draining or self.closed:
            return
        self.draining = True
        self._write(f.goaway(f.MAX_WINDOW, f.NO_ERROR) + f.ping(_DRAIN_PING))

    def final_goaway(self) -> None:
        if not self.accepting or self.closed:
            return
        self.accepting = False
        self._write(f.goaway(self.last_stream_id, f.NO_ERROR))
        if not self.streams:
            self.close()

    # --- input ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        self.receiving = True
        try:
            if not self.preface_ok:
                if n < 24:
                    if not f.PREFACE.startswith(data):
                        raise _ConnectionError(f.PROTOCOL_ERROR, "bad connection preface")
                    self.buf = data
                    return
                if data[:24] != f.PREFACE:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "bad connection preface")
                self.preface_ok = True
                pos = 24
            unpack = f.FRAME_HEADER.unpack_from
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(data, pos)
                length = (hi << 16) | lo
                if length > f.DEFAULT_MAX_FRAME:
                    raise _ConnectionError(f.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                end = pos + 9 + length
                if end > n:
                    break
                payload = data[pos + 9:end]
                pos = end
                sid &= 0x7FFFFFFF
                if self.hdr_stream_id and ftype != f.CONTINUATION:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "expected CONTINUATION")
                if not self.got_settings and ftype != f.SETTINGS:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "first frame must be SETTINGS")
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
                    raise _ConnectionError(f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # other types are extensions: ignored (RFC 9113 5.5)
                if self.closed:
                    return
            if pos < n:
                self.buf = data[pos:]
            if self.credit_owed >= CONN_WINDOW // 4:
                self._write(f.window_update(0, self.credit_owed))
                self.recv_window += self.credit_owed
                self.credit_owed = 0
        except _ConnectionError as exc:
            self._connection_error(exc.code, exc.debug)
        finally:
            self.receiving = False
            # Scheduled after the handler wake-ups above, so it runs right after their steps in
            # the next iteration: their answers join this write, one loop iteration sooner.
            if self.out and not self.woke and not self.closed:
                self._flush()  # inline answers (and control frames) need no extra loop turn
            elif (self.out or self.woke) and not self.flush_scheduled and not self.closed:
                self.flush_scheduled = True
                self.loop.call_soon(self._flush)
            self.woke = False

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, "connection window exceeded")
        self.credit_owed += size
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "DATA on stream 0")
        if flags & f.PADDED:
            payload = _strip_padding(payload)
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "DATA on idle stream")
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
        elif s.credit_owed >= STREAM_WINDOW // 4:
            self.credit_stream(s)

    def credit_stream(self, s: Stream) -> None:
        """Return consumed bytes to the stream window, unless its handler is behind."""
        if s.closed or s.remote_closed or s.queued > QUEUE_LIMIT:
            return
        self._write(f.window_update(s.id, s.credit_owed))
        s.recv_window += s.credit_owed
        s.credit_owed = 0

    def _on_stream_bytes(self, s: Stream, payload: bytes) -> None:
        """Split gRPC length-prefixed messages (several per frame, or one over many frames)."""
        buf = s.buf
        if buf is not None:
            buf += payload
            data: bytes | bytearray = buf
        else:
            data = payload
        n = len(data)
        pos = 0
        parse = self.server.deserialize
        delivered = False
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
                msg = parse(data[pos + 5:end])
            except Exception as exc:
                self.fail_stream(s, g.INTERNAL, f"cannot parse request message: {exc}")
                return
            size = end - pos
            pos = end
            if s.session is not None:
                if not self._deliver_inline(s, msg):
                    return
                continue
            s.queue.append((msg, size))
            s.queued += size
            delivered = True
        if pos == n:
            s.buf = None
        elif buf is None:
            s.buf = bytearray(data[pos:])
        elif pos:
            del buf[:pos]
        if delivered:
            s.wake()

    def _deliver_inline(self, s: Stream, msg: Any) -> bool:
        """Inline mode: answer in the same data_received, no task hop. False: stream is over."""
        if s.deferred is not None:  # an earlier answer is still coming: keep the order
            s.queue.append((msg, 0))
            return True
        try:
            resp = s.session.on_message(msg)
        except Exception as exc:
            log.exception("ext_proc session failed on stream %d", s.id)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return False
        if s.closed:
            return False
        if isinstance(resp, asyncio.Future):
            s.deferred = resp
            resp.add_done_callback(lambda fut, s=s: self._deferred_done(s, fut))
            return True
        return self._answered(s, resp)

    def _answered(self, s: Stream, resp: Any) -> bool:
        if resp is not None:
            self.send_message(s, self.server.serialize(resp))
        if s.session.finished:
            self.finish(s, g.OK)
            return False
        return True

    def _deferred_done(self, s: Stream, fut: asyncio.Future[Any]) -> None:
        s.deferred = None
        if s.closed or self.closed or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("ext_proc session's deferred answer failed on stream %d: %r", s.id, exc)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return
        if not self._answered(s, fut.result()):
            return
        while s.queue and s.deferred is None:
            msg, _ = s.queue.popleft()
            if not self._deliver_inline(s, msg):
                return
        if s.remote_closed and not s.queue and s.deferred is None and not s.closed:
            self.finish(s, g.OK)

    def _remote_end(self, s: Stream) -> None:
        s.remote_closed = True
        if s.buf:
            self.fail_stream(s, g.INTERNAL, "stream ended inside a message")
            return
        if s.session is not None:
            if s.deferred is not None or s.queue:
                return  # the deferred answer, then what waits behind it, go first
            self.finish(s, g.OK)  # the client is done sending; the session closes with it
            return
        s.wake()

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & f.PADDED:
            payload = _strip_padding(payload)
        if flags & f.PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnectionError(f.FRAME_SIZE_ERROR, "short PRIORITY fields")
            payload = payload[5:]  # dependency and weight: we do not schedule by priority
        if flags & f.END_HEADERS:
            self._on_header_block(flags, sid, payload)
        else:
            self.hdr_stream_id, self.hdr_flags = sid, flags
            self.hdr_parts, self.hdr_size = [payload], len(payload)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self.hdr_stream_id or sid != self.hdr_stream_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self.hdr_parts.append(payload)
        self.hdr_size += len(payload)
        if self.hdr_size > MAX_HEADER_BLOCK:
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            block = b"".join(self.hdr_parts)
            self.hdr_stream_id, self.hdr_parts = 0, []
            self._on_header_block(self.hdr_flags, sid, block)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self.decoder.decode(block)
        except HPACKError as exc:
            raise _ConnectionError(f.COMPRESSION_ERROR, f"header block: {exc}") from None

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
            raise _ConnectionError(f.PROTOCOL_ERROR, "even stream id from a client")
        self.last_stream_id = sid
        if not self.accepting or len(self.streams) >= self.server.max_concurrent_streams:
            self._write(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        self._open_stream(sid, headers, bool(flags & f.END_STREAM))

    def _open_stream(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        s = Stream(self, sid, headers)
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
        if path != self.server.method_path:
            self.finish(s, g.UNIMPLEMENTED, f"Method not found: {path.decode('latin-1')}")
            return
        if encoding is not None and encoding != b"identity":
            self.finish(s, g.UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')} is not supported",
                        ((b"grpc-accept-encoding", b"identity"),))
            return
        if timeout is not None:
            seconds = g.parse_timeout(timeout)
            if seconds is not None:
                s.deadline = self.loop.call_later(seconds, self._deadline_exceeded, s)
        sessions = self.server.sessions
        if sessions is not None:
            s.session = sessions(StreamContext(s).invocation_metadata())
            return
        s.task = task = self.loop.create_task(self._serve(s))
        tasks = self.server.tasks
        tasks.add(task)
        # not in _serve's finally: a task cancelled before its first step never runs it
        task.add_done_callback(tasks.discard)

    def _deadline_exceeded(self, s: Stream) -> None:
        s.deadline = None
        self.fail_stream(s, g.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = f.U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > f.MAX_WINDOW:
                raise _ConnectionError(f.FLOW_CONTROL_ERROR, "connection window overflow")
            if self.blocked:
                self._drain_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
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
            raise _ConnectionError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise _ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS length")
        grew = False
        for off in range(0, len(payload), 6):
            ident, value = f.SETTING.unpack_from(payload, off)
            if ident == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnectionError(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():  # applies to open streams too (RFC 9113 6.9.2)
                    s.send_window += delta
                    if s.send_window > f.MAX_WINDOW:
                        raise _ConnectionError(f.FLOW_CONTROL_ERROR, "stream window overflow")
                grew = grew or delta > 0
            elif ident == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == f.SETTINGS_HEADER_TABLE_SIZE:
                self.table_update = True
            elif ident == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise _ConnectionError(f.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
        self.got_settings = True
        self._write(f.SETTINGS_ACK)
        if grew and self.blocked:
            self._drain_blocked()

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "PING length")
        if not flags & f.ACK:
            self._write(f.ping(payload, ack=True))
        elif payload == _DRAIN_PING and self.draining:
            self.final_goaway()

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "RST_STREAM length")
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on idle stream")
            return
        s.reset = True
        self._close_stream(s)  # nothing more may be sent on it
        if s.task is not None:
            s.task.cancel()

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(f.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "GOAWAY length")
        _, code = f.U32X2.unpack_from(payload)
        if code != f.NO_ERROR:
            log.info("h2 peer %s sent GOAWAY code %d: %r", self.peer, code, payload[8:200])
        # The client opens no new streams; ours finish, then the connection closes.
        self.goaway_received = True
        if not self.streams:
            self.close()

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            s = self.streams.get(sid)
            if s is not None:
                self.reset_stream(s, f.FRAME_SIZE_ERROR)
            else:
                self._write(f.rst_stream(sid, f.FRAME_SIZE_ERROR))

    # --- the handler ------------------------------------------------------------------------

    async def _serve(self, s: Stream) -> None:
        gen = self.server.handler(Requests(s), StreamContext(s))
        serialize = self.server.serialize
        try:
            async for resp in gen:
                if s.closed:
                    break
                self.send_message(s, serialize(resp))
                if s.pending is not None or self.write_paused:
                    await self._writable(s)
            else:
                self.finish(s, g.OK)
        except asyncio.CancelledError:
            if not s.closed:  # cancelled from outside (server stop): the client must know
                self.reset_stream(s, f.CANCEL)
        except Exception as exc:
            log.exception("ext_proc handler failed on stream %d", s.id)
            self.finish(s, g.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        finally:
            # Reached with the generator suspended at a yield if we stopped early: close it so
            # its finally runs now, not at garbage collection.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await gen.aclose()  # type: ignore[attr-defined]
            if not s.closed and s.pending_trailers is None:
                self.reset_stream(s, f.CANCEL)

    async def _writable(self, s: Stream) -> None:
        """Backpressure: wait while the stream's DATA is blocked or the socket buffer is full."""
        while not s.closed:
            if s.pending is not None:
                s.drain_waiter = fut = self.loop.create_future()
                await fut
                s.drain_waiter = None
            elif self.write_paused and not self.closed:
                fut = self.loop.create_future()
                self.write_waiters.append(fut)
                await fut
            else:
                return


def _strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise _ConnectionError(f.FRAME_SIZE_ERROR, "PADDED frame without pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise _ConnectionError(f.PROTOCOL_ERROR, "padding exceeds payload")
    return payload[1:len(payload) - pad]


class H2GrpcServer:
    """Serves one gRPC method; `stop(grace)` drains like grpc.aio.Server.stop."""

    def __init__(self, handler: Handler, *, method_path: str = wire.METHOD_PATH,
                 deserialize: Callable[[bytes], Any] = wire.ProcessingRequest.FromString,
                 serialize: Callable[[Any], bytes] = wire.ProcessingResponse.SerializeToString,
                 max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
                 sessions: Callable[[tuple[tuple[str, str], ...]], Any] | None = None) -> None:
        self.handler = handler
        # Inline mode: sessions(metadata) -> object with on_message(msg) -> answer | None,
        # `finished` and close(); called from data_received, no task per stream.
        self.sessions = sessions
        self.method_path = method_path.encode()
        self.deserialize = deserialize
        self.serialize = serialize
        self.max_concurrent_streams = max_concurrent_streams
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.connections_closed = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None

    async def listen(self, listen: str) -> int:
        addr = parse_listen(listen)
        if addr.path:
            self._server = await self.loop.create_unix_server(lambda: _Connection(self), addr.path)
            return 0
        self._server = await self.loop.create_server(
            lambda: _Connection(self), addr.host or None, addr.port, reuse_address=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted (worker processes: extproc/workers/)."""
        if self.stopping:
            sock.close()
            return
        await self.loop.connect_accepted_socket(lambda: _Connection(self), sock)

    async def stop(self, grace: float | None) -> None:
        """GOAWAY every connection, let in-flight streams finish for up to `grace` seconds, then
        cancel the rest (their handlers' finally blocks run) and close."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.start_drain()
        deadline = self.loop.time() + (grace or 0)
        # loop: streams accepted while the first GOAWAY is in flight count too
        while (running := {t for t in self.tasks if not t.done()}) and (left := deadline - self.loop.time()) > 0:
            await asyncio.wait(running, timeout=left)
        # inline sessions have no task to wait on: poll until they end or the grace runs out
        while self._inline_open() and deadline - self.loop.time() > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.final_goaway()
            for s in list(c.streams.values()):
                c.reset_stream(s, f.CANCEL)
        if running := {t for t in self.tasks if not t.done()}:
            await asyncio.wait(running, timeout=5)
        lost = [c.lost for c in self.connections]
        for c in list(self.connections):
            c.close()
        if lost:
            await asyncio.wait(lost, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def _inline_open(self) -> bool:
        return any(st.session is not None for c in self.connections for st in c.streams.values())

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.serve_forever()


async def start_h2_server(handler: Handler, listen: str | None, *,
                          sessions: Callable[[tuple[tuple[str, str], ...]], Any] | None = None,
                          ) -> tuple[H2GrpcServer, int]:
    """Bind `listen` (host:port, port 0 = ephemeral, or unix:/path) and serve `handler` as
    /envoy.service.ext_proc.v3.ExternalProcessor/Process. With `sessions`, streams are served
    inline by session objects instead (see H2GrpcServer). `listen` None: no listener,
    connections come through `adopt` (worker processes). Returns the server and the bound port
    (0 for unix sockets and no listener)."""
    server = H2GrpcServer(handler, sessions=sessions)
    port = await server.listen(listen) if listen is not None else 0
    return server, port
