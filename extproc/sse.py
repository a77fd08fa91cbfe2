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
# Longest terminator minus one: how much of a skipped event's tail can start one.
_END_TAIL = 3
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
_LINE_SPLIT = re.compile(rb"\r\n|\n|\r")


@dataclass(slots=True)
class SSEEvent:
    # The `data` field: data lines joined by "\n", as bytes (decoded by the consumer).
    data: bytes
    # The whole event as received, terminator included: what we re-emit if we keep it.
    raw: bytes
    event: str = ""
    # Part of an event longer than the parser's limit: not parsed, `raw` passed on as it came.
    oversized: bool = False


class SSEParser:
    """Feed chunks, get complete events. `pending` holds the bytes of an unfinished event, at
    most `max_event_bytes`: a longer event is handed back unparsed, as `oversized` pieces of raw
    bytes (so a consumer that holds bytes back still forwards every one), up to its end."""

    __slots__ = ("pending", "garbage_lines", "max_event_bytes", "oversized_events", "_skip_tail")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.pending = b""
        # Lines that are neither fields nor comments: evidence the body is not SSE.
        self.garbage_lines = 0
        self.max_event_bytes = max_event_bytes
        self.oversized_events = 0
        # While skipping an oversized event: its last bytes (a terminator may straddle chunks).
        self._skip_tail: bytes | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._skip_tail is not None:
            return self._skip(chunk)
        if (not self.pending and chunk.startswith(b"data: ") and chunk.find(b"\n", 6) == len(chunk) - 2
                and chunk.endswith(b"\n\n") and b"\r" not in chunk and len(chunk) <= self.max_event_bytes):
            # What vLLM sends, one chunk per event: a single data line. Same result as below.
            return [SSEEvent(data=chunk[6:-2], raw=chunk)]
        buf = self.pending + chunk if self.pending else chunk
        events: list[SSEEvent] = []
        pos = 0
        while True:
            m = _EVENT_END.search(buf, pos)
            if m is None:
                break
            if m.end() - pos > self.max_event_bytes:  # unread however it was cut
                self.oversized_events += 1
                events.append(SSEEvent(data=b"", raw=buf[pos : m.end()], oversized=True))
            else:
                event = self._parse(buf[pos : m.start()], buf[pos : m.end()])
                if event is not None:
                    events.append(event)
            pos = m.end()
        self.pending = buf[pos:]
        if len(self.pending) > self.max_event_bytes:
            self.oversized_events += 1
            held, self.pending = self.pending, b""
            self._skip_tail = held[-_END_TAIL:]
            events.append(SSEEvent(data=b"", raw=held, oversized=True))
        return events

    def _skip(self, chunk: bytes) -> list[SSEEvent]:
        """Inside an oversized event: pass bytes on up to its terminator, then parse again."""
        tail = self._skip_tail or b""
        m = _EVENT_END.search(tail + chunk)
        if m is None:
            self._skip_tail = (tail + chunk)[-_END_TAIL:]
            return [SSEEvent(data=b"", raw=chunk, oversized=True)] if chunk else []
        end = m.end() - len(tail)
        self._skip_tail = None
        head = [SSEEvent(data=b"", raw=chunk[:end], oversized=True)] if end > 0 else []
        return head + self.feed(chunk[end:]) if end < len(chunk) else head

    def flush(self) -> list[SSEEvent]:
        """End of stream: an unterminated trailing event still counts (some servers omit it)."""
        rest, self.pending = self.pending, b""
        self._skip_tail = None
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
        return SSEEvent(data=b"\n".join(data_lines), raw=raw, event=name)
