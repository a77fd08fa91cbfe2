"""Storage: the one ClickHouse client of the process, its thread, the sink and the reports.

Every ClickHouse call runs on one dedicated thread: chDB hosts a single engine per process and
is safest used from one thread, and the gRPC event loop never waits on a query. The client is
created (and the migrations applied) lazily on that thread, so a sidecar whose ClickHouse
server is down still starts: events go to the spool until the server answers.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from extproc.config import Settings
from extproc.storage import pbinput
from extproc.storage.batcher import BatchProcessor
from extproc.storage.client import build_client, parse_dsn
from extproc.storage.columns import ColumnStats
from extproc.storage.migrations import migrate
from extproc.storage.reports import build_query, run_report
from extproc.storage.sink import BatchWriter, ClickHouseWriter
from extproc.storage.spool import Spool

log = logging.getLogger(__name__)
T = TypeVar("T")


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = parse_dsn(settings.storage.dsn, settings.storage.database)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="extproc-clickhouse")
        self._client: Any = None
        self._stuck: Future[Any] | None = None
        self._sink: BatchProcessor | None = None
        self._closed = False
        self.column_stats = ColumnStats()
        self.migrations_applied: list[str] = []
        self._schema_tmp: tempfile.TemporaryDirectory[str] | None = None  # chdb://memory

    # ---- the ClickHouse thread ------------------------------------------------------------

    def _connected(self) -> Any:
        """On the ClickHouse thread: the client, connected and migrated."""
        if self._client is None:
            client, _ = build_client(self.settings.storage)
            try:
                self.migrations_applied = migrate(client, self.settings)
            except Exception:
                client.close()
                raise
            self._client = client
        return self._client

    def submit(self, fn: Callable[[Any], T], timeout: float | None = None) -> Future[T]:
        """Queue fn(client) on the ClickHouse thread (from any thread but that one).

        A call that timed out keeps the thread busy: new calls first wait (up to timeout) for
        it rather than queueing up behind it, so retries cannot pile up duplicate inserts."""
        if self._closed:
            raise RuntimeError("storage is closed")
        stuck = self._stuck
        if stuck is not None and not stuck.done():
            try:
                stuck.exception(timeout)
            except TimeoutError:
                raise TimeoutError("ClickHouse is still busy with a call that timed out") from None
        return self._executor.submit(lambda: fn(self._connected()))

    def wait(self, future: Future[T], timeout: float | None = None) -> T:
        try:
            return future.result(timeout)
        except TimeoutError:
            if not future.done():
                self._stuck = future
            raise

    def call(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """Run fn(client) on the ClickHouse thread from another thread; raises TimeoutError."""
        return self.wait(self.submit(fn, timeout), timeout)

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Run fn(client) on the ClickHouse thread from the event loop."""
        if self._closed:
            raise RuntimeError("storage is closed")
        return await asyncio.wrap_future(self._executor.submit(lambda: fn(self._connected())))

    # ---- API ------------------------------------------------------------------------------

    def writer(self) -> BatchWriter:
        return ClickHouseWriter(
            self,
            timeout=self.settings.batch.insert_timeout_ms / 1000,
            max_value_bytes=self.settings.storage.max_value_bytes,
            stats=self.column_stats,
            insert_format=self.settings.storage.insert_format,
            protobuf_settings=self._protobuf_settings(),
        )

    def _protobuf_settings(self) -> dict[str, str] | None:
        """chDB reads the UsageEvent schema from a file in its data directory (a temporary one
        for chdb://memory); a server gets it inline (None: the writer's default)."""
        if self.target.kind != "chdb":
            return None
        if self.target.path is not None:
            directory = Path(self.target.path).resolve() / "format_schemas"
            directory.mkdir(parents=True, exist_ok=True)
        else:
            if self._schema_tmp is None:
                self._schema_tmp = tempfile.TemporaryDirectory(prefix="extproc-schema-")
            directory = Path(self._schema_tmp.name)
        path = directory / "usage_event.proto"
        if not path.exists() or path.read_text() != pbinput.SCHEMA:
            path.write_text(pbinput.SCHEMA)
        return pbinput.file_settings(str(path))

    def sink(self) -> BatchProcessor:
        """The EventSink (one per Storage). The caller awaits start() and shutdown()."""
        if self._sink is None:
            sp = self.settings.spool
            spool = Spool(Path(sp.dir), sp.fsync, sp.segment_bytes, sp.write_interval_ms)
            self._sink = BatchProcessor(self.writer(), spool, self.settings.batch)
        return self._sink

    @property
    def label_names(self) -> list[str]:
        return list(self.settings.attribution.headers.values())

    async def report(
        self,
        name: str,
        by: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        filters: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of a named report (extproc/sql/queries/<name>.sql); raises ReportError (a
        ValueError) on an unknown report, dimension, filter or limit."""
        kwargs: dict[str, Any] = dict(
            by=by, since=since, until=until, limit=limit, filters=filters,
            label_names=self.label_names,
        )
        build_query(name, **kwargs)  # validate here: bad input never reaches the thread
        return await self.run(lambda c: run_report(c, name, **kwargs))

    async def sync_pool_rates(self, book: Any) -> int:
        """Write the price book's GPU pool rates (governance.pricing.PriceBook) for the reports."""
        from extproc.storage.rates import sync_rates

        return await self.run(lambda c: sync_rates(c, book))

    async def reprice(self, book: Any, since: datetime) -> dict[str, Any]:
        """Apply this price book to the events from since's hour on (storage/reprice.py)."""
        from extproc.storage.reprice import reprice

        await self.sync_pool_rates(book)
        ttl = self.settings.storage.ttl_days
        return (await self.run(lambda c: reprice(c, book, since, ttl_days=ttl))).as_dict()

    async def migrate(self) -> list[str]:
        await self.run(lambda c: None)  # the first connection migrates
        return await self.run(lambda c: migrate(c, self.settings)) or self.migrations_applied

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self._sink.stats() if self._sink is not None else {}
        out.update(
            values_truncated=self.column_stats.values_truncated,
            values_repaired=self.column_stats.values_repaired,
            times_defaulted=self.column_stats.times_defaulted,
        )
        return out

    # the sink's counters, read by telemetry from this object (None before sink() was called)
    def _sink_value(name: str) -> property:  # type: ignore[misc]
        return property(lambda self: getattr(self._sink, name) if self._sink is not None else None)

    queue_depth = _sink_value("queue_depth")
    backlog = _sink_value("backlog")
    spool_bytes = _sink_value("spool_bytes")
    spool_oldest_age_s = _sink_value("spool_oldest_age_s")
    events_inserted = _sink_value("events_inserted")
    events_spooled = _sink_value("events_spooled")
    events_replayed = _sink_value("events_replayed")
    events_dead_lettered = _sink_value("events_dead_lettered")
    events_dropped = _sink_value("events_dropped")
    insert_failures = _sink_value("insert_failures")
    last_flush_seconds = _sink_value("last_flush_seconds")
    del _sink_value

    async def close(self, timeout: float = 30.0) -> None:
        """Shut the sink down (if started and still running), then close client and thread."""
        if self._sink is not None and self._sink._state == "running":
            await self._sink.shutdown(timeout)
        await asyncio.to_thread(self.close_sync)

    aclose = close

    def close_sync(self) -> None:
        """Close the client and its thread (synchronous callers; shut the sink down first)."""
        if self._closed:
            return
        self._closed = True
        client = self._client

        def _close() -> None:
            if client is not None:
                client.close()

        self._executor.submit(_close)
        self._executor.shutdown(wait=True)
        self._client = None
        if self._schema_tmp is not None:
            self._schema_tmp.cleanup()


async def open_storage(settings: Settings) -> Storage:
    """Create the client on its thread and apply migrations. An unreachable ClickHouse server
    is logged, not fatal (the sink spools until it answers); a chDB failure is fatal."""
    storage = Storage(settings)
    try:
        await storage.run(lambda c: None)
    except Exception as exc:
        if storage.target.kind == "chdb":
            await asyncio.to_thread(storage.close_sync)
            raise
        log.warning(
            "ClickHouse at %s is not reachable (%s); starting anyway: usage events are spooled "
            "and inserted once it answers", storage.target.redacted, exc,
        )
    return storage


def open_storage_sync(settings: Settings) -> Storage:
    """For synchronous callers (the CLI's migrate / report commands)."""
    storage = Storage(settings)
    try:
        storage.call(lambda c: None)
    except Exception:
        storage.close_sync()
        raise
    return storage
