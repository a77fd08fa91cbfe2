"""Delivering batches to the writer (ClickHouse) until they are stored: pipelined inserts,
retries with backoff under the same dedup token, isolation of the rows ClickHouse rejects.
Runs on the batcher's worker thread; emit() never waits on anything here.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from extproc.storage.batch_source import Batch
from extproc.storage.ratelog import LogLimiter
from extproc.storage.sink import BatchWriter, DataError, PipelinedWriter, batch_token
from extproc.storage.spool import Spool

log = logging.getLogger("extproc.storage.batcher")

_FAILURE_LOG_EVERY_S = 30.0

Waiter = Callable[[], None]


@dataclass
class Ready:
    """A batch with its dedup token and (pipelined writers) converted, ready to insert."""

    batch: Batch
    token: str
    prepared: Any = None
    marked: bool = False
    started: float = 0.0


class Delivery:
    def __init__(
        self,
        writer: BatchWriter,
        spool: Spool,
        retry_initial_s: float,
        retry_max_s: float,
        on_stored: Callable[[Batch], None],
        limited: LogLimiter,
    ) -> None:
        self.writer = writer
        self._spool = spool
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._on_stored = on_stored
        self._log_limited = limited
        self.deadline = float("inf")  # shutdown's: retries stop waiting past it
        self._last_failure_log = 0.0
        self.events_inserted = 0
        self.events_dead_lettered = 0
        self.batches_inserted = 0
        self.insert_failures = 0
        self.last_flush_seconds = 0.0
        self.last_flush_time = 0.0
        self.last_error = ""

    @property
    def writer(self) -> BatchWriter:
        return self._writer

    @writer.setter
    def writer(self, writer: BatchWriter) -> None:
        self._writer = writer
        # the next batch is converted while this one is inserted, when the writer can split
        self._pipeline: PipelinedWriter | None = (
            writer if isinstance(writer, PipelinedWriter) else None)

    @property
    def pipelined(self) -> bool:
        return self._pipeline is not None

    def prepare(self, batch: Batch) -> Ready:
        """Convert for the writer (pipelined writers); a data error is isolated in deliver."""
        payloads = [p for _, p in batch.records]
        ready = Ready(batch, batch_token(payloads))
        if self._pipeline is not None and payloads:
            with suppress(DataError):  # on a data error, _deliver isolates the bad rows
                ready.prepared = self._pipeline.prepare(payloads)
        return ready

    def start(self, r: Ready) -> Waiter | None:
        """Record the batch and start its insert (pipelined writers); None: insert in finish."""
        if not r.batch.records:
            return None
        if not r.batch.replay and not r.marked:
            try:
                self._spool.ensure_durable(r.batch.end)
                self._spool.mark_batch(r.batch.first, r.batch.end)
            except OSError:
                # Disk full / I/O error (the spool counted it): the batch is whole in memory, so
                # it goes to ClickHouse now rather than wait for the disk. Not marked: a crash
                # before its ack can no longer rebuild it exactly, and may re-insert its part
                # that reached the disk.
                self._log_limited("durable", logging.ERROR, "spool could not store batch %d-%d on "
                                  "disk; inserting it from memory", r.batch.first, r.batch.end - 1)
            r.marked = True
        if r.prepared is None or self._pipeline is None:
            return None
        r.started = time.monotonic()
        try:
            return self._pipeline.start(r.prepared, r.token)
        except Exception as exc:  # e.g. still busy with a call that timed out
            error = exc

            def fail() -> None:
                raise error

            return fail

    def finish(self, r: Ready, waiter: Waiter | None) -> bool:
        """Wait for the started insert; on any failure fall back to retries with isolation.
        False if the shutdown deadline passed first."""
        attempt = 0
        if waiter is not None:
            try:
                waiter()
                self._stored(r, 0, r.started)
                return True
            except DataError:
                pass  # split below to isolate the rows ClickHouse rejects
            except Exception as exc:
                self._failed(exc, len(r.batch.records))
                attempt = 1
                if not self._sleep_until_retry(self._backoff(0)):
                    return False
        return self._deliver(r, attempt)

    def _backoff(self, attempt: int) -> float:
        delay: float = min(self._retry_max, self._retry_initial * 2**attempt)
        return delay * random.uniform(0.8, 1.2)

    def _deliver(self, r: Ready, attempt: int = 0) -> bool:
        """Insert with write(), retrying until stored; False if shutdown's deadline passed."""
        records = r.batch.records
        if not records:  # nothing to insert: just acknowledge
            self._stored(r, 0, time.monotonic())
            return True
        while True:
            started = time.monotonic()
            try:
                dead = self._write_isolating(records)
            except Exception as exc:
                self._failed(exc, len(records))
                if not self._sleep_until_retry(self._backoff(attempt)):
                    return False
                attempt += 1
                continue
            if attempt:
                log.info("ClickHouse insert succeeded after %d failed attempt(s)", attempt)
            self._stored(r, dead, started)
            return True

    def _stored(self, r: Ready, dead: int, started: float) -> None:
        if r.batch.records:
            self.last_flush_seconds = time.monotonic() - started
            self.last_flush_time = time.time()
            self.events_inserted += len(r.batch.records) - dead
            self.batches_inserted += 1
        self._spool.ack(r.batch.end)
        self._on_stored(r.batch)

    def _write_isolating(self, records: list[tuple[int, bytes]]) -> int:
        """Write; on a data error split until the bad rows are alone. Returns rows dead-lettered.
        Tokens derive from content, so a retry of a half-done split deduplicates."""
        payloads = [p for _, p in records]
        try:
            self._writer.write(payloads, batch_token(payloads))
            return 0
        except DataError as exc:
            if len(records) == 1:
                self._spool.dead_letter(records, f"rejected: {exc}")
                self.events_dead_lettered += 1
                return 1
            mid = len(records) // 2
            return self._write_isolating(records[:mid]) + self._write_isolating(records[mid:])

    def _failed(self, exc: Exception, n: int) -> None:
        self.insert_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_EVERY_S:
            self._last_failure_log = now
            log.warning(
                "ClickHouse insert of %d event(s) failed (%s); retrying, events are kept in "
                "the spool (%d failure(s) so far, backlog %d)",
                n, self.last_error, self.insert_failures,
                max(0, self._spool.next_seq - self._spool.acked),
            )

    def _sleep_until_retry(self, delay: float) -> bool:
        wake_at = time.monotonic() + delay
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                return False
            if now >= wake_at:
                return True
            time.sleep(min(0.05, wake_at - now, max(0.0, self.deadline - now)))
