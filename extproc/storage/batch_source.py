"""Where the batcher's batches come from, in sequence order: the batches a crashed run handed
to ClickHouse (replayed exactly), the bounded memory queue emit() fills, and the spool on disk
for whatever did not fit the queue.

emit() (the event loop) and the worker thread share one lock here; no disk I/O ever happens
under it: the worker flushes and reads the spool outside it, so emit() never waits on a disk.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from extproc.storage.ratelog import LogLimiter
from extproc.storage.spool import Spool
from extproc.storage.spool_reader import SpoolReader


@dataclass
class Batch:
    first: int  # seq range [first, end) recorded in the manifest
    end: int
    records: list[tuple[int, bytes]]
    replay: bool = False  # boundaries come from the manifest: already marked


class BatchSource:
    def __init__(self, spool: Spool, max_queue: int, max_batch: int, limited: LogLimiter) -> None:
        self._spool = spool
        self._log_limited = limited
        self._max_queue = max_queue
        self._max_batch = max_batch
        self.lock = threading.Lock()  # the memory queue and the switches to and from disk
        self._mem: deque[tuple[int, bytes]] = deque()
        self._overflow = False  # new events are (also) on disk only: read the spool
        # [cursor, _disk_end) is on disk only: what arrived while switching back to memory
        self._disk_end = 0
        self.cursor = 0  # next seq to put in a batch (worker thread)
        self._replay: deque[tuple[int, int]] = deque()
        self._reader: SpoolReader | None = None
        self.events_spooled = 0  # did not fit the memory queue: taken from disk instead
        self.events_replayed = 0  # inserted from disk (overflow or crash recovery)

    @property
    def queue_depth(self) -> int:
        return len(self._mem)

    def restore(self, acked: int, batches: list[tuple[int, int]], next_seq: int) -> None:
        """After spool.open(): resume at the acknowledged end; what follows is on disk."""
        with self.lock:
            self.cursor = acked
            self._replay = deque(batches)
            self._overflow = next_seq > acked

    def offer(self, seq: int, payload: bytes, on_disk: bool) -> bool:
        """An appended event (caller holds `lock`): into the memory queue if it has room and
        nothing is waiting on disk, else left to the spool. False: it is nowhere (not on disk,
        no room), the caller counts it lost."""
        if not self._overflow and len(self._mem) < self._max_queue:
            self._mem.append((seq, payload))
            return True
        if not on_disk:
            return False
        if not self._overflow:
            self._overflow = True
            self._log_limited("overflow", logging.WARNING, "batch queue full (%d events): "
                              "new events wait in the spool on disk", self._max_queue)
        self.events_spooled += 1
        return True

    def pending(self) -> int:
        return self._spool.next_seq - self.cursor

    def urgent(self) -> bool:
        """Batches to take now, not at the flush interval: replays and events on disk."""
        return bool(self._replay) or self._overflow or self.cursor < self._disk_end

    def take(self) -> Batch | None:
        first = self.cursor
        if self._replay:
            start, end = self._replay[0]
            if end <= first:
                self._replay.popleft()
                return self.take()
            if start <= first:  # exactly the batch a crashed run handed to ClickHouse
                self._replay.popleft()
                records = self._disk(first).read(end - first, end_seq=end)
                self.cursor = end
                self.events_replayed += len(records)
                return Batch(first, end, records, replay=True)
            records = self._disk(first).read(self._max_batch, end_seq=start)
            self.cursor = records[-1][0] + 1 if records else start
            self.events_replayed += len(records)
            return Batch(first, self.cursor, records)
        if first < self._disk_end:
            records = self._read_tail(self._max_batch)
        else:
            with self.lock:
                if self._mem:
                    n = min(self._max_batch, len(self._mem))
                    records = [self._mem.popleft() for _ in range(n)]
                    self.cursor = records[-1][0] + 1
                    return Batch(first, self.cursor, records)
                if not self._overflow:
                    return None
            records = self._read_overflow(first)
        self.events_replayed += len(records)
        if not records and self.cursor == first:
            return None
        return Batch(first, self.cursor, records)

    def _read_overflow(self, first: int) -> list[tuple[int, bytes]]:
        """Read the spool in order; once caught up, new events go to the memory queue again."""
        if self._spool.written_seq < self._spool.next_seq:
            self._spool.flush(sync=False)
        records = self._disk(first).read(self._max_batch)
        if len(records) == self._max_batch:
            self.cursor = records[-1][0] + 1
            return records
        with self.lock:  # no I/O here: from this seq on, emit() queues in memory
            self._overflow = False
            self._disk_end = self._spool.next_seq
        self.cursor = records[-1][0] + 1 if records else first
        # the few appended since the flush above are on disk only: read them now
        records.extend(self._read_tail(self._max_batch - len(records)))
        return records

    def _read_tail(self, room: int) -> list[tuple[int, bytes]]:
        end = self._disk_end
        if self.cursor >= end or room <= 0:
            return []
        if self._spool.written_seq < end:
            self._spool.flush(sync=False)
        records = self._disk(self.cursor).read(room, end_seq=end)
        if len(records) < room:  # everything written below end is read (the rest were gaps)
            self.cursor = end
            self.close_reader()
        else:
            self.cursor = records[-1][0] + 1
        return records

    def _disk(self, seq: int) -> SpoolReader:
        if self._reader is None or self._reader.next_seq != seq:
            self.close_reader()
            self._reader = self._spool.reader(seq)
        return self._reader

    def close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
