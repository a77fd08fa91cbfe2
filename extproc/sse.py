"""Incremental Server-Sent Events parser over arbitrary byte chunks.

Envoy hands us the response body in pieces cut anywhere: mid-event, mid-line, mid-UTF-8
sequence. We keep bytes until an event terminator arrives and decode only complete events, so a
multi-byte character split across chunks is never decoded in halves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a blank line; the SSE spec allows CRLF, LF and CR line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_SPLIT = re.compile(rb"\r\n|\n|\r")


@dataclass(slots=True)
class SSEEvent:
    # The `data` field: data lines joined by "\n", as bytes (decoded by the consumer).
    data: bytes
    # The whole event as received, terminator included: what we re-emit if we keep it.
    raw: bytes
    event: str = ""


class SSEParser:
    """Feed chunks, get complete events. `pending` holds the bytes of an unfinished event."""

    __slots__ = ("pending", "events_seen", "garbage_lines")

    def __init__(self) -> None:
        self.pending = b""
        self.events_seen = 0
        # Lines that are neither fields nor comments: evidence the body is not SSE.
        self.garbage_lines = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if (not self.pending and chunk.startswith(b"data: ") and chunk.find(b"\n", 6) == len(chunk) - 2
                and chunk.endswith(b"\n\n") and b"\r" not in chunk):
            # What vLLM sends, one chunk per event: a single data line. Same result as below.
            self.events_seen += 1
            return [SSEEvent(data=chunk[6:-2], raw=chunk)]
        buf = self.pending + chunk if self.pending else chunk
        events: list[SSEEvent] = []
        pos = 0
        while True:
            m = _EVENT_END.search(buf, pos)
            if m is None:
                break
            event = self._parse(buf[pos : m.start()], buf[pos : m.end()])
            if event is not None:
                events.append(event)
            pos = m.end()
        self.pending = buf[pos:]
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: an unterminated trailing event still counts (some servers omit it)."""
        rest, self.pending = self.pending, b""
        if not rest.strip():
            return []
        event = self._parse(rest, rest)
        return [event] if event is not None else []

    def _parse(self, block: bytes, raw: bytes) -> SSEEvent | None:
        data_lines: list[bytes] = []
        name = ""
        for line in _LINE_SPLIT.split(block):
            if not line or line.startswith(b":"):
                continue
            field, sep, value = line.partition(b":")
            if sep and value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data_lines.append(value)
            elif field == b"event":
                name = value.decode("utf-8", "replace")
            elif field in (b"id", b"retry"):
                continue
            else:
                self.garbage_lines += 1
        if not data_lines and not name:
            return None
        self.events_seen += 1
        return SSEEvent(data=b"\n".join(data_lines), raw=raw, event=name)
