"""The ext_proc gRPC stream loop: one StreamSession per stream, one Exchange per HTTP request
(two streams share it in hybrid mode), one UsageEvent per Exchange.

No I/O happens here except answering Envoy and handing finished events to sinks (which only
enqueue). Any failure inside a message is logged, counted, flagged on the event and answered with
CONTINUE: metering must never break the user's request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from extproc import wire
from extproc.envoy_config import ROLE_METADATA
from extproc.events import EventSink, UsageEvent
from extproc.exchange import CORRELATION_HEADER, CORRELATION_ONLY, Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.stats import SidecarStats

log = logging.getLogger(__name__)


class ExtProcService:
    def __init__(
        self,
        attribution: Attribution,
        ctx: ProcessorContext,
        sinks: Sequence[EventSink],
        stats: SidecarStats,
        governor: Any = None,
    ) -> None:
        self._attribution = attribution
        self._ctx = ctx
        self._sinks = list(sinks)
        self.stats = stats
        # extproc.governance Governor: keys, budgets, rate limits (None: no policy file)
        self.governor = governor
        # Hybrid mode: exchanges whose request stream is done, waiting for their response
        # stream, by correlation id, with the monotonic time they were registered.
        self.pending: dict[str, tuple[float, Exchange]] = {}

    def open_stream(self, metadata: Iterable[tuple[str, str]] = ()) -> StreamSession:
        """A session for one ext_proc stream. Transports that can call it inline (the h2
        transport) skip the async-generator hop per message."""
        return StreamSession(self, _role(metadata))

    async def process(
        self, requests: AsyncIterator[wire.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.ProcessingResponse]:
        """The grpc.aio handler: the same session, driven by an async iterator."""
        session = self.open_stream(_metadata(context))
        try:
            async for req in requests:
                resp = session.on_message(req)
                if isinstance(resp, asyncio.Future):  # an answer that waits on the budget ledger
                    resp = await resp
                if resp is not None:
                    yield resp
                if session.finished:
                    # Close our side now: in observability mode Envoy would otherwise hold the
                    # stream open until deferred_close_timeout.
                    break
        finally:
            session.close()

    def _adopt(self, msg) -> Exchange | None:  # noqa: ANN001
        """The exchange of this response stream's request stream; None when there is none
        (an unmetered path, or the request filter failed open): then this stream meters alone."""
        cid = wire.decode_headers(msg.headers, CORRELATION_ONLY).get(CORRELATION_HEADER)
        entry = self.pending.pop(cid, None) if cid else None
        if entry is None:
            return None
        exchange = entry[1]
        exchange.adopt_response_side()
        return exchange

    def sweep_pending(self, max_age_s: float = 60.0) -> int:
        """Finish exchanges whose response stream never came (its filter failed open, or Envoy
        reset it before the response): the request is still accounted for, flagged."""
        now = time.monotonic()
        expired = [cid for cid, (t, _) in self.pending.items() if now - t > max_age_s]
        for cid in expired:
            _, exchange = self.pending.pop(cid)
            p = exchange.processor
            if p is not None and not p.error:
                p.error, p.error_detail = "response_not_observed", "no response stream arrived for this request"
            self.stats.errors["response_not_observed"] += 1
            self._emit(exchange.finish())
        return len(expired)

    def _emit(self, event: UsageEvent | None) -> None:
        if event is None:
            return
        self.stats.events_emitted += 1
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception:  # a sink bug must not lose the other sinks' copy
                self.stats.errors["sink_emit"] += 1
                log.exception("sink %r failed to take event %s", sink, event.event_id)


class StreamSession:
    """One ext_proc stream: each message in, its answer out (None when none is due), and at
    close the event, exactly once, whatever ended the stream."""

    __slots__ = ("_service", "role", "exchange", "_closed")

    def __init__(self, service: ExtProcService, role: str) -> None:
        self._service = service
        self.role = role
        self.exchange = Exchange(service._attribution, service._ctx, service.stats, service.governor)
        self.exchange.role = role
        self._closed = False
        service.stats.streams_opened += 1

    @property
    def finished(self) -> bool:
        ex = self.exchange
        return ex.request_done if self.role == "request" else ex.response_done

    def on_message(self, req: wire.ProcessingRequest) -> wire.ProcessingResponse | asyncio.Future | None:
        """The answer, None when none is due, or (admission against a remote ledger) a future
        of the answer: the transport sends it when done, in order."""
        service = self._service
        stats = service.stats
        kind = req.WhichOneof("request")
        if kind is None:
            stats.errors["empty_message"] += 1
            return None
        stats.messages[kind] += 1
        msg = getattr(req, kind)
        observe = req.observability_mode
        if self.role == "response" and kind == wire.REQUEST_HEADERS:
            adopted = service._adopt(msg)
            if adopted is not None:
                # The request stream already read these headers; only answer (observability
                # mode ignores answers, but a misconfigured sync response filter must not hang).
                self.exchange = adopted
                return None if observe else wire.continue_response(kind)
        exchange = self.exchange
        exchange.observe = observe
        if kind == wire.RESPONSE_BODY and not exchange.response_started:
            exchange.response_code = wire.response_code(req)
        try:
            resp = exchange.handle(kind, msg)
        except Exception as exc:
            stats.errors[kind] += 1
            log.exception("handling %s for request %s", kind, exchange.event.request_id)
            exchange.flag_internal_error(kind, exc)
            resp = wire.continue_response(kind)
        if self.role == "request" and kind == wire.REQUEST_HEADERS and exchange.correlation_id:
            # Before answering: the response stream starts once Envoy has our answer.
            service.pending[exchange.correlation_id] = (time.monotonic(), exchange)
        if observe:
            return None
        if isinstance(resp, asyncio.Future) and self.role == "request" and exchange.correlation_id:
            resp.add_done_callback(lambda _: self._unpair_refused())
        elif exchange.refused is not None:
            self._unpair_refused()
        return resp

    def _unpair_refused(self) -> None:
        """A refused request gets no response stream: this stream emits its event."""
        ex = self.exchange
        if ex.refused is not None and ex.correlation_id:
            self._service.pending.pop(ex.correlation_id, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stats = self._service.stats
        stats.streams_closed += 1
        # Cancelled by Envoy (client gone, reset) or half-closed early: either way, unfinished.
        if not self.finished:
            stats.streams_cancelled += 1
        # A request stream's exchange is finished by its response stream, or by the sweep;
        # unmetered paths are counted by the response stream alone.
        if self.role != "request" or self.exchange.refused is not None:
            self._service._emit(self.exchange.finish())


def _metadata(context: grpc.aio.ServicerContext) -> Iterable[tuple[str, str]]:
    try:
        return context.invocation_metadata() or ()
    except Exception:  # a context without metadata support
        return ()


def _role(metadata: Iterable[tuple[str, str]]) -> str:
    """Hybrid mode tags each filter's streams with gRPC metadata; plain modes send none."""
    for key, value in metadata:
        if key == ROLE_METADATA:
            return value if value in ("request", "response") else ""
    return ""


async def start_grpc_server(service: ExtProcService, listen: str,
                            reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """Bind `listen` (host:port or unix:/path); `reuse_port`: SO_REUSEPORT, the port shared with
    sibling worker processes. Returns the server and the bound port (0 for unix)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    server.add_generic_rpc_handlers((wire.generic_handler(service.process),))
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot bind gRPC listener {listen}")
    await server.start()
    return server, port
