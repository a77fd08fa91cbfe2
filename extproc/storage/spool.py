"""Append-only on-disk spool of serialized UsageEvents: the batcher's write-ahead log.

Every emitted event is appended here (with a sequence number) before it can be lost; the
batcher inserts events in sequence order and acknowledges them, and fully acknowledged segment
files are deleted. After a crash, whatever was written and not acknowledged is replayed.

Layout of `dir`:
  <first_seq:020d>.seg  segment: 8-byte magic, then records
                        [u64 seq][u32 length][u32 crc32(seq, length, payload)][payload]
                        where payload is one serialized UsageEvent (length-delimited).
  manifest.log          [kind][u64 first][u64 end][u32 crc]: B = batch [first, end) handed
                        to ClickHouse (a replay re-sends exactly that batch, so its dedup token
                        matches), A = every seq < end is stored in ClickHouse.
  deadletter/           records ClickHouse rejected as data errors (same format), never
                        deleted automatically, and index.jsonl with the reason for each.

fsync policies (what survives what):
  always  append() copies the record into a shared memory mapping of the segment before it
          returns. Those pages belong to the kernel's page cache, so an event whose emit
          returned survives a crash of this process (SIGKILL, OOM kill) exactly as after a
          write(2), without a syscall (which would release the GIL on the event loop's
          thread). A group-commit thread fdatasyncs right behind: it survives power loss once
          that completes (~0.2 ms here). Segments are preallocated (posix_fallocate), so a full
          disk fails a rotation with ENOSPC instead of a SIGBUS in the middle of a copy.
          Batch markers are fdatasynced before each insert.
  batch   append() buffers in memory; the buffer is written and fdatasynced every
          write_interval_ms, when 1 MiB is buffered, and before every insert. A process crash
          loses at most the events appended since the last write (<= write_interval_ms).
  never   as batch, without fdatasync: a process crash loses the same, power loss whatever
          the OS had not written back; a replay after power loss may duplicate a batch.
A torn record at the end of a segment (crash mid-write) is cut off when the spool is opened.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"EXSPOOL1"
_REC = struct.Struct("<QII")  # seq, payload length, crc
_MAN = struct.Struct("<cQQ")  # kind, first, end
_MAN_CRC = struct.Struct("<I")
_MAN_SIZE = _MAN.size + _MAN_CRC.size
MAX_RECORD = 64 * 1024 * 1024
_READ_CHUNK = 1 << 20
_BUFFER_WAKE_BYTES = 1 << 20
_MANIFEST_COMPACT_BYTES = 256 * 1024
# a fully acknowledged active segment this big is closed (and deleted) rather than grown on
_RECYCLE_BYTES = 1 << 20
FSYNC_POLICIES = ("always", "batch", "never")


class SpoolClosed(RuntimeError):
    pass


def _crc(seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, len(payload))))


def encode_record(seq: int, payload: bytes) -> bytes:
    return _REC.pack(seq, len(payload), _crc(seq, payload)) + payload


def parse_records(data: bytes | memoryview, base: int = 0) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Parse whole records from `data`. Returns (records, bytes consumed, hit a bad record)."""
    view = memoryview(data)
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(view)
    while pos + _REC.size <= end:
        seq, length, crc = _REC.unpack_from(view, pos)
        if length > MAX_RECORD:
            return out, pos, True
        stop = pos + _REC.size + length
        if stop > end:
            break
        payload = view[pos + _REC.size:stop]
        if _crc(seq, payload) != crc:
            return out, pos, True
        out.append((seq, bytes(payload)))
        pos = stop
    return out, pos, False


