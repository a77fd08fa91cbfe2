"""The spool's segment files: record format, creating segments, recovering one after a crash.

A segment is an 8-byte magic, then records [u64 seq][u32 length][u32 crc32(seq, length,
payload)][payload], payload one serialized UsageEvent. Nothing here holds spool state or locks.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"EXSPOOL1"
REC = struct.Struct("<QII")  # seq, payload length, crc
MAX_RECORD = 64 * 1024 * 1024
_SCAN_LIMIT = 4 << 20  # how far past a bad record recovery looks for an intact one



class SpoolClosed(RuntimeError):
    pass


# quarantine(segment name, bytes, reason): keeps bytes recovery cannot use (dead_letters.py)
Quarantine = Callable[[str, bytes, str], None]


def record_crc(seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, len(payload))))


def encode_record(seq: int, payload: bytes) -> bytes:
    return REC.pack(seq, len(payload), record_crc(seq, payload)) + payload


def first_seq_of(records: bytes) -> int:
    """The seq of the first of some encoded records."""
    return int(struct.unpack_from("<Q", records, 0)[0])


def parse_records(data: bytes | memoryview) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Parse whole records from `data`. Returns (records, bytes consumed, hit a bad record)."""
    view = memoryview(data)
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(view)
    while pos + REC.size <= end:
        seq, length, crc = REC.unpack_from(view, pos)
        if length > MAX_RECORD:
            return out, pos, True
        stop = pos + REC.size + length
        if stop > end:
            break
        payload = view[pos + REC.size:stop]
        if record_crc(seq, payload) != crc:
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
class Segment:
    first_seq: int
    path: Path
    size: int  # bytes written and visible to readers (incl. magic)
    end_seq: int  # one past the last seq written
    sealed: bool = False
    fd: int | None = None
    mm: mmap.mmap | None = None  # fsync=always: records are copied into this mapping
    capacity: int = 0  # preallocated file size when mapped


@dataclass
class Handle:
    """A segment's open file, released (synced, trimmed, closed) off the event loop."""

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


def segment_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:020d}.seg"


def create_mapped(path: Path, capacity: int) -> tuple[int, mmap.mmap]:
    """A preallocated segment (a full disk fails here with ENOSPC, not as a SIGBUS in the middle
    of a copy), mapped shared, magic written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, capacity)
        mm = mmap.mmap(fd, capacity)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    mm[:len(MAGIC)] = MAGIC
    return fd, mm


def create_appending(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        os.write(fd, MAGIC)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def holds_records(path: Path) -> bool:
    """False for a segment with no record: created (or preallocated ahead of need) and never
    written. A record header is never all zeros (its crc covers seq and length)."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + REC.size)
    return len(head) == len(MAGIC) + REC.size and bool(head[len(MAGIC):].strip(b"\0"))


def _later_record(body: memoryview, bad_at: int) -> bool:
    """Is there an intact record after the bad one? Then it is corruption, not a torn tail
    (which is a cut-off record, or zeros the filesystem allocated but never wrote)."""
    if not bytes(body[bad_at:]).strip(b"\0"):
        return False
    for pos in range(bad_at + 1, min(len(body) - REC.size, bad_at + _SCAN_LIMIT)):
        seq, length, crc = REC.unpack_from(body, pos)
        stop = pos + REC.size + length
        if length <= MAX_RECORD and stop <= len(body) and record_crc(seq, body[pos + REC.size:stop]) == crc:
            return True
    return False


@dataclass
class RecoveredSegment:
    segment: Segment | None  # None: nothing left in it (the file is deleted)
    truncated_bytes: int = 0
    corrupt_bytes: int = 0
    unacked: int = 0  # records with seq >= acked


def recover_segment(path: Path, last: bool, acked: int, quarantine: Quarantine) -> RecoveredSegment:
    """Keep the intact records of one segment: a torn or unused tail is cut off, a corrupt
    middle is quarantined (the rest of that file is lost to the replay, not to the operator)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            path.unlink()  # crashed while creating it
            return RecoveredSegment(None, truncated_bytes=len(data))
        quarantine(path.name, data, "bad segment header")
        path.unlink()
        return RecoveredSegment(None, corrupt_bytes=len(data))
    body = memoryview(data)[len(MAGIC):]
    records, used, bad = parse_records(body)
    good = len(MAGIC) + used
    truncated = corrupt = 0
    if good < len(data):
        zeros = not bytes(body[used:]).strip(b"\0")  # preallocated, never written
        if not bad or zeros or (last and not _later_record(body, used)):
            truncated = len(data) - good  # torn or unused tail
        else:
            corrupt = len(data) - good
            quarantine(path.name, data[good:], "corrupt record")
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
        if truncated and records:
            log.warning("spool %s: cut a torn tail of %d byte(s)", path.name, truncated)
    if not records:
        path.unlink()
        return RecoveredSegment(None, truncated, corrupt)
    unacked = sum(1 for seq, _ in records if seq >= acked)
    segment = Segment(records[0][0], path, good, records[-1][0] + 1)
    return RecoveredSegment(segment, truncated, corrupt, unacked)


@dataclass
class RecoveredSegments:
    segments: list[Segment]  # sealed, in seq order, each holding an unacknowledged record
    end_seq: int = 0  # one past the last record found
    unacked: int = 0
    truncated_bytes: int = 0
    corrupt_bytes: int = 0


def recover_segments(directory: Path, acked: int, spare_suffix: str,
                     quarantine: Quarantine) -> RecoveredSegments:
    """Every segment file of a spool directory, recovered; files left with nothing
    unacknowledged are deleted. A spare (named with spare_suffix) that never held a record
    counts as nothing torn."""
    out = RecoveredSegments([])
    paths = sorted(directory.glob("*.seg"))
    # the last segment written is the last one holding records (a spare may come after it)
    written = [p for p in paths if holds_records(p)]
    last = written[-1] if written else None
    for path in paths:
        found = recover_segment(path, path == last, acked, quarantine)
        if path.name.endswith(spare_suffix) and path not in written and not found.corrupt_bytes:
            continue
        out.truncated_bytes += found.truncated_bytes
        out.corrupt_bytes += found.corrupt_bytes
        seg = found.segment
        if seg is None:
            continue
        out.unacked += found.unacked
        if seg.end_seq <= acked:
            path.unlink()  # acknowledged before the crash, deletion did not happen
            continue
        seg.sealed = True
        out.segments.append(seg)
        out.end_seq = max(out.end_seq, seg.end_seq)
    out.segments.sort(key=lambda s: s.first_seq)
    return out
