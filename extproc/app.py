"""The sidecar process: wires settings -> tokenizers, storage, telemetry, gRPC server, admin API.

Start order: sinks before the gRPC listener (no event without a home); stop order: gRPC first
(finish in-flight streams, which emit their events), then flush and close the sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from extproc.admin import build_admin_app, start_admin
from extproc.config import Settings
from extproc.events import EventSink
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService, start_grpc_server
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry

if TYPE_CHECKING:
    import grpc

    from extproc.transport import H2GrpcServer

log = logging.getLogger(__name__)


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop grpc.event_loop asks for (uvloop: the optional extra), busy-polling when
    grpc.busy_poll_us says so."""
    if settings.grpc.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if settings.grpc.busy_poll_us:
        from extproc.transport.busypoll import new_event_loop

        window = settings.grpc.busy_poll_us / 1e6
        return lambda: new_event_loop(window)
    return asyncio.new_event_loop


class Sidecar:
    """One process serving ext_proc with everything in it (grpc.workers: 1, the default); or,
    with grpc.workers > 1, the parent of that many worker processes (extproc/workers/): the
    parent keeps storage, metrics and the admin API, the workers serve the gRPC streams and
    relay their events up. A worker runs this class too, with `relay` as its only sink."""

    def __init__(
        self,
        settings: Settings,
        *,
        extra_sinks: Sequence[EventSink] = (),
        metric_readers: Sequence[Any] = (),
        with_storage: bool = True,
        relay: EventSink | None = None,
        stats: SidecarStats | None = None,
        prices: Any = None,
    ) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else SidecarStats()
        self._extra_sinks = list(extra_sinks)
        self._metric_readers = list(metric_readers)
        self._with_storage = with_storage and relay is None
        self._relay = relay
        self.storage: Any = None
        self.telemetry: Any = None
        self.sinks: list[EventSink] = []
        self.grpc_server: H2GrpcServer | grpc.aio.Server | None = None
        self.grpc_port = 0
        self.admin_port = 0
        self._admin: web.AppRunner | None = None
        self.service: ExtProcService | None = None
        self.workers: Any = None  # WorkerPool when grpc.workers > 1
        self._sweeper: asyncio.Task | None = None
        self.pricing: Any = None  # governance.stamp.PricingStage (main process only)
        self.price_book: Any = None  # governance.pricing.PriceBook from pricing.file
        # set on SIGTERM: the admin /readyz answers 503 from then on
        self.draining = False
        # policy.file: virtual keys, budgets, rate limits (extproc.governance); `prices` is a
        # price book with list_cost_micros, for budgets in USD
        self._prices = prices
        self.governance: Any = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # what did start is stopped: storage closed (chDB: one data directory per process),
            # workers and listeners gone
            with contextlib.suppress(Exception):
                await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        s = self.settings
        # The ClickHouse thread's Python work (Arrow columns, client) competes for the GIL; the
        # default 5 ms switch interval turned into request latency spikes (bench: p99 at 10
        # clients 14.4 -> 10.2 ms, RPS 2420 -> 2961 with 0.5 ms).
        sys.setswitchinterval(0.0005)
        if s.pricing.file:
            from extproc.governance.pricing import load_pricing

            self.price_book = load_pricing(s.pricing.file)  # refused before anything listens
        if s.policy.file:  # a bad policy file stops the start before storage is opened
            from extproc.governance.runtime import Governance

            self.governance = Governance(s, prices=self._prices or _LivePrices(self))
        if self._relay is not None:
            self.sinks.append(self._relay)
        else:
            await self._start_sinks()
        for sink in self.sinks:
            await sink.start()
        if s.policy.file:
            await self._start_governance()
        if s.grpc.workers > 1 and self._relay is None:
            from extproc.workers import WorkerPool

            self.workers = WorkerPool(s, self.sinks, self.stats)
            self.grpc_port = await self.workers.start()
        else:
            await self._start_grpc()
        if self._relay is not None:
            log.info("worker serving ext_proc on %s (%s)", s.grpc.listen,
                     "connections handed over by the main process" if s.grpc.transport == "h2" else "shared port")
            return
        await self._start_admin()
        log.info("ext_proc gRPC on %s (port %d, %s transport%s), admin on http://%s:%d", s.grpc.listen,
                 self.grpc_port, s.grpc.transport, f", {s.grpc.workers} worker processes" if self.workers else "",
                 s.admin.host, self.admin_port)

    async def _start_sinks(self) -> None:
        s = self.settings
        from extproc.governance.stamp import PricingStage

        book = self.price_book
        self.pricing = PricingStage(book)
        self.sinks.append(self.pricing)  # first: everything after it sees the priced event
        if self._with_storage:
            from extproc.storage import open_storage

            self.storage = await open_storage(s)
            if book is not None:
                await self.storage.sync_pool_rates(book)
            self.sinks.append(self.storage.sink())
        from extproc.telemetry import UsageMetrics

        self.telemetry = UsageMetrics.from_settings(
            s, self.stats, storage=self.storage, extra_readers=self._metric_readers,
            pricing=self.pricing.cost_usd if book is not None else None)
        self.sinks.append(self.telemetry)
        self.sinks.extend(self._extra_sinks)

    async def _start_governance(self) -> None:
        await self.governance.start(self.storage)
        if self.telemetry is not None:
            from extproc.governance.metrics import register

            register(self.telemetry.provider.get_meter("extproc.governance"), self.governance)

    async def _start_grpc(self) -> None:
        s = self.settings
        tokenizers = TokenizerRegistry(s.tokenizer.default_encoding, s.tokenizer.models)
        await asyncio.to_thread(tokenizers.warm)
        service = ExtProcService(
            Attribution(s.attribution, self.stats),
            ProcessorContext(tokenizers, force_include_usage=s.usage.force_include_usage,
                             unknown_post=s.metering.unknown_post,
                             path_prefixes=tuple(s.metering.path_prefixes),
                             max_sse_event_bytes=s.metering.max_sse_event_bytes,
                             max_request_body_bytes=s.metering.max_request_body_bytes,
                             max_output_text_chars=s.metering.max_output_text_chars),
            self.sinks,
            self.stats,
            governor=self.governance.governor if self.governance is not None else None,
        )
        if s.tokenizer.tokenize_url:
            from extproc.recount import Recounter

            service.recounter = Recounter(s.tokenizer.tokenize_url, service._emit, self.stats,
                                          timeout_s=s.tokenizer.tokenize_timeout_ms / 1000)
        self.service = service
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="extproc-sweep")
        worker = self._relay is not None
        if s.grpc.transport == "h2":
            from extproc.transport import start_h2_server

            # an h2 worker listens nowhere: the main process hands it connections
            self.grpc_server, self.grpc_port = await start_h2_server(
                service.open_stream, None if worker else s.grpc.listen)
        else:
            # a grpcio worker shares the port with its siblings (SO_REUSEPORT)
            self.grpc_server, self.grpc_port = await start_grpc_server(service, s.grpc.listen, reuse_port=worker)

    async def _start_admin(self) -> None:
        s = self.settings
        app = build_admin_app(
            self.stats,
            report=self.storage.report if self.storage else None,
            flush=self.force_flush,
            metrics=self.telemetry.render_prometheus if self.telemetry.prometheus else None,
            extra_stats=self._storage_stats,
            worker_stats=self.workers.stats_view if self.workers is not None else None,
            reprice=self.reprice if self.storage else None,
            ready=lambda: not self.draining,
            drain_envoy=self._drain_envoy,
            budgets=self.governance.report if self.governance is not None else None,
        )
        self._admin, self.admin_port = await start_admin(app, s.admin.host, s.admin.port)

    async def reprice(self, since: Any) -> dict[str, Any]:
        """Reload the pricing file (a corrected price), price new events with it, and re-price
        the stored events from since's hour on."""
        if not self.settings.pricing.file:
            raise ValueError("no pricing file configured (pricing.file, --pricing FILE)")
        if self.storage is None:
            raise ValueError("no storage configured")
        from extproc.governance.pricing import load_pricing

        book = await asyncio.to_thread(load_pricing, self.settings.pricing.file)
        self.pricing.book = self.price_book = book
        await self.force_flush()  # what was priced with the old book is stored before the rewrite
        return await self.storage.reprice(book, since)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.service.sweep_pending()

    async def _drain_envoy(self, timeout_s: float, min_s: float) -> Any:
        from extproc.envoy_drain import drain_envoy

        return await drain_envoy(self.settings.admin.envoy_admin_url, timeout_s=timeout_s, min_s=min_s)

    def open_connections(self) -> int | None:
        """Envoy's connections to this sidecar (h2 transport), None where not counted (grpcio)."""
        if self.settings.grpc.transport != "h2":
            return None
        if self.workers is not None:
            return sum(max(0, w.open_connections) for w in self.workers.workers)
        return len(self.grpc_server.connections) if self.grpc_server is not None else 0

    async def wait_for_envoy_to_leave(self, timeout_s: float) -> bool:
        """Keep serving until Envoy has closed its connections (grpcio: no stream is active),
        for up to timeout_s: a GOAWAY while Envoy still takes requests would leave them
        unmetered (Envoy fails open). False when the timeout ended the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            n = self.open_connections()
            if n == 0 or (n is None and self.stats.streams_opened == self.stats.streams_closed):
                log.info("Envoy's connections are closed: stopping")
                return True
            await asyncio.sleep(0.05)
        log.warning("Envoy still connected after grpc.drain_timeout_ms (%d connections): stopping anyway",
                    self.open_connections() or 0)
        return False

    def _storage_stats(self) -> dict[str, Any]:
        return self.storage.stats() if self.storage is not None else {}

    async def force_flush(self, timeout: float = 30.0) -> bool:
        # workers first: what they emitted must have reached these sinks
        relayed = await self.workers.force_flush(timeout) if self.workers is not None else True
        results = [await sink.force_flush(timeout) for sink in self.sinks]
        return relayed and all(results)

    async def stop(self, grace: float = 10.0) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.workers is not None:
            await self.workers.stop(grace)  # their last events arrive before the sinks close
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.service is not None:
            self.service.sweep_pending(max_age_s=0)  # nothing waits for a stream that cannot come
            if self.service.recounter is not None:
                await self.service.recounter.close()  # events waiting for /tokenize reach the sinks
        if self._admin is not None:
            await self._admin.cleanup()
        if self.governance is not None:
            await self.governance.stop()  # settlements in flight reach the ledger first
        for sink in self.sinks:
            try:
                await sink.shutdown(30.0)
            except Exception:
                log.exception("shutting down sink %r", sink)
        if self.storage is not None:
            await self.storage.close()
        if self._relay is not None:
            log.info("worker stopped: %d events emitted to the main process", self.stats.events_emitted)
            return
        st = self.storage.stats() if self.storage is not None else {}
        log.info(
            "stopped: %d events emitted, %s inserted, %s left in the spool for the next start, %s dropped",
            self.stats.events_emitted, st.get("events_inserted", "n/a"), st.get("backlog", "n/a"),
            st.get("events_dropped", "n/a"),
        )

    async def run_until_signal(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.draining = True
        log.info("signal received: readiness false; draining streams and flushing events")
        if self.settings.grpc.drain_timeout_ms > 0 and self._relay is None:
            await self.wait_for_envoy_to_leave(self.settings.grpc.drain_timeout_ms / 1000)
        await self.stop()


class _LivePrices:
    """Budgets in money price with the book in use, also after `extproc reprice` swapped it."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def list_cost_micros(self, model: str, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                         reasoning_tokens: int, at_unix_nano: int) -> int | None:
        book = self._sidecar.price_book
        if book is None:
            return None
        return book.list_cost_micros(model, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                                     completion_tokens=completion_tokens, reasoning_tokens=reasoning_tokens,
                                     at_unix_nano=at_unix_nano)