def iter_segment(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Every intact record of one segment file, in order (tooling, tests, dead letters)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return
    records, _, _ = parse_records(memoryview(data)[len(MAGIC):])
    yield from records


@dataclass
class _Segment:
    first_seq: int
    path: Path
    size: int  # bytes written and visible to readers (incl. magic)
    end_seq: int  # one past the last seq written
    sealed: bool = False
    fd: int | None = None
    mm: mmap.mmap | None = None  # fsync=always: records are copied into this mapping
    capacity: int = 0  # preallocated file size when mapped


@dataclass
class _Handle:
    """A sealed segment's open file, released (synced, trimmed, closed) by the sync round."""

    fd: int
    mm: mmap.mmap | None
    size: int

    def release(self, sync: bool) -> None:
        try:
            if self.mm is not None:
                self.mm.close()
                os.ftruncate(self.fd, self.size)  # drop the unused preallocated tail
            if sync:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)


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
        self._lock = threading.Lock()  # seqs, buffer, segment list, offsets
        self._flush_lock = threading.Lock()  # one buffer writer at a time (batch/never)
        self._sync_lock = threading.Lock()  # one fdatasync round at a time; owns fd closing
        self._man_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._to_close: list[_Handle] = []
        self._dir_dirty = False
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._next_seq = 0
        self._written_seq = 0  # every seq below is written to a segment (or was a gap)
        self._synced_seq = 0
        self._acked = 0
        self._pending_batches: deque[tuple[int, int]] = deque()
        self._man_fd: int | None = None
        self._man_size = 0
        self._closed = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.bytes_on_disk = 0
        self.write_errors = 0
        self.manifest_errors = 0
        # [first, end) seq ranges a disk error kept off the disk, not yet acknowledged
        self._gaps: deque[tuple[int, int]] = deque()
        self.dead_lettered = 0
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
        return self._acked

    @property
    def spool_bytes(self) -> int:
        return self.bytes_on_disk + self._buf_bytes

    @property
    def pending_batches(self) -> list[tuple[int, int]]:
        return list(self._pending_batches)

    # ---- open / recover / close -----------------------------------------------------------

    def open(self) -> Recovered:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "deadletter").mkdir(exist_ok=True)
        rec = Recovered()
        acked, batches = self._read_manifest()
        rec.acked = acked
        max_seq = max([acked, *(end for _, end in batches)])
        paths = sorted(self.dir.glob("*.seg"))
        for i, path in enumerate(paths):
            seg, truncated, corrupt, unacked = self._recover_segment(
                path, last=i == len(paths) - 1, acked=acked
            )
            rec.truncated_bytes += truncated
            rec.corrupt_bytes += corrupt
            if seg is None:
                continue
            rec.events += unacked
            if seg.end_seq <= acked:
                path.unlink()  # acknowledged before the crash, deletion did not happen
                continue
            seg.sealed = True
            self._segments.append(seg)
            self.bytes_on_disk += seg.size
            max_seq = max(max_seq, seg.end_seq)
        self._segments.sort(key=lambda s: s.first_seq)
        rec.next_seq = max_seq
        rec.batches = sorted(b for b in set(batches) if b[1] > acked)
        self._next_seq = self._written_seq = self._synced_seq = max_seq
        self._acked = acked
        self._pending_batches = deque(rec.batches)
        self.corrupt_bytes += rec.corrupt_bytes
        self._rewrite_manifest()
        self._closed = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="extproc-spool", daemon=True)
        self._thread.start()
        if rec.events or rec.truncated_bytes or rec.corrupt_bytes:
            log.warning(
                "spool %s: %d unacknowledged event(s) to replay from seq %d, %d pending "
                "batch(es); cut %d torn byte(s), quarantined %d corrupt byte(s)",
                self.dir, rec.events, acked, len(rec.batches), rec.truncated_bytes,
                rec.corrupt_bytes,
            )
        return rec

    def _recover_segment(
        self, path: Path, last: bool, acked: int
    ) -> tuple[_Segment | None, int, int, int]:
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                path.unlink()  # crashed while creating it
                return None, len(data), 0, 0
            self._quarantine(path.name, data, "bad segment header")
            path.unlink()
            return None, 0, len(data), 0
        body = memoryview(data)[len(MAGIC):]
        records, used, bad = parse_records(body)
        good = len(MAGIC) + used
        truncated = corrupt = 0
        if good < len(data):
            zeros = not bytes(body[used:]).strip(b"\0")  # preallocated, never written
            if not bad or zeros or (last and not self._later_record(body, used)):
                truncated = len(data) - good  # torn or unused tail
            else:
                corrupt = len(data) - good
                self._quarantine(path.name, data[good:], "corrupt record")
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
            if truncated:
                log.warning("spool %s: cut a torn tail of %d byte(s)", path.name, truncated)
        if not records:
            path.unlink()
            return None, truncated, corrupt, 0
        unacked = sum(1 for seq, _ in records if seq >= acked)
        return _Segment(records[0][0], path, good, records[-1][0] + 1), truncated, corrupt, unacked

    @staticmethod
    def _later_record(body: memoryview, bad_at: int) -> bool:
        """Is there an intact record after the bad one? Then it is corruption, not a torn tail
        (which is a cut-off record, or zeros the filesystem allocated but never wrote)."""
        if not bytes(body[bad_at:]).strip(b"\0"):
            return False
        for pos in range(bad_at + 1, min(len(body) - _REC.size, bad_at + (4 << 20))):
            seq, length, crc = _REC.unpack_from(body, pos)
            stop = pos + _REC.size + length
            if length <= MAX_RECORD and stop <= len(body) and _crc(seq, body[pos + _REC.size:stop]) == crc:
                return True
        return False

    def _quarantine(self, name: str, data: bytes, reason: str) -> None:
        target = self.dir / "deadletter" / f"corrupt-{name}-{time.time_ns()}.bin"
        target.write_bytes(data)
        log.error("spool: %s in %s: %d byte(s) moved to %s", reason, name, len(data), target)

    def _read_manifest(self) -> tuple[int, list[tuple[int, int]]]:
        path = self.dir / "manifest.log"
        if not path.exists():
            return 0, []
        data = path.read_bytes()
        acked, batches, pos = 0, [], 0
        while pos + _MAN_SIZE <= len(data):
            body = data[pos:pos + _MAN.size]
            (crc,) = _MAN_CRC.unpack_from(data, pos + _MAN.size)
            if zlib.crc32(body) != crc:
                break
            kind, first, end = _MAN.unpack(body)
            if kind == b"A":
                acked = max(acked, end)
            elif kind == b"B":
                batches.append((first, end))
            pos += _MAN_SIZE
        if pos < len(data):
            log.warning("spool manifest: ignored %d torn byte(s) at the end", len(data) - pos)
        return acked, batches

    def _rewrite_manifest(self) -> None:
        """Compact: the current ack and the pending batches, written to a new file, renamed."""
        tmp = self.dir / "manifest.tmp"
        records = [(b"A", 0, self._acked)] + [(b"B", a, b) for a, b in self._pending_batches]
        data = b"".join(self._man_record(*r) for r in records)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "manifest.log")
        self._fsync_dir()
        if self._man_fd is not None:
            os.close(self._man_fd)
        self._man_fd = os.open(self.dir / "manifest.log", os.O_WRONLY | os.O_APPEND)
        self._man_size = len(data)

    @staticmethod
    def _man_record(kind: bytes, first: int, end: int) -> bytes:
        body = _MAN.pack(kind, first, end)
        return body + _MAN_CRC.pack(zlib.crc32(body))

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
        if self._thread is not None:
            self._thread.join()
        with suppress(OSError):  # flush counted, logged and recorded it as a gap
            self.flush(sync=True)
        self._delete_acked()  # closed: a fully acknowledged active segment goes too
        with self._flush_lock, self._lock:
            if self._active is not None:
                self._seal(self._active)
        try:
            self.sync()
        except OSError as exc:
            log.error("spool: final fdatasync failed: %s", exc)
        with self._man_lock:
            if self._man_fd is not None:
                os.close(self._man_fd)
                self._man_fd = None

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
                    self._write(rec, seq + 1, have_lock=True)
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

    def _write(self, data: bytes, end_seq: int, have_lock: bool) -> None:
        """Write whole records to the active segment. Writers are serialized by the caller:
        _lock (always: append) or _flush_lock (batch/never: flush); segment bookkeeping is
        always changed under _lock, the write itself needs no lock in the second case."""
        guard: AbstractContextManager = nullcontext() if have_lock else self._lock
        with guard:
            seg = self._active
            if seg is not None and seg.mm is not None and seg.size + len(data) > seg.capacity:
                self._seal(seg)
                seg = None
            if seg is None:
                seg = self._new_segment(struct.unpack_from("<Q", data, 0)[0], len(data))
            fd, size = seg.fd, seg.size
            if seg.mm is not None:  # fsync=always: _lock is held, a memcpy, no syscall
                seg.mm[size:size + len(data)] = data
                self._written(seg, data, end_seq)
                return
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with guard:
                # never leave a partial record inside a segment: cut it off and seal
                with suppress(OSError):
                    os.ftruncate(fd, size)
                self._seal(seg)
            raise
        with guard:
            self._written(seg, data, end_seq)

    def _written(self, seg: _Segment, data: bytes, end_seq: int) -> None:
        seg.size += len(data)
        seg.end_seq = end_seq
        self.bytes_on_disk += len(data)
        if seg.size >= self.segment_bytes:
            self._seal(seg)

    def _new_segment(self, first_seq: int, need: int) -> _Segment:
        path = self.dir / f"{first_seq:020d}.seg"
        if self._always:
            capacity = max(self.segment_bytes, len(MAGIC) + need)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, capacity)
                mm = mmap.mmap(fd, capacity)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            mm[:len(MAGIC)] = MAGIC
            seg = _Segment(first_seq, path, len(MAGIC), first_seq, fd=fd, mm=mm, capacity=capacity)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.write(fd, MAGIC)
            seg = _Segment(first_seq, path, len(MAGIC), first_seq, fd=fd)
        self._segments.append(seg)
        self._active = seg
        self._dir_dirty = True
        self.bytes_on_disk += len(MAGIC)
        return seg

    def _seal(self, seg: _Segment) -> None:
        seg.sealed = True
        if seg.fd is not None:
            # synced, trimmed and closed by the next sync round (never under _lock)
            self._to_close.append(_Handle(seg.fd, seg.mm, seg.size))
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
                # the active segment is only touched under _flush_lock in batch/never mode
            if data:
                try:
                    self._write(data, end, have_lock=False)
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
                self._fsync_dir()
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

    # ---- reading --------------------------------------------------------------------------

    def reader(self, from_seq: int) -> SpoolReader:
        return SpoolReader(self, from_seq)

    def _segment_after(self, first_seq: int) -> tuple[_Segment | None, int, bool]:
        """The segment starting at first_seq, or the first one after it (when it is gone)."""
        with self._lock:
            for seg in self._segments:
                if seg.first_seq >= first_seq:
                    return seg, seg.size, seg.sealed
        return None, 0, False

    def _segment_start(self, seq: int) -> int:
        """first_seq of the segment that may hold seq."""
        with self._lock:
            start = 0
            for seg in self._segments:
                if seg.first_seq > seq:
                    break
                start = seg.first_seq
            return start

    # ---- batches and acknowledgements -----------------------------------------------------

    def mark_batch(self, first: int, end: int) -> None:
        with self._man_lock:
            self._man_append(self._man_record(b"B", first, end))
            if self.fsync != "never":
                os.fdatasync(self._man_fd)  # type: ignore[arg-type]
            self._pending_batches.append((first, end))

    def ack(self, end: int) -> None:
        """Every seq < end is stored. No fsync: losing an ack only means a deduplicated replay."""
        with self._man_lock:
            if end <= self._acked:
                return
            try:
                self._man_append(self._man_record(b"A", 0, end))
            except OSError as exc:  # disk full: the events are stored all the same
                log.warning("spool: could not record ack %d on disk (%s); a restart replays "
                            "those batches, deduplicated", end, exc)
            self._acked = end
            while self._pending_batches and self._pending_batches[0][1] <= end:
                self._pending_batches.popleft()
            with self._lock:
                while self._gaps and self._gaps[0][1] <= end:
                    self._gaps.popleft()
            if self._man_size > _MANIFEST_COMPACT_BYTES:
                self._rewrite_manifest()
        self._delete_acked()

    def _man_append(self, record: bytes) -> None:
        if self._man_fd is None:
            raise SpoolClosed("spool is closed")
        try:
            if os.write(self._man_fd, record) != len(record):
                raise OSError(errno.ENOSPC, "short write to the spool manifest")
        except OSError:
            self.manifest_errors += 1  # under _man_lock (write_errors is the flusher's)
            with suppress(OSError):  # no torn record left for later ones to follow (O_APPEND)
                os.ftruncate(self._man_fd, self._man_size)
            raise
        self._man_size += len(record)

    def _delete_acked(self) -> None:
        with self._flush_lock, self._lock:
            active = self._active
            if active is not None and active.end_seq <= self._acked and (
                active.size >= _RECYCLE_BYTES or self._closed
            ):
                self._seal(active)
            done = [s for s in self._segments if s.sealed and s.end_seq <= self._acked]
            for seg in done:
                self._segments.remove(seg)
                self.bytes_on_disk -= seg.size
        for seg in done:
            with suppress(FileNotFoundError):
                seg.path.unlink()

    # ---- dead letters ---------------------------------------------------------------------

    def dead_letter(self, records: list[tuple[int, bytes]], reason: str) -> None:
        """Keep records ClickHouse cannot take: never deleted, never silently dropped."""
        if not records:
            return
        dl = self.dir / "deadletter"
        dl.mkdir(exist_ok=True)
        with self._man_lock:
            with open(dl / "deadletter.seg", "ab") as f:
                if f.tell() == 0:
                    f.write(MAGIC)
                f.write(b"".join(encode_record(seq, p) for seq, p in records))
                f.flush()
                os.fsync(f.fileno())
            now = time.time()
            with open(dl / "index.jsonl", "a", encoding="utf-8") as f:
                for seq, payload in records:
                    f.write(json.dumps({"seq": seq, "bytes": len(payload), "time": now,
                                        "reason": reason[:500]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.dead_lettered += len(records)
        log.error("spool: %d event(s) moved to %s: %s", len(records), dl, reason[:500])


class SpoolReader:
    """Sequential reader of written records with seq >= from_seq (gaps are skipped)."""

    def __init__(self, spool: Spool, from_seq: int) -> None:
        self._spool = spool
        self.next_seq = from_seq
        self._seg_first = spool._segment_start(from_seq)
        self._path: Path | None = None
        self._fd: int | None = None
        self._offset = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, seg: _Segment) -> None:
        self.close()
        self._seg_first, self._path = seg.first_seq, seg.path
        self._fd = os.open(seg.path, os.O_RDONLY)
        self._offset = len(MAGIC)

    def read(self, max_records: int, end_seq: int | None = None) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        while len(out) < max_records:
            seg, limit, sealed = self._spool._segment_after(self._seg_first)
            if seg is None:
                break
            if self._fd is None or seg.first_seq != self._seg_first:
                self._open(seg)
            if self._offset >= limit:
                if not sealed:
                    break  # caught up with the writer
                self._seg_first = seg.first_seq + 1  # next segment
                self.close()
                continue
            want = min(limit - self._offset, _READ_CHUNK)
            data = os.pread(self._fd, want, self._offset)  # type: ignore[arg-type]
            records, used, bad = parse_records(data)
            if used == 0 and not bad:
                # a record bigger than the chunk: read exactly its length
                length = _REC.unpack_from(data, 0)[1] if len(data) >= _REC.size else -1
                if length >= 0 and self._offset + _REC.size + length <= limit:
                    data = os.pread(self._fd, _REC.size + length, self._offset)  # type: ignore[arg-type]
                    records, used, bad = parse_records(data)
                if used == 0:
                    bad = True  # a published size that does not end on a record
            for seq, payload in records:
                if end_seq is not None and seq >= end_seq:
                    return out
                self._offset += _REC.size + len(payload)
                if seq >= self.next_seq:
                    out.append((seq, payload))
                    self.next_seq = seq + 1
                    if len(out) >= max_records:
                        return out
            if bad:
                log.error("spool %s: corrupt record at offset %d, skipping the rest of the "
                          "segment", self._path, self._offset)
                self._spool.corrupt_bytes += limit - self._offset
                self._seg_first = seg.first_seq + 1
                self.close()
        return out
