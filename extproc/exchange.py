"""Per-request state: one Exchange per HTTP request. Envoy opens one ext_proc stream per request
and filter, so that is one stream, or two in hybrid mode (the server pairs them).

It turns ext_proc messages into answers and, at the end, into exactly one UsageEvent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import cast

import orjson

from extproc import wire
from extproc._pb import ext_proc_wire_pb2 as pb
from extproc.events import TokenSource, UsageEvent
from extproc.governance.governor import Admission, Governor, Identity, Refusal
from extproc.governance.policy import Budget
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

# An answer now, or (admission against a remote ledger) a future of it.
Answer = wire.ProcessingResponse | asyncio.Future[wire.ProcessingResponse]

# Added to the request by the hybrid mode's request filter; the response filter's stream reads it.
CORRELATION_HEADER = "x-extproc-correlation"
# gRPC metadata naming a hybrid-mode filter's stream role (request | response), set by the Envoy
# config (extproc envoy-config --mode hybrid).
ROLE_METADATA = "x-extproc-role"
CORRELATION_ONLY = frozenset((CORRELATION_HEADER,))
RESPONSE_HEADERS = frozenset((":status", "content-type", "content-length"))


@functools.cache
def _request_headers(attribution: Attribution, keys: bool = False) -> frozenset[str]:
    """Request headers the sidecar reads: routing, request id, pairing, and the labels (once
    per Attribution, not per request); with a policy, the client's key too."""
    extra = ("authorization", "x-api-key") if keys else ()
    return frozenset((":method", ":path", "x-request-id", CORRELATION_HEADER, *attribution.header_names, *extra))


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
        "response_started", "response_code", "_framing_pending", "_request_body_len", "_governor",
        "identity", "admission", "refused",
    )

    def __init__(self, attribution: Attribution, ctx: ProcessorContext, stats: SidecarStats,
                 governor: Governor | None = None) -> None:
        self._attribution = attribution
        self._ctx = ctx
        self._governor = governor
        # Virtual key, budgets and rate limits (extproc/governance): who, and what was reserved.
        self.identity: Identity | None = None
        self.admission: Admission | None = None
        self.refused: Refusal | None = None
        self._request_headers = _request_headers(attribution, governor is not None)
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

    def handle_request(self, req: wire.ProcessingRequest, kind: str) -> Answer:
        """A ProcessingRequest as Envoy sends it, its oneof `kind` already read. With response
        headers skipped, the upstream status rides on the first response body message as the
        response.code attribute."""
        if kind == wire.RESPONSE_BODY and not self.response_started:
            self.response_code = wire.response_code(req)
        return self.handle(kind, getattr(req, kind))

    def handle(self, kind: str, msg: wire.Message) -> Answer:
        # `kind` names the oneof member `msg` was read from, so the casts hold.
        if kind == wire.REQUEST_HEADERS:
            return self._on_request_headers(cast(pb.HttpHeaders, msg))
        if kind == wire.REQUEST_BODY:
            return self._on_request_body(cast(pb.HttpBody, msg))
        if kind == wire.RESPONSE_HEADERS:
            return self._on_response_headers(cast(pb.HttpHeaders, msg))
        if kind == wire.RESPONSE_BODY:
            return self._on_response_body(cast(pb.HttpBody, msg))
        if kind == wire.RESPONSE_TRAILERS:
            self.response_done = True
        return wire.continue_response(kind)

    def _on_request_headers(self, msg: pb.HttpHeaders) -> wire.ProcessingResponse:
        headers = wire.decode_headers(msg.headers, self._request_headers)
        ev = self.event
        ev.method = headers.get(":method", "")
        ev.path = headers.get(":path", "")
        ev.request_id = headers.get("x-request-id", "")
        ev.labels.update(self._attribution.labels(headers))
        self.processor = processor_for(ev.method, ev.path, self._ctx)
        gov = self._governor
        if gov is not None:
            refusal = self._identify(gov, headers)
            if refusal is not None and not self.observe:
                return self._refuse(gov, refusal)
            if self.observe:  # Envoy does not wait for answers: attribution only, counted
                self._stats.errors["policy_not_enforced_observe_mode"] += 1
        resp = self._request_headers_answer(msg)
        ident = self.identity
        if gov is not None and ident is not None and (ident.key is not None or gov.upstream_key):
            resp = wire.with_request_header_mutation(resp, *gov.upstream_headers())
        return resp

    def _request_headers_answer(self, msg: pb.HttpHeaders) -> wire.ProcessingResponse:
        ev = self.event
        request_only = self.role == "request"
        if self.processor is None:
            ev.endpoint = "unknown"
            self.request_done = True
            reason = None if self.observe else refusal(ev.method, ev.path, self._ctx)
            if reason is not None:
                self.refused = Refusal(404, "refused_path", reason, "invalid_request_error", "unmetered_path")
                self.response_done = True
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

    # -- governance: virtual keys, budgets, rate limits ---------------------------------------

    def _identify(self, gov: Governor, headers: dict[str, str]) -> Refusal | None:
        found = gov.identify(headers)
        if isinstance(found, Refusal):
            return found
        self.identity = found
        gov.apply_labels(found, self.event.labels, self._attribution.unattributed)
        return None

    def _refuse(self, gov: Governor, refusal: Refusal) -> wire.ProcessingResponse:
        """Envoy answers the client; the request never reaches the upstream. The event says why
        nothing was served."""
        self.refused = refusal
        gov.stats.refused[refusal.reason] += 1
        self.request_done = self.response_done = self.response_started = True
        self.event.http_status = refusal.status
        p = self.processor
        if p is not None:
            p.error, p.error_detail = refusal.reason, refusal.message[:500]
            p.response_complete = True
        else:
            self.event.error, self.event.error_detail = refusal.reason, refusal.message[:500]
        log.info("request %s refused (%d %s): %s", self.event.request_id, refusal.status, refusal.reason,
                 refusal.message)
        return wire.immediate_error(refusal.status, refusal.message, error_type=refusal.error_type,
                                    code=refusal.code, headers=refusal.headers)

    def _admit(self, gov: Governor, identity: Identity, p: EndpointProcessor, answer: wire.ProcessingResponse) -> Answer:
        """Reserve the request's worst case; `answer` goes to Envoy if admitted. Returns the
        answer, or a future of it when the ledger is remote."""
        req = p.request
        max_tokens: int | None = None
        if not p.has_output:
            max_tokens = 0  # input tokens only
        else:  # chat, completions, and the Responses API's spelling
            for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
                value = req.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    max_tokens = value
                    break
        ctx = self._ctx

        def prompt_tokens() -> int:
            return ctx.tokenizers.for_model(p.request_model).count(p.prompt_text())

        plan = gov.plan(identity, self.event.labels, p.request_model, prompt_tokens, max_tokens, p.n)
        decision = gov.admit(plan)
        if isinstance(decision, Admission | Refusal):
            return self._decided(gov, decision, answer)
        fut = asyncio.ensure_future(decision)
        return _chain(fut, lambda d: self._decided(gov, d, answer), self._admission_failed, answer)

    def _decided(self, gov: Governor, decision: Admission | Refusal,
                 answer: wire.ProcessingResponse) -> wire.ProcessingResponse:
        if isinstance(decision, Refusal):
            return self._refuse(gov, decision)
        self.admission = decision
        if self._finished:  # the stream ended while the ledger answered: release at once
            gov.settle(decision, self.event)
        return answer

    def _end_stream(self, gov: Governor, p: EndpointProcessor, budget: Budget, served: bytes) -> wire.ProcessingResponse:
        """This chunk's complete events, then an SSE error event (the openai SDK raises APIError
        on it); the next
        message is answered with an immediate response, which makes Envoy reset the stream and
        so the upstream request. What was served is billed (counted from the text seen)."""
        message = (f"Budget exceeded for {budget.scope.name} while streaming: {budget.limit_tokens} tokens per "
                   f"{budget.period}. The response was ended.")
        self.refused = Refusal(429, "budget_exceeded_mid_stream", message, "insufficient_quota", "budget_exceeded")
        gov.stats.refused[self.refused.reason] += 1
        p.error, p.error_detail = self.refused.reason, message
        log.info("request %s: stream ended: %s", self.event.request_id, message)
        error = {"error": {"message": message, "type": "insufficient_quota", "param": None, "code": "budget_exceeded"}}
        return wire.replace_response_chunk(served + b"data: " + orjson.dumps(error) + b"\n\n")

    def _admission_failed(self, exc: BaseException) -> None:
        self._stats.errors["admission"] += 1
        log.error("admission of request %s failed: %r; let through", self.event.request_id, exc)

    def adopt_response_side(self) -> None:
        """This exchange's request was handled by a "request" stream; a "response" stream in
        observability mode now carries it to the end."""
        if self.processor is not None:
            self.processor.strip_usage_chunk = False

    def _on_request_body(self, msg: pb.HttpBody) -> Answer:
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
            self.processor = p = p.delegate
        answer = (wire.continue_response(wire.REQUEST_BODY) if replacement is None
                  else wire.replace_request_body(replacement))
        gov, identity = self._governor, self.identity
        if gov is not None and identity is not None and not self.observe:
            return self._admit(gov, identity, p, answer)
        return answer

    def _on_response_headers(self, msg: pb.HttpHeaders) -> wire.ProcessingResponse:
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

    def _on_response_body(self, msg: pb.HttpBody) -> wire.ProcessingResponse:
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
        if self.refused is not None:  # ended over budget: Envoy resets the stream on this answer
            self.response_done = True
            r = self.refused
            return wire.immediate_error(r.status, r.message, error_type=r.error_type, code=r.code)
        seen = p.live_output_tokens
        replacement = p.on_response_chunk(msg.body, msg.end_of_stream, time.monotonic_ns())
        self._stats.live_output_tokens += p.live_output_tokens - seen
        adm, gov = self.admission, self._governor
        if adm is not None and gov is not None and p.is_sse and p.live_output_tokens > adm.output_reserved and not msg.end_of_stream:
            over = gov.stream_over_budget(adm, p.live_output_tokens)
            if over is not None:
                if replacement is None:  # complete events only: a partial one was not counted
                    end = msg.body.rfind(b"\n\n")
                    replacement = msg.body[:end + 2] if end >= 0 else b""
                return self._end_stream(gov, p, over, replacement)
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
        gov = self._governor
        if self.admission is not None and gov is not None:
            try:
                gov.settle(self.admission, ev)
            except Exception:  # settling must not cost the event
                self._stats.errors["settle"] += 1
                log.exception("settling request %s", ev.request_id)
        return ev


def _chain(fut: asyncio.Future[Admission | Refusal],
           then: Callable[[Admission | Refusal], wire.ProcessingResponse],
           failed: Callable[[BaseException], None],
           fallback: wire.ProcessingResponse) -> asyncio.Future[wire.ProcessingResponse]:
    """A future of `then(result)`; on failure, `failed(exc)` and `fallback` (never an exception
    into the transport)."""
    out: asyncio.Future[wire.ProcessingResponse] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[Admission | Refusal]) -> None:
        if out.cancelled():
            return
        try:
            out.set_result(then(f.result()))
        except BaseException as exc:  # noqa: BLE001 - answered regardless
            failed(exc)
            out.set_result(fallback)

    fut.add_done_callback(done)
    return out
