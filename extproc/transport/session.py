"""What the transport and the service agree on: a session per gRPC stream.

The transport parses each request message and hands it to the stream's session in the same
call that read it from the socket (no task, no queue); the session answers at once, or not at
all (observability mode). The transport never sees an Exchange or a sink: it knows messages,
answers, and when a stream is over. An answer may also come later (a Deferred: a budget
check against Redis); the stream's next messages wait behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from extproc._pb.ext_proc_wire_pb2 import ProcessingRequest, ProcessingResponse

# gRPC metadata of the stream (request headers without the HTTP/2 pseudo-headers), in order.
Metadata = tuple[tuple[str, str], ...]


class Deferred(Protocol):
    """An answer the session gives later (admission against a remote ledger): asyncio.Future
    satisfies it. The transport holds the stream's later messages until it is done, so answers
    keep their order."""

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...

    def cancelled(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def result(self) -> ProcessingResponse | None: ...


class Session(Protocol):
    """One ext_proc stream's handler, driven message by message."""

    @property
    def finished(self) -> bool:
        """True once the session expects no more messages: the transport ends the stream OK
        (in observability mode Envoy would otherwise hold it open)."""
        ...

    def on_message(self, msg: ProcessingRequest) -> ProcessingResponse | Deferred | None:
        """The answer to `msg`, None when none is due, or a Deferred answer. An exception ends
        the stream with gRPC status UNKNOWN (the service itself never raises: it flags and
        answers)."""
        ...

    def close(self) -> None:
        """Called exactly once per session, whatever ended the stream (OK, reset, deadline,
        connection loss, server stop); the service emits the stream's event here."""
        ...


class SessionFactory(Protocol):
    def __call__(self, metadata: Metadata) -> Session: ...
