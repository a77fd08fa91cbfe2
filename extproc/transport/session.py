"""What the transport and the service agree on: a session per gRPC stream.

The transport parses each request message and hands it to the stream's session in the same
call that read it from the socket (no task, no queue); the session answers at once, or not at
all (observability mode). The transport never sees an Exchange or a sink: it knows messages,
answers, and when a stream is over.
"""

from __future__ import annotations

from typing import Protocol

from extproc._pb.ext_proc_wire_pb2 import ProcessingRequest, ProcessingResponse

# gRPC metadata of the stream (request headers without the HTTP/2 pseudo-headers), in order.
Metadata = tuple[tuple[str, str], ...]


class Session(Protocol):
    """One ext_proc stream's handler, driven message by message."""

    @property
    def finished(self) -> bool:
        """True once the session expects no more messages: the transport ends the stream OK
        (in observability mode Envoy would otherwise hold it open)."""
        ...

    def on_message(self, msg: ProcessingRequest) -> ProcessingResponse | None:
        """The answer to `msg`, or None when none is due. An exception ends the stream with
        gRPC status UNKNOWN (the service itself never raises: it flags and answers)."""
        ...

    def close(self) -> None:
        """Called exactly once per session, whatever ended the stream (OK, reset, deadline,
        connection loss, server stop); the service emits the stream's event here."""
        ...


class SessionFactory(Protocol):
    def __call__(self, metadata: Metadata) -> Session: ...
