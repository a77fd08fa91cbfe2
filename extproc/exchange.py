"""Per-request state: one Exchange per HTTP request. Envoy opens one ext_proc stream per request
and filter, so that is one stream, or two in hybrid mode (the server pairs them).

It turns ext_proc messages into answers and, at the end, into exactly one UsageEvent.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from extproc import wire
from extproc.events import TokenSource, UsageEvent
from extproc.labels import Attribution
from extproc.processors import (
    EndpointProcessor,
    ProcessorContext,
    RequestError,
    processor_for,
    refusal,
)
from extproc.stats import SidecarStats

log = logging.getLogger(__name__)

# Added to the request by the hybrid mode's request filter; the response filter's stream reads it.
CORRELATION_HEADER = "x-extproc-correlation"
CORRELATION_ONLY = frozenset((CORRELATION_HEADER,))
RESPONSE_HEADERS = frozenset((":status", "content-type", "content-length"))


@functools.cache
def _request_headers(attribution: Attribution) -> frozenset[str]:
    """Request headers the sidecar reads: routing, request id, pairing, and the labels (once
    per Attribution, not per request)."""
    return frozenset((":method", ":path", "x-request-id", CORRELATION_HEADER, *attribution.header_names))


# Whitespace may precede either framing; these bytes are what vLLM's JSON bodies start with.
_BLANK = b" \t\r\n"
_JSON_STARTS = frozenset(b"{[")
# An SSE stream starts with a field name (data, event, id, retry) or a comment.
_SSE_STARTS = frozenset(b"deir:")
SSE = "text/event-stream"
JSON = "application/json"


def framing_of(chunk: bytes) -> str | None:
    """The body's framing as its first non-blank byte says, or None while only blanks were seen.

    With response headers skipped this is all the sidecar has: one byte decides, so a first chunk
    of any length (Envoy forwards whatever it read, down to a single byte) decides the same way.
    """
    head = chunk.lstrip(_BLANK)
    if not head:
        return None
    first = head[0]
    if first in _JSON_STARTS:
        return JSON
    return SSE if first in _SSE_STARTS else JSON


class Exchange:
    __slots__ = (
        "_attribution", "_ctx", "_stats", "event", "processor", "start_mono", "response_done", "request_done",
        "_finished", "_request_body", "_request_headers", "observe", "role", "correlation_id",
        "response_started", "response_code", "_framing_pending", "refused", "_request_body_len",
    )

    def __init__(self, attribution: Attribution, ctx: ProcessorContext, stats: SidecarStats) -> None:
        self._attribution = attribution
        self._ctx = ctx
        self._request_headers = _request_headers(attribution)
        self._stats = stats
        self.event = UsageEvent(start_time_unix_nano=time.time_ns())
        self.start_mono = time.monotonic_ns()
        self.processor: EndpointProcessor | None = None
        # Nothing more to come for the request / the response: a stream can be closed.
        self.request_done = False
        self.response_done = False
        # Response headers seen, or (response_header_mode SKIP) the first body message.
        self.response_started = False
        # The upstream status from Envoy's response.code attribute, when headers are skipped.
        self.response_code: int | None = None
        # The response's framing (SSE or JSON) waits for its first non-blank byte when no
        # content-type was seen.
        self._framing_pending = False
        self._finished = False
        # Request body pieces (STREAMED request bodies, as in observability mode), and their
        # size: over metering.max_request_body_bytes they are let go, not parsed.
        self._request_body: list[bytes] = []
        self._request_body_len = 0
        # Observability mode: Envoy ignores our answers, so nothing can be rewritten.
        self.observe = False
        # Hybrid mode: "request" streams see only the request and hand the exchange over to the
        # "response" stream of the same HTTP request, found by correlation_id.
        self.role = ""
        self.correlation_id = ""
        # Answered by Envoy for us (metering.unknown_post: refuse): no response will follow.
        self.refused = False

    def handle(self, kind: str, msg) -> wire.ProcessingResponse:  # noqa: ANN001 - a oneof member
        if kind == wire.REQUEST_HEADERS:
            return self._on_request_headers(msg)
        if kind == wire.REQUEST_BODY:
            return self._on_request_body(msg)
        if kind == wire.RESPONSE_HEADERS:
            return self._on_response_headers(msg)
        if kind == wire.RESPONSE_BODY:
            return self._on_response_body(msg)
        if kind == wire.RESPONSE_TRAILERS:
            self.response_done = True
        return wire.continue_response(kind)

    def _on_request_headers(self, msg) -> wire.ProcessingResponse:  # noqa: ANN001
        headers = wire.decode_headers(msg.headers, self._request_headers)
        ev = self.event
        ev.method = headers.get(":method", "")
        ev.path = headers.get(":path", "")
        ev.request_id = headers.get("x-request-id", "")
        ev.labels.update(self._attribution.labels(headers))
        self.processor = processor_for(ev.method, ev.path, self._ctx)
        request_only = self.role == "request"
        if self.processor is None:
            ev.endpoint = "unknown"
            self.request_done = True
            reason = None if self.observe else refusal(ev.method, ev.path, self._ctx)
            if reason is not None:
                self.refused = self.response_done = True
                ev.error, ev.error_detail, ev.http_status = "refused_path", reason[:500], 404
                self._stats.refused_requests += 1
                return wire.immediate_error(404, reason, error_type="invalid_request_error", code="unmetered_path")
            if request_only:  # the response stream meters (and counts) this request
                return wire.skip_bodies_response(response_headers=False)
            self._stats.unmetered_requests += 1
            return wire.skip_bodies_response()
        if msg.end_of_stream:
            self.processor.error = "empty_request_body"
            self.processor.error_detail = "request has no body"
            self.request_done = True
        if request_only:
            self.correlation_id = os.urandom(16).hex()
            return wire.add_request_header_response(CORRELATION_HEADER, self.correlation_id)
        return wire.continue_response(wire.REQUEST_HEADERS)

    def adopt_response_side(self) -> None:
        """This exchange's request was handled by a "request" stream; a "response" stream in
        observability mode now carries it to the end."""
        if self.processor is not None:
            self.processor.strip_usage_chunk = False

    def _on_request_body(self, msg) -> wire.ProcessingResponse:  # noqa: ANN001
        p = self.processor
        if p is None:
            return wire.continue_response(wire.REQUEST_BODY)
        limit = self._ctx.max_request_body_bytes
        self._request_body_len += len(msg.body)
        if not msg.end_of_stream:
            if self._request_body_len <= limit:
                self._request_body.append(msg.body)
            elif self._request_body:
                self._request_body = []
            return wire.continue_response(wire.REQUEST_BODY)
        body = b"".join((*self._request_body, msg.body)) if self._request_body else msg.body
        self._request_body = []
        self.request_done = True
        if self._request_body_len > limit:
            p.error = "request_too_large"
            p.error_detail = (f"request body of {self._request_body_len} bytes exceeds "
                              f"metering.max_request_body_bytes ({limit}): not parsed; output counted without it")
            log.warning("request %s: %s", self.event.request_id, p.error_detail)
            return wire.continue_response(wire.REQUEST_BODY)
        try:
            replacement = p.on_request_body(body, rewrite=not self.observe)
        except RequestError as exc:
            p.error, p.error_detail = exc.kind, exc.detail
            log.warning("request %s: %s: %s", self.event.request_id, exc.kind, exc.detail)
            return wire.continue_response(wire.REQUEST_BODY)
        if p.delegate is not None:  # /invocations: the route the body's shape selects meters it
            self.processor = p.delegate
        if replacement is None:
            return wire.continue_response(wire.REQUEST_BODY)
        return wire.replace_request_body(replacement)

    def _on_response_headers(self, msg) -> wire.ProcessingResponse:  # noqa: ANN001
        self.response_started = True
        headers = wire.decode_headers(msg.headers, RESPONSE_HEADERS)
        status = headers.get(":status", "0")
        self.event.http_status = int(status) if status.isdigit() else 0
        p = self.processor
        if p is None or msg.end_of_stream:
            if p is not None:
                p.on_response_headers(self.event.http_status, headers.get("content-type", ""))
                p.response_complete = True
            self.response_done = True
            return wire.continue_response(wire.RESPONSE_HEADERS)
        content_type = headers.get("content-type", "")
        if not content_type:
            self._framing_pending = True
            return wire.continue_response(wire.RESPONSE_HEADERS)
        p.on_response_headers(self.event.http_status, content_type)
        if p.rewrites_response and "content-length" in headers:
            return wire.strip_content_length_response()
        return wire.continue_response(wire.RESPONSE_HEADERS)

    def _on_response_body(self, msg) -> wire.ProcessingResponse:  # noqa: ANN001
        p = self.processor
        if not self.response_started:  # response headers are not sent to us
            self.response_started = True
            self.event.http_status = self.response_code or 0
            self._framing_pending = True
        if msg.end_of_stream:
            self.response_done = True
        if p is None:
            return wire.continue_response(wire.RESPONSE_BODY)
        if self._framing_pending:
            framing = framing_of(msg.body)
            if framing is None and not msg.end_of_stream:
                # Only blanks so far: they reach the client as they are and mean nothing to
                # either framing.
                return wire.continue_response(wire.RESPONSE_BODY)
            self._framing_pending = False
            p.on_response_headers(self.event.http_status, framing or JSON)
        seen = p.live_output_tokens
        replacement = p.on_response_chunk(msg.body, msg.end_of_stream, time.monotonic_ns())
        self._stats.live_output_tokens += p.live_output_tokens - seen
        if replacement is None:
            return wire.continue_response(wire.RESPONSE_BODY)
        return wire.replace_response_chunk(replacement)

    def flag_internal_error(self, kind: str, exc: BaseException) -> None:
        target = self.processor
        if target is not None and not target.error:
            target.error, target.error_detail = "internal_error", f"{kind}: {exc!r}"[:500]
        elif target is None and not self.event.error:
            self.event.error, self.event.error_detail = "internal_error", f"{kind}: {exc!r}"[:500]

    def finish(self) -> UsageEvent | None:
        """Build the event once. Returns None if this stream never saw a request."""
        if self._finished:
            return None
        self._finished = True
        ev = self.event
        if not ev.method and not ev.path:
            return None
        end = time.monotonic_ns()
        ev.end_time_unix_nano = ev.start_time_unix_nano + (end - self.start_mono)
        ev.duration_ns = end - self.start_mono
        ev.event_id = os.urandom(16).hex()
        p = self.processor
        if p is None:
            ev.metered = False
            ev.token_source = TokenSource.NONE
            ev.client_aborted = not self.response_done
            return ev
        ev.client_aborted = not ((self.response_done and p.response_complete) or p.done_seen)
        if p.first_output_ns:
            ev.time_to_first_token_ns = p.first_output_ns - self.start_mono
        try:
            p.fill_event(ev)
        except Exception as exc:  # a bug in counting must still leave an event behind
            log.exception("filling event for request %s", ev.request_id)
            ev.error, ev.error_detail = "internal_error", f"fill_event: {exc!r}"[:500]
        return ev
