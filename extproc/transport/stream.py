"""Per-stream state of the HTTP/2 connection core (h2conn)."""

from __future__ import annotations

from collections import deque

from extproc._pb.ext_proc_wire_pb2 import ProcessingRequest
from extproc.transport.session import Deferred, Session
from extproc.transport.timers import Timer

# Receive window per stream, advertised as SETTINGS_INITIAL_WINDOW_SIZE.
STREAM_WINDOW = 4 << 20


class Stream:
    """One HTTP/2 stream: partial message, flow-control windows, lifecycle flags, its session."""

    __slots__ = (
        "id", "buf", "remote_closed", "closed", "headers_sent",
        "send_window", "recv_window", "credit_owed", "pending", "pending_trailers",
        "deadline", "session", "deferred", "held",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.buf: bytearray | None = None  # a partial gRPC message
        self.remote_closed = False
        self.closed = False  # no more frames from us on this stream
        self.headers_sent = False
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.credit_owed = 0
        self.pending: bytearray | None = None  # DATA waiting for flow-control window
        self.pending_trailers: bytes | None = None
        self.deadline: Timer | None = None
        self.session: Session | None = None
        # An answer the session gives later; the messages that arrive meanwhile wait in `held`.
        self.deferred: Deferred | None = None
        self.held: deque[ProcessingRequest] = deque()
