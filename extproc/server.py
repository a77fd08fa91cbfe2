"""The ext_proc gRPC stream loop: one Exchange per stream, one UsageEvent per Exchange.

No I/O happens here except answering Envoy and handing finished events to sinks (which only
enqueue). Any failure inside a message is logged, counted, flagged on the event and answered with
CONTINUE: metering must never break the user's request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from extproc import wire
from extproc.events import EventSink, UsageEvent
from extproc.exchange import Exchange
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
    ) -> None:
        self._attribution = attribution
        self._ctx = ctx
        self._sinks = list(sinks)
        self.stats = stats

    async def process(
        self, requests: AsyncIterator[wire.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.ProcessingResponse]:
        stats = self.stats
        stats.streams_opened += 1
        exchange = Exchange(self._attribution, self._ctx, stats)
        try:
            async for req in requests:
                kind = req.WhichOneof("request")
                if kind is None:
                    stats.errors["empty_message"] += 1
                    continue
                stats.messages[kind] += 1
                if req.observability_mode:
                    exchange.observe = True
                try:
                    resp = exchange.handle(kind, getattr(req, kind))
                except Exception as exc:
                    stats.errors[kind] += 1
                    log.exception("handling %s for request %s", kind, exchange.event.request_id)
                    exchange.flag_internal_error(kind, exc)
                    resp = wire.continue_response(kind)
                if not req.observability_mode:
                    yield resp
                if exchange.done:
                    # Close our side now: in observability mode Envoy would otherwise hold the
                    # stream open until deferred_close_timeout.
                    break
        except asyncio.CancelledError:
            stats.streams_cancelled += 1
            raise
        finally:
            stats.streams_closed += 1
            self._emit(exchange.finish())

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


async def start_grpc_server(service: ExtProcService, listen: str) -> tuple[grpc.aio.Server, int]:
    """Bind `listen` (host:port or unix:/path). Returns the server and the bound port (0 for unix)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((wire.generic_handler(service.process),))
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot bind gRPC listener {listen}")
    await server.start()
    return server, port
