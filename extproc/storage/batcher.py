"""BatchProcessor: the EventSink in front of ClickHouse, after OpenTelemetry's batch processor.

emit() (on the gRPC event loop) serializes the event, appends it to the spool (the write-ahead
log, see spool.py) and to a bounded in-memory queue, and returns: no I/O wait, no exception.
One worker thread cuts batches (max_batch_size events or flush_interval_ms, whichever first)
from the BatchSource (batch_source.py) and hands them to the Delivery (delivery.py), which
inserts them in sequence order through a BatchWriter running the ClickHouse call on the
storage's own thread.

  queue full        events stay on disk only (counted in events_spooled); the worker reads them
                    back from the spool in order, then returns to the memory queue.
  insert fails      the same batch is retried (same dedup token) with exponential backoff, for
                    as long as it takes; meanwhile events keep flowing into the spool.
  data error        the batch is split in halves until the rows ClickHouse rejects are isolated;
                    those go to the dead-letter spool (counted, logged), the rest is inserted.
  crash / restart   start() replays what the spool holds, batch boundaries included.
  shutdown()        inserts everything it can within the timeout; the rest stays in the spool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from extproc.config import BatchSettings
from extproc.events import UsageEvent
from extproc.storage.batch_source import Batch, BatchSource
from extproc.storage.delivery import Delivery, Ready
from extproc.storage.ratelog import LogLimiter
from extproc.storage.sink import BatchWriter
from extproc.storage.spool import Spool, SpoolClosed

log = logging.getLogger(__name__)

_CHECKPOINT_EVERY_S = 0.1


class BatchProcessor:
    def __init__(self, writer: BatchWriter, spool: Spool, settings: BatchSettings) -> None:
        self._spool = spool
        self._max_queue = settings.max_queue_size
        self._max_batch = settings.max_batch_size
        self._interval = settings.flush_interval_ms / 1000
        self._retry_max = max(settings.retry_max_ms, settings.retry_initial_ms) / 1000
        self._log_limited = LogLimiter(log)
        self._source = BatchSource(spool, settings.max_queue_size, settings.max_batch_size,
                                   self._log_limited)
        self._delivery = Delivery(
            writer, spool, settings.retry_initial_ms / 1000, self._retry_max, self._on_stored,
            self._log_limited,
        )
        self._lock = self._source.lock  # what emit() takes: never held around disk I/O
        self._prestart: list[bytes] = []
        self._state = "new"  # new -> running -> stopping -> stopped
        self._wake = threading.Event()
        self._acked = threading.Condition()
        self._flush_target = 0
        self._thread: threading.Thread | None = None
        self._checkpoints: deque[tuple[int, float]] = deque()
        self._last_checkpoint = 0.0
        # telemetry (plain ints, read by observable callbacks)
        self.events_emitted = 0
        self.events_recovered = 0  # found unacknowledged in the spool at start
        self.events_dropped = 0  # must stay 0: only emit after shutdown / disk failure
        self._append_errors = 0  # appends that failed (fsync=always writes in append)

    # ---- telemetry ------------------------------------------------------------------------

    @property
    def _writer(self) -> BatchWriter:
        return self._delivery.writer

    @_writer.setter
    def _writer(self, writer: BatchWriter) -> None:  # tests wrap the writer in fault injectors
        self._delivery.writer = writer

    @property
    def queue_depth(self) -> int:
        return self._source.queue_depth

    @property
    def backlog(self) -> int:
        """Events emitted and not yet stored in ClickHouse (memory queue + spool)."""
        if self._state == "new":
            return len(self._prestart)
        return max(0, self._spool.next_seq - self._spool.acked)

    @property
    def events_spooled(self) -> int:
        """Did not fit the memory queue: taken from disk instead."""
        return self._source.events_spooled

    @property
    def events_replayed(self) -> int:
        """Inserted from disk (overflow or crash recovery)."""
        return self._source.events_replayed

    @property
    def events_inserted(self) -> int:
        return self._delivery.events_inserted

    @property
    def events_dead_lettered(self) -> int:
        return self._delivery.events_dead_lettered

    @property
    def batches_inserted(self) -> int:
        return self._delivery.batches_inserted

    @property
    def insert_failures(self) -> int:
        return self._delivery.insert_failures

    @property
    def last_flush_seconds(self) -> float:
        return self._delivery.last_flush_seconds

    @property
    def last_flush_time(self) -> float:
        return self._delivery.last_flush_time

    @property
    def last_error(self) -> str:
        return self._delivery.last_error

    @property
    def spool_errors(self) -> int:
        """Failed spool writes: in append (fsync=always), in the spool's flusher (batch/never),
        of the manifest (batch marks, acks)."""
        return self._append_errors + self._spool.write_errors + self._spool.manifest_errors

    @property
    def spool_bytes(self) -> int:
        return self._spool.spool_bytes

    @property
    def spool_oldest_age_s(self) -> float:
        """Age of the oldest event not yet in ClickHouse (0 when there is none)."""
        if self.backlog == 0 or not self._checkpoints:
            return 0.0
        return max(0.0, time.time() - self._checkpoints[0][1])

    def stats(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                "queue_depth", "backlog", "spool_bytes", "spool_oldest_age_s", "events_emitted",
                "events_inserted", "events_spooled", "events_replayed", "events_recovered",
                "events_dead_lettered", "events_dropped", "spool_errors", "batches_inserted",
                "insert_failures", "last_flush_seconds", "last_flush_time", "last_error",
            )
        }

    # ---- EventSink ------------------------------------------------------------------------

    def emit(self, event: UsageEvent) -> None:
        try:
            payload = event.SerializeToString()
        except Exception:
            self.events_dropped += 1
            self._log_limited("serialize", logging.ERROR,
                              "usage event could not be serialized; dropped (counted)", exc=True)
            return
        try:
            self._append(payload)
        except Exception:  # emit never raises into the gRPC handler
            self.events_dropped += 1
            self._log_limited("append", logging.ERROR,
                              "usage event could not be queued; dropped (counted)", exc=True)

    def _append(self, payload: bytes) -> None:
        with self._lock:
            self.events_emitted += 1
            if self._state == "new":
                if len(self._prestart) < self._max_queue:
                    self._prestart.append(payload)
                else:
                    self.events_dropped += 1
                    self._log_limited("prestart", logging.ERROR, "usage event emitted before "
                                      "start() and the queue is full: dropped (counted)")
                return
            try:
                seq = self._spool.append(payload)
                on_disk = True
            except SpoolClosed:
                self.events_dropped += 1
                self._log_limited("closed", logging.ERROR,
                                  "usage event emitted after shutdown(): dropped (counted)")
                return
            except OSError:
                seq = self._spool.next_seq - 1  # its seq became a gap on disk
                on_disk = False
                self._append_errors += 1
                self._log_limited("spool", logging.ERROR, "spool write failed", exc=True)
            if not self._source.offer(seq, payload, on_disk):
                self.events_dropped += 1
                self._log_limited("lost", logging.ERROR,
                                  "usage event neither queued nor spooled (disk error): dropped")
            now = time.time()
            if now - self._last_checkpoint >= _CHECKPOINT_EVERY_S:
                self._last_checkpoint = now
                self._checkpoints.append((seq, now))
        if seq + 1 - self._source.cursor >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    async def start(self) -> None:
        if self._state != "new":
            return
        recovered = await asyncio.to_thread(self._spool.open)
        oldest = await asyncio.to_thread(self._oldest_unacked_time, recovered.acked)
        self._source.restore(recovered.acked, recovered.batches, recovered.next_seq)
        with self._lock:
            self.events_recovered = recovered.events
            if recovered.events:
                self._checkpoints.append((recovered.acked, oldest))
            self._state = "running"
            prestart, self._prestart = self._prestart, []
            self.events_emitted -= len(prestart)
        for payload in prestart:
            self._append(payload)
        self._thread = threading.Thread(target=self._run, name="extproc-batcher", daemon=True)
        self._thread.start()
        if recovered.events:
            log.warning("replaying %d usage event(s) left in the spool by a previous run",
                        recovered.events)

    def _oldest_unacked_time(self, acked: int) -> float:
        reader = self._spool.reader(acked)
        try:
            for _, payload in reader.read(1):
                event = UsageEvent.FromString(payload)
                ns = event.end_time_unix_nano or event.start_time_unix_nano
                if ns:
                    return ns / 1e9
        except Exception:
            pass
        finally:
            reader.close()
        return time.time()

    async def force_flush(self, timeout: float = 30.0) -> bool:
        if self._state == "new":
            return not self._prestart
        target = self._spool.next_seq
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        return await asyncio.to_thread(self._wait_acked, target, timeout)

    def _wait_acked(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._acked:
            while self._spool.acked < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._state == "stopped":
                    return self._spool.acked >= target
                self._acked.wait(min(left, 0.5))
        return True

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Insert everything emitted so far (within timeout); what is left stays in the spool,
        fdatasynced, and is replayed by the next start()."""
        if self._state == "new":
            await self.start()  # spool what was emitted before start()
        with self._lock:
            if self._state in ("stopping", "stopped"):
                return
            self._state = "stopping"
        self._delivery.deadline = time.monotonic() + timeout
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout + 5)
        await asyncio.to_thread(self._spool.close)
        with self._lock:
            self._state = "stopped"
        with self._acked:
            self._acked.notify_all()
        left = self._spool.next_seq - self._spool.acked
        lost = self._spool.unwritten(self._spool.acked) if left else 0
        if lost:
            log.error("shutdown: %d usage event(s) not yet in ClickHouse; %d of them could not be "
                      "written to the spool (disk error, see above) and are lost; the rest stay in "
                      "the spool (%s) and are replayed at the next start", left, lost, self._spool.dir)
        elif left:
            log.warning("shutdown: %d usage event(s) not yet in ClickHouse stay in the spool "
                        "(%s) and are replayed at the next start", left, self._spool.dir)
        else:
            log.info("shutdown: all %d usage event(s) stored", self.events_inserted)

    # ---- worker ---------------------------------------------------------------------------

    def _on_stored(self, batch: Batch) -> None:
        while len(self._checkpoints) > 1 and self._checkpoints[1][0] <= batch.end:
            self._checkpoints.popleft()
        with self._acked:
            self._acked.notify_all()

    def _due(self, pending: int, now: float, next_flush: float) -> bool:
        return pending > 0 and (
            pending >= self._max_batch or now >= next_flush or self._state != "running"
            or self._flush_target > self._source.cursor or self._source.urgent()
        )

    def _run(self) -> None:
        source, delivery = self._source, self._delivery
        next_flush = time.monotonic() + self._interval
        # batches taken from the source and not yet stored, in order: the one being
        # inserted and (pipelining) the next one, already converted. A batch leaves this
        # deque only once stored: an unexpected error retries it, never skips it (the ack
        # of a later batch would otherwise cover it).
        todo: deque[Batch | Ready] = deque()
        while True:
            try:
                if not todo:
                    pending = source.pending()
                    now = time.monotonic()
                    if self._state != "running" and pending <= 0:
                        return
                    if not self._due(pending, now, next_flush):
                        self._wake.wait(max(0.0, next_flush - now) if pending else self._interval)
                        self._wake.clear()
                        if not pending:
                            next_flush = time.monotonic() + self._interval
                        continue
                    batch = source.take()
                    if batch is None:
                        next_flush = time.monotonic() + self._interval
                        continue
                    todo.append(batch)
                head = todo[0]
                cur = head if isinstance(head, Ready) else delivery.prepare(head)
                todo[0] = cur
                waiter = delivery.start(cur)
                if waiter is not None and len(todo) == 1 and self._due(
                    source.pending(), time.monotonic(), next_flush
                ):
                    # overlap: convert the next batch while this one is being inserted
                    nxt = source.take()
                    if nxt is not None:
                        todo.append(delivery.prepare(nxt))
                if not delivery.finish(cur, waiter):
                    return  # shutdown deadline passed: these batches stay in the spool
                todo.popleft()
                if len(cur.batch.records) < self._max_batch:
                    next_flush = time.monotonic() + self._interval
            except Exception:
                if self._state == "stopped":
                    return  # shutdown gave up waiting and closed the spool: nothing to do
                log.exception("batcher worker error; retrying")
                time.sleep(min(1.0, self._retry_max))
