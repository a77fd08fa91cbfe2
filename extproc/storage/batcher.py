"""BatchProcessor: the EventSink in front of ClickHouse, after OpenTelemetry's batch processor.

emit() (on the gRPC event loop) serializes the event, appends it to the spool (the write-ahead
log, see spool.py) and to a bounded in-memory queue, and returns: no I/O wait, no exception.
One worker thread cuts batches (max_batch_size events or flush_interval_ms, whichever first)
and inserts them in sequence order through a BatchWriter, which runs the ClickHouse call on the
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
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from extproc.config import BatchSettings
from extproc.events import UsageEvent
from extproc.storage.sink import BatchWriter, DataError, batch_token
from extproc.storage.spool import Spool, SpoolClosed, SpoolReader

log = logging.getLogger(__name__)

_CHECKPOINT_EVERY_S = 0.1
_FAILURE_LOG_EVERY_S = 30.0


@dataclass
class _Batch:
    first: int  # seq range [first, end) recorded in the manifest
    end: int
    records: list[tuple[int, bytes]]
    replay: bool = False  # boundaries come from the manifest: already marked


@dataclass
class _Ready:
    """A batch with its dedup token and (pipelined writers) converted, ready to insert."""

    batch: _Batch
    token: str
    prepared: Any = None
    marked: bool = False
    started: float = 0.0


class BatchProcessor:
    def __init__(self, writer: BatchWriter, spool: Spool, settings: BatchSettings) -> None:
        self._writer = writer
        self._spool = spool
        self._max_queue = settings.max_queue_size
        self._max_batch = settings.max_batch_size
        self._interval = settings.flush_interval_ms / 1000
        self._retry_initial = settings.retry_initial_ms / 1000
        self._retry_max = max(settings.retry_max_ms, settings.retry_initial_ms) / 1000
        self._lock = threading.Lock()
        self._mem: deque[tuple[int, bytes]] = deque()
        self._overflow = False  # unbatched events are (also) on disk only: read the spool
        self._prestart: list[bytes] = []
        self._state = "new"  # new -> running -> stopping -> stopped
        self._wake = threading.Event()
        self._acked = threading.Condition()
        self._cursor = 0  # next seq to put in a batch
        self._replay: deque[tuple[int, int]] = deque()
        self._reader: SpoolReader | None = None
        self._flush_target = 0
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._checkpoints: deque[tuple[int, float]] = deque()
        self._last_checkpoint = 0.0
        self._last_failure_log = 0.0
        self._log_times: dict[str, float] = {}
        # telemetry (plain ints, read by observable callbacks)
        self.events_emitted = 0
        self.events_inserted = 0
        self.events_spooled = 0  # did not fit the memory queue: taken from disk instead
        self.events_replayed = 0  # inserted from disk (overflow or crash recovery)
        self.events_recovered = 0  # found unacknowledged in the spool at start
        self.events_dead_lettered = 0
        self.events_dropped = 0  # must stay 0: only emit after shutdown / disk failure
        self._append_errors = 0  # appends that failed (fsync=always writes in append)
        self.batches_inserted = 0
        self.insert_failures = 0
        self.last_flush_seconds = 0.0
        self.last_flush_time = 0.0
        self.last_error = ""

    # ---- telemetry ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._mem)

    @property
    def backlog(self) -> int:
        """Events emitted and not yet stored in ClickHouse (memory queue + spool)."""
        if self._state == "new":
            return len(self._prestart)
        return max(0, self._spool.next_seq - self._spool.acked)

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

    def _log_limited(self, key: str, level: int, msg: str, *args: Any, exc: bool = False) -> None:
        """At most one line per key every 10 s: emit runs for every request."""
        now = time.monotonic()
        if now - self._log_times.get(key, -1e9) >= 10.0:
            self._log_times[key] = now
            log.log(level, msg, *args, exc_info=exc)

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
            if not self._overflow and len(self._mem) < self._max_queue:
                self._mem.append((seq, payload))
            elif on_disk:
                if not self._overflow:
                    self._overflow = True
                    self._log_limited("overflow", logging.WARNING, "batch queue full (%d events): "
                                      "new events wait in the spool on disk", self._max_queue)
                self.events_spooled += 1
            else:
                self.events_dropped += 1
                self._log_limited("lost", logging.ERROR,
                                  "usage event neither queued nor spooled (disk error): dropped")
            now = time.time()
            if now - self._last_checkpoint >= _CHECKPOINT_EVERY_S:
                self._last_checkpoint = now
                self._checkpoints.append((seq, now))
        if seq + 1 - self._cursor >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    async def start(self) -> None:
        if self._state != "new":
            return
        recovered = await asyncio.to_thread(self._spool.open)
        oldest = await asyncio.to_thread(self._oldest_unacked_time, recovered.acked)
        with self._lock:
            self._cursor = recovered.acked
            self._replay = deque(recovered.batches)
            self._overflow = recovered.next_seq > recovered.acked
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
        self._deadline = time.monotonic() + timeout
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

    @property
    def _pipelined(self) -> bool:
        # writers with prepare()/start() let the worker convert the next batch meanwhile
        w = self._writer
        return callable(getattr(w, "prepare", None)) and callable(getattr(w, "start", None))

    def _pending(self) -> int:
        return self._spool.next_seq - self._cursor

    def _due(self, pending: int, now: float, next_flush: float) -> bool:
        return pending > 0 and (
            pending >= self._max_batch or now >= next_flush or self._state != "running"
            or self._flush_target > self._cursor or bool(self._replay) or self._overflow
        )

    def _run(self) -> None:
        next_flush = time.monotonic() + self._interval
        # batches taken from the queue/spool and not yet stored, in order: the one being
        # inserted and (pipelining) the next one, already converted. A batch leaves this
        # deque only once stored: an unexpected error retries it, never skips it (the ack
        # of a later batch would otherwise cover it).
        todo: deque[_Batch | _Ready] = deque()
        while True:
            try:
                if not todo:
                    pending = self._pending()
                    now = time.monotonic()
                    if self._state != "running" and pending <= 0:
                        return
                    if not self._due(pending, now, next_flush):
                        self._wake.wait(max(0.0, next_flush - now) if pending else self._interval)
                        self._wake.clear()
                        if not pending:
                            next_flush = time.monotonic() + self._interval
                        continue
                    batch = self._take_batch()
                    if batch is None:
                        next_flush = time.monotonic() + self._interval
                        continue
                    todo.append(batch)
                head = todo[0]
                cur = head if isinstance(head, _Ready) else self._prepare(head)
                todo[0] = cur
                waiter = self._start(cur)
                if waiter is not None and len(todo) == 1 and self._due(
                    self._pending(), time.monotonic(), next_flush
                ):
                    # overlap: convert the next batch while this one is being inserted
                    nxt = self._take_batch()
                    if nxt is not None:
                        todo.append(nxt)
                        todo[1] = self._prepare(nxt)
                if not self._finish(cur, waiter):
                    return  # shutdown deadline passed: these batches stay in the spool
                todo.popleft()
                if len(cur.batch.records) < self._max_batch:
                    next_flush = time.monotonic() + self._interval
            except Exception:
                if self._state == "stopped":
                    return  # shutdown gave up waiting and closed the spool: nothing to do
                log.exception("batcher worker error; retrying")
                time.sleep(min(1.0, self._retry_max))

    def _take_batch(self) -> _Batch | None:
        first = self._cursor
        if self._replay:
            start, end = self._replay[0]
            if end <= first:
                self._replay.popleft()
                return self._take_batch()
            if start <= first:  # exactly the batch a crashed run handed to ClickHouse
                self._replay.popleft()
                records = self._disk(first).read(end - first, end_seq=end)
                self._cursor = end
                self.events_replayed += len(records)
                return _Batch(first, end, records, replay=True)
            records = self._disk(first).read(self._max_batch, end_seq=start)
            self._cursor = records[-1][0] + 1 if records else start
            self.events_replayed += len(records)
            return _Batch(first, self._cursor, records)
        with self._lock:
            if self._mem:
                n = min(self._max_batch, len(self._mem))
                records = [self._mem.popleft() for _ in range(n)]
                self._cursor = records[-1][0] + 1
                return _Batch(first, self._cursor, records)
            if not self._overflow:
                return None
        # overflow: read the spool in order; once caught up, back to the memory queue
        if self._spool.written_seq < self._spool.next_seq:
            self._spool.flush(sync=False)
        reader = self._disk(first)
        records = reader.read(self._max_batch)
        if len(records) == self._max_batch:
            self._cursor = records[-1][0] + 1
        else:
            with self._lock:  # emit waits: nothing is appended while we switch over
                self._spool.flush(sync=False)
                rest = reader.read(self._max_batch)  # only what arrived since the last read
                room = self._max_batch - len(records)
                records.extend(rest[:room])
                self._mem.extend(rest[room:])
                if len(rest) < self._max_batch:
                    self._overflow = False
                    self._close_reader()
                # the batch ends where the memory queue begins (or at the end of the log)
                if self._mem:
                    self._cursor = self._mem[0][0]
                elif not self._overflow:
                    self._cursor = self._spool.next_seq
                else:
                    self._cursor = records[-1][0] + 1 if records else first
        self.events_replayed += len(records)
        if not records and self._cursor == first:
            return None
        return _Batch(first, self._cursor, records)

    def _disk(self, seq: int) -> SpoolReader:
        if self._reader is None or self._reader.next_seq != seq:
            self._close_reader()
            self._reader = self._spool.reader(seq)
        return self._reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _prepare(self, batch: _Batch) -> _Ready:
        """Convert for the writer (pipelined writers); a data error is isolated in _deliver."""
        payloads = [p for _, p in batch.records]
        ready = _Ready(batch, batch_token(payloads))
        if self._pipelined and payloads:
            with suppress(DataError):  # on a data error, _deliver isolates the bad rows
                ready.prepared = self._writer.prepare(payloads)  # type: ignore[attr-defined]
        return ready

    def _start(self, r: _Ready) -> Callable[[], None] | None:
        """Record the batch and start its insert (pipelined writers); None: insert in _finish."""
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
        if r.prepared is None:
            return None
        r.started = time.monotonic()
        try:
            return self._writer.start(r.prepared, r.token)  # type: ignore[attr-defined]
        except Exception as exc:  # e.g. still busy with a call that timed out
            error = exc

            def fail() -> None:
                raise error

            return fail

    def _finish(self, r: _Ready, waiter: Callable[[], None] | None) -> bool:
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
        return min(self._retry_max, self._retry_initial * 2**attempt) * random.uniform(0.8, 1.2)

    def _deliver(self, r: _Ready, attempt: int = 0) -> bool:
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

    def _stored(self, r: _Ready, dead: int, started: float) -> None:
        if r.batch.records:
            self.last_flush_seconds = time.monotonic() - started
            self.last_flush_time = time.time()
            self.events_inserted += len(r.batch.records) - dead
            self.batches_inserted += 1
        self._spool.ack(r.batch.end)
        while len(self._checkpoints) > 1 and self._checkpoints[1][0] <= r.batch.end:
            self._checkpoints.popleft()
        with self._acked:
            self._acked.notify_all()

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
                n, self.last_error, self.insert_failures, self.backlog,
            )

    def _sleep_until_retry(self, delay: float) -> bool:
        wake_at = time.monotonic() + delay
        while True:
            now = time.monotonic()
            if now >= self._deadline:
                return False
            if now >= wake_at:
                return True
            time.sleep(min(0.05, wake_at - now, max(0.0, self._deadline - now)))
