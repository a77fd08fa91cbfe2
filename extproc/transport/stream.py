"""Per-stream state, the handler's request iterator and its context object."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extproc.transport.h2server import _Connection as Connection

# Receive window per stream, advertised as SETTINGS_INITIAL_WINDOW_SIZE.
STREAM_WINDOW = 4 << 20


class StreamContext:
    """The part of grpc.aio.ServicerContext a handler may reasonably use."""

    __slots__ = ("_s",)

    def __init__(self, stream: Stream) -> None:
        self._s = stream

    def cancelled(self) -> bool:
        return self._s.reset

    def done(self) -> bool:
        return self._s.closed

    def peer(self) -> str:
        return self._s.conn.peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((k.decode(), v.decode("utf-8", "replace"))
                     for k, v in self._s.headers if not k.startswith(b":"))

    def time_remaining(self) -> float | None:
        d = self._s.deadline
        return None if d is None else max(0.0, d.when() - self._s.conn.loop.time())


class Requests:
    """The handler's request iterator: messages already parsed, in arrival order."""

    __slots__ = ("_s",)

    def __init__(self, stream: Stream) -> None:
        self._s = stream

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        s = self._s
        q = s.queue
        while not q:
            if s.remote_closed or s.closed:
                raise StopAsyncIteration
            s.waiter = fut = s.conn.loop.create_future()
            try:
                await fut
            finally:
                s.waiter = None
        msg, size = q.popleft()
        s.queued -= size
        if s.credit_owed >= STREAM_WINDOW // 4:
            s.conn.credit_stream(s)
        return msg


class Stream:
    """One HTTP/2 stream: receive queue, flow-control windows, lifecycle flags."""

    __slots__ = (
        "conn", "id", "headers", "task", "queue", "queued", "waiter", "buf",
        "remote_closed", "closed", "reset", "headers_sent",
        "send_window", "recv_window", "credit_owed", "pending", "pending_trailers",
        "drain_waiter", "deadline", "session", "deferred",
    )

    def __init__(self, conn: Connection, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.task: asyncio.Task[None] | None = None
        self.queue: deque[tuple[Any, int]] = deque()
        self.queued = 0  # wire bytes of queued, unread messages
        self.waiter: asyncio.Future[None] | None = None
        self.buf: bytearray | None = None  # a partial gRPC message
        self.remote_closed = False
        self.closed = False  # no more frames from us on this stream
        self.reset = False  # ended by RST_STREAM (either side) or connection loss
        self.headers_sent = False
        self.send_window = conn.peer_initial_window
        self.recv_window = STREAM_WINDOW
        self.credit_owed = 0
        self.pending: bytearray | None = None  # DATA waiting for flow-control window
        self.pending_trailers: bytes | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        # Inline mode: a session object called from data_received instead of a handler task.
        self.session: Any = None
        # Inline mode: an answer the session gives later (a future); messages arriving
        # meanwhile wait in `queue`, in order.
        self.deferred: asyncio.Future[Any] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
            self.conn.woke = True
