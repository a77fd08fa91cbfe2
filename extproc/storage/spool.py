"""Append-only on-disk spool of serialized UsageEvents: the batcher's write-ahead log.

Every emitted event is appended here (with a sequence number) before it can be lost; the
batcher inserts events in sequence order and acknowledges them, and fully acknowledged segment
files are deleted. After a crash, whatever was written and not acknowledged is replayed.

Layout of `dir`:
  *.seg          segments (record format: spool_records.py), each named by a seq at or below
                 its first record's
  manifest.log   batches handed to ClickHouse and the acknowledged end (spool_manifest.py)
  deadletter/    what ClickHouse rejected, and corrupt bytes (dead_letters.py)
Reading: spool_reader.py. This module is the writer: seqs, the active segment, syncing.

fsync policies (what survives what):
  always  append() copies the record into a shared memory mapping of the segment before it
          returns. Those pages belong to the kernel's page cache, so an event whose emit
          returned survives a crash of this process (SIGKILL, OOM kill) exactly as after a
          write(2), without a syscall (which would release the GIL on the event loop's
          thread). A group-commit thread fdatasyncs right behind: it survives power loss once
          that completes. Segments are preallocated (posix_fallocate), so a full disk fails a
          rotation with ENOSPC instead of a SIGBUS in the middle of a copy; another thread
          prepares the next segment (a spare) once an eighth of the active one is used (a
          quiet spool keeps one file, a busy one a spare beside it), so a rotation
          in append() is a swap, not a file creation. Batch markers are fdatasynced before
          each insert.
  batch   append() buffers in memory; the buffer is written and fdatasynced every
          write_interval_ms, when 1 MiB is buffered, and before every insert. A process crash
          loses at most the events appended since the last write (<= write_interval_ms).
  never   as batch, without fdatasync: a process crash loses the same, power loss whatever
          the OS had not written back; a replay after power loss may duplicate a batch.
A torn record at the end of a segment (crash mid-write) is cut off when the spool is opened.

Locks: _lock guards seqs, the buffer and the segment list and is the only one append() takes;
no file is created, written (except the mapped copy) or synced under it. _flush_lock serializes
buffer writers (batch/never); _sync_lock one fdatasync round at a time (it owns closing sealed
segments). The manifest and the dead letters have their own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from extproc.storage.dead_letters import DeadLetters
from extproc.storage.spool_manifest import Manifest, fsync_dir, read_manifest
from extproc.storage.spool_reader import SpoolReader
from extproc.storage.spool_records import (
    MAGIC,
    Handle,
    Segment,
    SpoolClosed,
    create_appending,
    create_mapped,
    encode_record,
    first_seq_of,
    iter_segment,
    parse_records,
    recover_segments,
    segment_path,
)

__all__ = ["FSYNC_POLICIES", "MAGIC", "Recovered", "Spool", "SpoolClosed", "SpoolReader",
           "encode_record", "iter_segment", "parse_records"]

log = logging.getLogger(__name__)

_BUFFER_WAKE_BYTES = 1 << 20
# a spare's name: never the name a segment created in append() gets (that is its first seq)
_SPARE_SUFFIX = "s.seg"
# a fully acknowledged active segment this big is closed (and deleted) rather than grown on
_RECYCLE_BYTES = 1 << 20
FSYNC_POLICIES = ("always", "batch", "never")


@dataclass
class Recovered:
    acked: int = 0
    next_seq: int = 0
    batches: list[tuple[int, int]] = field(default_factory=list)
    events: int = 0  # records found that are not acknowledged
    truncated_bytes: int = 0
    corrupt_bytes: int = 0


class Spool:
    def __init__(
        self,
        directory: str | Path,
        fsync: str = "batch",
        segment_bytes: int = 64 * 1024 * 1024,
        write_interval_ms: int = 200,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"spool fsync policy must be one of {FSYNC_POLICIES}")
        self.dir = Path(directory)
        self.fsync = fsync
        self.segment_bytes = max(4096, segment_bytes)
        self.write_interval = max(1, write_interval_ms) / 1000
        self._always = fsync == "always"
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._manifest = Manifest(self.dir, sync=fsync != "never")
        self._dead = DeadLetters(self.dir / "deadletter")
        self._segments: list[Segment] = []
        self._active: Segment | None = None
        self._spare: Segment | None = None  # fsync=always: the next segment, preallocated
        self._spare_wanted = False
        self._spare_failed = False  # preallocation failed (disk full): retried at the next rotation
        self._to_close: list[Handle] = []
        self._dir_dirty = False
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._next_seq = 0
        self._written_seq = 0  # every seq below is written to a segment (or was a gap)
        self._synced_seq = 0
        self._closed = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._spare_wake = threading.Event()
        self._spare_thread: threading.Thread | None = None
        self.bytes_on_disk = 0
        self.write_errors = 0
        # rotations that had to create their segment in append() (no spare ready)
        self.segments_created_inline = 0
        # [first, end) seq ranges a disk error kept off the disk, not yet acknowledged
        self._gaps: deque[tuple[int, int]] = deque()
        self.corrupt_bytes = 0

    # ---- properties -----------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def written_seq(self) -> int:
        return self._written_seq

    def unwritten(self, from_seq: int) -> int:
        """How many records from from_seq on a disk error kept off the disk."""
        with self._lock:
            return sum(max(0, end - max(first, from_seq)) for first, end in self._gaps)

    @property
    def synced_seq(self) -> int:
        return self._synced_seq

    @property
    def acked(self) -> int:
        return self._manifest.acked

    @property
    def spool_bytes(self) -> int:
        return self.bytes_on_disk + self._buf_bytes

    @property
    def manifest_errors(self) -> int:
        """Failed manifest writes (batch marks, acks)."""
        return self._manifest.errors

    @property
    def dead_lettered(self) -> int:
        return self._dead.count

    # ---- open / recover / close -----------------------------------------------------------

    def open(self) -> Recovered:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dead.dir.mkdir(exist_ok=True)
        rec = Recovered()
        acked, batches = read_manifest(self.dir)
        rec.acked = acked
        found = recover_segments(self.dir, acked, _SPARE_SUFFIX, self._dead.quarantine)
        rec.events, rec.truncated_bytes = found.unacked, found.truncated_bytes
        rec.corrupt_bytes = found.corrupt_bytes
        self._segments = found.segments
        self.bytes_on_disk += sum(seg.size for seg in found.segments)
        max_seq = max([acked, found.end_seq, *(end for _, end in batches)])
        rec.next_seq = max_seq
        rec.batches = sorted(b for b in set(batches) if b[1] > acked)
        self._next_seq = self._written_seq = self._synced_seq = max_seq
        self.corrupt_bytes += rec.corrupt_bytes
        self._manifest.open(acked, rec.batches)
        self._closed = False
        if self._always:
            self._spare_wanted = True
            self._prepare_spare()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="extproc-spool", daemon=True)
        self._thread.start()
        if self._always:
            self._spare_thread = threading.Thread(target=self._run_spares, daemon=True,
                                                  name="extproc-spool-prealloc")
            self._spare_thread.start()
        if rec.events or rec.truncated_bytes or rec.corrupt_bytes:
            log.warning(
                "spool %s: %d unacknowledged event(s) to replay from seq %d, %d pending "
                "batch(es); cut %d torn byte(s), quarantined %d corrupt byte(s)",
                self.dir, rec.events, acked, len(rec.batches), rec.truncated_bytes,
                rec.corrupt_bytes,
            )
        return rec

    def close(self) -> None:
        """Write and fdatasync everything (whatever the policy: a clean stop loses nothing). A
        disk error is counted and logged (`unwritten` says which records it kept off the disk);
        the files are closed all the same."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # appends fail from here on: nothing can land after the flush
        self._stop.set()
        self._wake.set()
        self._spare_wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._spare_thread is not None:
            self._spare_thread.join()
        with suppress(OSError):  # flush counted, logged and recorded it as a gap
            self.flush(sync=True)
        self._delete_acked()  # closed: a fully acknowledged active segment goes too
        with self._flush_lock, self._lock:
            if self._active is not None:
                self._seal(self._active)
            spare, self._spare = self._spare, None
        if spare is not None:
            self._discard(spare)
        try:
            self.sync()
        except OSError as exc:
            log.error("spool: final fdatasync failed: %s", exc)
        self._manifest.close()

    # ---- writing --------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Append one record; returns its seq. Cheap: a buffer append (batch/never) or a copy
        into the mapped segment (always). Raises SpoolClosed or OSError (the caller counts
        and keeps going)."""
        with self._lock:
            if self._closed:
                raise SpoolClosed("spool is closed")
            seq = self._next_seq
            self._next_seq = seq + 1
            rec = encode_record(seq, payload)
            if self._always:
                try:
                    self._write_mapped(rec, seq + 1)
                except OSError:
                    self._gaps.append((seq, seq + 1))
                    raise
                finally:
                    self._written_seq = self._next_seq  # a failed write leaves a gap, not a hole
                wake = True
            else:
                self._buf.append(rec)
                self._buf_bytes += len(rec)
                wake = self._buf_bytes >= _BUFFER_WAKE_BYTES
        if wake and not self._wake.is_set():
            self._wake.set()
        return seq

    def _write_mapped(self, data: bytes, end_seq: int) -> None:
        """fsync=always, under _lock: a memcpy into the mapped active segment, no syscall."""
        seg = self._active
        if seg is not None and seg.size + len(data) > seg.capacity:
            self._seal(seg)
            seg = None
        if seg is None:
            seg = self._activate(first_seq_of(data), len(data))
        assert seg.mm is not None
        size = seg.size
        seg.mm[size:size + len(data)] = data
        self._written(seg, data, end_seq)
        if (self._spare is None and not self._spare_wanted and not self._spare_failed
                and 8 * seg.size >= seg.capacity):
            self._spare_wanted = True
            self._spare_wake.set()

    def _activate(self, first_seq: int, need: int) -> Segment:
        """The next mapped segment: the spare, or (none ready, or the record does not fit it)
        a segment created here, in append()."""
        spare, self._spare = self._spare, None
        self._spare_failed = False
        if spare is not None and spare.capacity >= len(MAGIC) + need:
            spare.first_seq = spare.end_seq = first_seq
            self._register(spare)
            return spare
        if spare is not None:
            self._discard(spare)
        self.segments_created_inline += 1
        capacity = max(self.segment_bytes, len(MAGIC) + need)
        path = segment_path(self.dir, first_seq)
        fd, mm = create_mapped(path, capacity)
        seg = Segment(first_seq, path, len(MAGIC), first_seq, fd=fd, mm=mm, capacity=capacity)
        self._register(seg)
        return seg

    def _prepare_spare(self) -> None:
        """The preallocation thread (and open()): create and map the next segment, off the
        event loop. Its own thread: the sync thread can sit in a long fdatasync."""
        with self._lock:
            if not self._spare_wanted or self._spare is not None or self._closed:
                return
            name_seq = self._next_seq
        path = self.dir / f"{name_seq:020d}{_SPARE_SUFFIX}"
        try:
            fd, mm = create_mapped(path, self.segment_bytes)
        except OSError as exc:
            # the rotation creates its segment in append() then, and fails there, counted
            log.warning("spool: could not preallocate the next segment: %s", exc)
            with self._lock:
                self._spare_wanted = False
                self._spare_failed = True
            return
        spare = Segment(name_seq, path, len(MAGIC), name_seq, fd=fd, mm=mm,
                        capacity=self.segment_bytes)
        with self._lock:
            self._spare_wanted = False
            installed = not self._closed
            if installed:
                self._spare = spare
        if not installed:
            self._discard(spare)  # closed meanwhile

    @staticmethod
    def _discard(spare: Segment) -> None:
        """Delete a spare that never held a record."""
        if spare.mm is not None:
            spare.mm.close()
        if spare.fd is not None:
            os.close(spare.fd)
        spare.path.unlink(missing_ok=True)

    def _register(self, seg: Segment) -> None:
        self._segments.append(seg)
        self._active = seg
        self._dir_dirty = True
        self.bytes_on_disk += len(MAGIC)

    def _write_buffered(self, data: bytes, end_seq: int) -> None:
        """batch/never, under _flush_lock (the only writer): write(2) whole records to the
        active segment, creating it first if there is none; _lock only for the bookkeeping."""
        with self._lock:
            seg = self._active
        if seg is None:
            first = first_seq_of(data)
            path = segment_path(self.dir, first)
            seg = Segment(first, path, len(MAGIC), first, fd=create_appending(path))
            with self._lock:
                self._register(seg)
        fd, size = seg.fd, seg.size
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            # never leave a partial record inside a segment: cut it off and seal
            with suppress(OSError):
                os.ftruncate(fd, size)
            with self._lock:
                self._seal(seg)
            raise
        with self._lock:
            self._written(seg, data, end_seq)

    def _written(self, seg: Segment, data: bytes, end_seq: int) -> None:
        seg.size += len(data)
        seg.end_seq = end_seq
        self.bytes_on_disk += len(data)
        if seg.size >= self.segment_bytes:
            self._seal(seg)

    def _seal(self, seg: Segment) -> None:
        seg.sealed = True
        if seg.fd is not None:
            # synced, trimmed and closed by the next sync round (never under _lock)
            self._to_close.append(Handle(seg.fd, seg.mm, seg.size))
            seg.fd = seg.mm = None
        if self._active is seg:
            self._active = None

    def flush(self, sync: bool | None = None) -> int:
        """Write the buffer to the segment; fdatasync if `sync` (default: the policy says so).
        Returns the written seq."""
        if sync is None:
            sync = self.fsync != "never"
        with self._flush_lock:
            with self._lock:
                data = b"".join(self._buf) if self._buf else b""
                end = self._next_seq
                self._buf.clear()
                self._buf_bytes = 0
            if data:
                try:
                    self._write_buffered(data, end)
                except OSError:
                    # disk full / I/O error: these records exist only in memory now (the
                    # batcher still inserts the ones its queue holds); counted, logged
                    self.write_errors += 1
                    with self._lock:
                        self._gaps.append((self._written_seq, end))
                    log.exception("spool: could not write %d record(s)", end - self._written_seq)
                    raise
                finally:
                    with self._lock:
                        self._written_seq = end
            elif not self._always:
                with self._lock:
                    self._written_seq = max(self._written_seq, end)
        if sync:
            self.sync()
        else:
            self._close_sealed()
        return self._written_seq

    def sync(self) -> None:
        """One group commit: fdatasync everything written so far (also what was copied into
        a shared mapping: those pages are the file's page cache pages; fdatasync releases the
        GIL, msync through mmap.flush() would not)."""
        with self._sync_lock:
            with self._lock:
                handles, self._to_close = self._to_close, []
                fd = self._active.fd if self._active is not None else None
                target = self._written_seq
                dir_dirty, self._dir_dirty = self._dir_dirty, False
            for handle in handles:
                handle.release(sync=True)
            if fd is not None:
                os.fdatasync(fd)
            if dir_dirty:
                fsync_dir(self.dir)
            with self._lock:
                self._synced_seq = max(self._synced_seq, target)

    def _close_sealed(self) -> None:
        with self._sync_lock:
            with self._lock:
                handles, self._to_close = self._to_close, []
            for handle in handles:
                handle.release(sync=False)

    def ensure_durable(self, end_seq: int) -> None:
        """Before a batch [.., end_seq) goes to ClickHouse: its events are on disk (and synced,
        unless fsync=never), so a crash cannot leave an inserted batch that a replay cannot
        rebuild exactly."""
        if self._written_seq < end_seq:
            self.flush()
        if self.fsync != "never" and self._synced_seq < end_seq:
            self.sync()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._always:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    if self._written_seq > self._synced_seq or self._to_close:
                        self.sync()
                else:
                    self._wake.wait(self.write_interval)
                    self._wake.clear()
                    self.flush()
            except Exception:
                log.exception("spool writer failed; retrying")
                self._stop.wait(0.5)

    def _run_spares(self) -> None:
        while not self._stop.is_set():
            self._spare_wake.wait()
            self._spare_wake.clear()
            try:
                self._prepare_spare()
            except Exception:
                log.exception("spool: preparing the next segment failed")

    # ---- reading (SegmentIndex for spool_reader) ------------------------------------------

    def reader(self, from_seq: int) -> SpoolReader:
        return SpoolReader(self, from_seq)

    def segment_after(self, first_seq: int) -> tuple[Segment | None, int, bool]:
        with self._lock:
            for seg in self._segments:
                if seg.first_seq >= first_seq:
                    return seg, seg.size, seg.sealed
        return None, 0, False

    def segment_start(self, seq: int) -> int:
        with self._lock:
            start = 0
            for seg in self._segments:
                if seg.first_seq > seq:
                    break
                start = seg.first_seq
            return start

    def count_corrupt(self, nbytes: int) -> None:
        self.corrupt_bytes += nbytes

    # ---- batches and acknowledgements -----------------------------------------------------

    def mark_batch(self, first: int, end: int) -> None:
        self._manifest.mark_batch(first, end)

    def ack(self, end: int) -> None:
        """Every seq < end is stored. No fsync: losing an ack only means a deduplicated replay."""
        if not self._manifest.ack(end):
            return
        with self._lock:
            while self._gaps and self._gaps[0][1] <= end:
                self._gaps.popleft()
        self._delete_acked()

    def _delete_acked(self) -> None:
        acked = self._manifest.acked
        with self._flush_lock, self._lock:
            active = self._active
            if active is not None and active.end_seq <= acked and (
                active.size >= _RECYCLE_BYTES or self._closed
            ):
                self._seal(active)
            done = [s for s in self._segments if s.sealed and s.end_seq <= acked]
            for seg in done:
                self._segments.remove(seg)
                self.bytes_on_disk -= seg.size
        for seg in done:
            with suppress(FileNotFoundError):
                seg.path.unlink()

    # ---- dead letters ---------------------------------------------------------------------

    def dead_letter(self, records: list[tuple[int, bytes]], reason: str) -> None:
        """Keep records ClickHouse cannot take: never deleted, never silently dropped."""
        self._dead.add(records, reason)
