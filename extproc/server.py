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
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from extproc import wire
from extproc._pb import ext_proc_wire_pb2 as pb
from extproc.events import EventSink, TokenSource, UsageEvent
from extproc.exchange import CORRELATION_HEADER, CORRELATION_ONLY, ROLE_METADATA, Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.stats import SidecarStats

if TYPE_CHECKING:
    from extproc.recount import Recounter

log = logging.getLogger(__name__)

# Hybrid response streams that metered alone, remembered for the sweep's age at most.
_MAX_METERED_ALONE = 100_000


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
        # The same exchanges by (x-request-id, path): a response stream without the correlation
        # header (Envoy failed the request filter open before applying our answer) finds its
        # request by these.
        self._pending_by_request: dict[tuple[str, str], list[str]] = {}
        # vLLM's /tokenize, asked after the request for an event only estimated (off the hot
        # path; the event waits for it, bounded by its timeout).
        self.recounter: Recounter | None = None
        # Requests whose response stream metered alone, by (x-request-id, path): their request
        # stream, registered late or waiting for the sweep, must not make a second event.
        self._metered_alone: dict[tuple[str, str], list[tuple[float, dict[str, str]]]] = {}

    def open_stream(self, metadata: Iterable[tuple[str, str]] = ()) -> StreamSession:
        """A session for one ext_proc stream (extproc.transport.session.SessionFactory): both
        transports drive it message by message."""
        return StreamSession(self, _role(metadata))

    def _adopt(self, msg: pb.HttpHeaders) -> Exchange | None:
        """The exchange of this response stream's request stream; None when there is none
        (an unmetered path, or the request filter failed open): then this stream meters alone."""
        cid = wire.decode_headers(msg.headers, CORRELATION_ONLY).get(CORRELATION_HEADER)
        if not cid:
            return None
        # Not found: taken by a response stream without the header that shares its request id
        # and labels; adopt_by_request_id then pairs this one the same way.
        entry = self._pop_pending(cid)
        if entry is None:
            return None
        exchange = entry[1]
        exchange.adopt_response_side()
        return exchange

    def register_pending(self, exchange: Exchange) -> None:
        """A request stream read its request headers: its response stream comes later."""
        ev = exchange.event
        if self._metered_alone_already(ev):  # the response stream came first
            return
        cid = exchange.correlation_id
        self.pending[cid] = (time.monotonic(), exchange)
        if ev.request_id:
            self._pending_by_request.setdefault((ev.request_id, ev.path), []).append(cid)

    def adopt_by_request_id(self, alone: Exchange) -> Exchange | None:
        """A response stream without a known correlation header: the request filter's stream
        failed open (message_timeout, reset) before Envoy applied our header. Its exchange is
        the pending one with the same x-request-id, path and labels, if exactly one is; else
        this stream meters alone and the request stream, when it comes or is swept, is not
        counted again."""
        ev = alone.event
        if not ev.request_id or alone.processor is None:
            return None
        key = (ev.request_id, ev.path)
        labels = dict(ev.labels)
        matches = [cid for cid in self._pending_by_request.get(key, ())
                   if dict(self.pending[cid][1].event.labels) == labels]
        if len(matches) == 1:
            cid = matches[0]
            _, exchange = self._pop_pending(cid)  # type: ignore[misc]
            self.stats.hybrid_paired_by_request_id += 1
            exchange.adopt_response_side()
            return exchange
        if len(self._metered_alone) < _MAX_METERED_ALONE:
            self._metered_alone.setdefault(key, []).append((time.monotonic(), labels))
        else:  # bounded: past it a late request stream may be counted again (logged, counted)
            self.stats.errors["hybrid_unpaired_overflow"] += 1
            log.warning("request %s: too many unpaired hybrid response streams; not remembered", ev.request_id)
        return None

    def _pop_pending(self, cid: str) -> tuple[float, Exchange] | None:
        entry = self.pending.pop(cid, None)
        if entry is not None and self._pending_by_request:
            ev = entry[1].event
            key = (ev.request_id, ev.path)
            cids = self._pending_by_request.get(key)
            if cids is not None:
                if cid in cids:
                    cids.remove(cid)
                if not cids:
                    del self._pending_by_request[key]
        return entry

    def _metered_alone_already(self, ev: UsageEvent) -> bool:
        """This request stream's response stream metered it alone: drop it (counted, logged)."""
        if not (ev.request_id and self._metered_alone and self._take_alone((ev.request_id, ev.path), ev.labels)):
            return False
        self.stats.hybrid_duplicates_dropped += 1
        log.info("request %s: its response stream metered it alone; request stream not counted", ev.request_id)
        return True

    def _take_alone(self, key: tuple[str, str], labels: Mapping[str, str]) -> bool:
        seen = self._metered_alone.get(key)
        if not seen:
            return False
        want = dict(labels)
        for i, (_, got) in enumerate(seen):
            if got == want:
                del seen[i]
                if not seen:
                    del self._metered_alone[key]
                return True
        return False

    def sweep_pending(self, max_age_s: float = 60.0) -> int:
        """Finish exchanges whose response stream never came (its filter failed open, or Envoy
        reset it before the response): the request is still accounted for, flagged."""
        now = time.monotonic()
        expired = [cid for cid, (t, _) in self.pending.items() if now - t > max_age_s]
        for cid in expired:
            _, exchange = self._pop_pending(cid)  # type: ignore[misc]
            if self._metered_alone_already(exchange.event):
                continue
            p = exchange.processor
            if p is not None and not p.error:
                p.error, p.error_detail = "response_not_observed", "no response stream arrived for this request"
            self.stats.errors["response_not_observed"] += 1
            self.finish(exchange)
        # What pairs nothing any more: a request stream comes within moments of its response
        # stream, never after the sweep's age.
        for key in [k for k, seen in self._metered_alone.items() if now - seen[-1][0] > max_age_s]:
            del self._metered_alone[key]
        return len(expired)

    def finish(self, exchange: Exchange) -> None:
        """The exchange's event to the sinks, by way of vLLM's /tokenize when it was estimated."""
        event = exchange.finish()
        if (event is not None and self.recounter is not None and event.token_source == TokenSource.TOKENIZER_ESTIMATE
                and exchange.processor is not None):
            try:
                request = exchange.processor.recount_request()
            except Exception:  # a bug here must not lose the event
                log.exception("building the /tokenize request for %s", event.request_id)
                request = None
            if request is not None:
                self.recounter.submit(event, request)
                return
        self._emit(event)

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

    def on_message(self, req: wire.ProcessingRequest) -> wire.ProcessingResponse | asyncio.Future[Any] | None:
        """The answer, None when none is due, or (admission against a remote ledger) a future
        of the answer: the transport sends it when done, in order."""
        service = self._service
        stats = service.stats
        kind = req.WhichOneof("request")
        if kind is None:
            stats.errors["empty_message"] += 1
            return None
        stats.messages[kind] += 1
        observe = req.observability_mode
        if self.role == "response" and kind == wire.REQUEST_HEADERS:
            adopted = service._adopt(req.request_headers)
            if adopted is not None:
                # The request stream already read these headers; only answer (observability
                # mode ignores answers, but a misconfigured sync response filter must not hang).
                self.exchange = adopted
                return None if observe else wire.continue_response(kind)
        exchange = self.exchange
        exchange.observe = observe
        try:
            resp = exchange.handle_request(req, kind)
        except Exception as exc:
            stats.errors[kind] += 1
            log.exception("handling %s for request %s", kind, exchange.event.request_id)
            exchange.flag_internal_error(kind, exc)
            resp = wire.continue_response(kind)
        if kind == wire.REQUEST_HEADERS:
            if self.role == "request" and exchange.correlation_id:
                # Before answering: the response stream starts once Envoy has our answer.
                service.register_pending(exchange)
            elif self.role == "response" and exchange.processor is not None:
                paired = service.adopt_by_request_id(exchange)
                if paired is not None:
                    self.exchange = paired
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
            self._service._pop_pending(ex.correlation_id)

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
            self._service.finish(self.exchange)


def _role(metadata: Iterable[tuple[str, str]]) -> str:
    """Hybrid mode tags each filter's streams with gRPC metadata; plain modes send none."""
    for key, value in metadata:
        if key == ROLE_METADATA:
            return value if value in ("request", "response") else ""
    return ""


async def start_grpc_server(service: ExtProcService, listen: str, reuse_port: bool = False) -> tuple[Any, int]:
    """The grpcio transport serving `service` (extproc.transport.grpcio_server)."""
    from extproc.transport.grpcio_server import start_grpc_server as start

    return await start(service.open_stream, listen, reuse_port)


if TYPE_CHECKING:
    from extproc.transport.session import SessionFactory

    def _sessions(service: ExtProcService) -> SessionFactory:
        return service.open_stream  # checked by mypy: the transports drive these sessions
