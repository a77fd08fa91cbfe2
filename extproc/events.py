"""UsageEvent (generated from proto/usage_event.proto) and the contract of its consumers."""

from __future__ import annotations

from typing import Protocol

from extproc._pb.usage_event_pb2 import TokenSource, UsageEvent

__all__ = ["EventSink", "TokenSource", "UsageEvent", "token_source_name"]

_SOURCE_NAMES = {
    TokenSource.TOKEN_SOURCE_UNSPECIFIED: "unspecified",
    TokenSource.UPSTREAM_USAGE: "upstream_usage",
    TokenSource.TOKENIZER: "tokenizer",
    TokenSource.NONE: "none",
    TokenSource.TOKENIZER_ESTIMATE: "tokenizer_estimate",
}


def token_source_name(value: int) -> str:
    return _SOURCE_NAMES.get(value, "unspecified")


class EventSink(Protocol):
    """A consumer of finished UsageEvents.

    `emit` is called on the gRPC event loop for every finished request: it must neither block
    nor raise, and it must never drop an event silently (count it, spool it).
    """

    def emit(self, event: UsageEvent) -> None: ...

    async def start(self) -> None: ...

    async def force_flush(self, timeout: float = 30.0) -> bool: ...

    async def shutdown(self, timeout: float = 30.0) -> None: ...
