"""The spool's manifest.log: which seq ranges went to ClickHouse as a batch, and up to where
everything is stored.

Records [kind][u64 first][u64 end][u32 crc]: B = batch [first, end) handed to ClickHouse (a
replay re-sends exactly that batch, so its dedup token matches), A = every seq < end is stored.
The file is compacted (the current ack and the open batches, written to a new file and renamed)
when it grows past a quarter MiB. One lock: the batcher's worker marks and acks, close() closes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections import deque
from contextlib import suppress
from pathlib import Path

from extproc.storage.spool_records import SpoolClosed

log = logging.getLogger(__name__)

_MAN = struct.Struct("<cQQ")  # kind, first, end
_MAN_CRC = struct.Struct("<I")
_MAN_SIZE = _MAN.size + _MAN_CRC.size
_COMPACT_BYTES = 256 * 1024
NAME = "manifest.log"


def _record(kind: bytes, first: int, end: int) -> bytes:
    body = _MAN.pack(kind, first, end)
    return body + _MAN_CRC.pack(zlib.crc32(body))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> tuple[int, list[tuple[int, int]]]:
    """(acknowledged end, batches) as recorded; a torn record at the end is ignored."""
    path = directory / NAME
    if not path.exists():
        return 0, []
    data = path.read_bytes()
    acked, pos = 0, 0
    batches: list[tuple[int, int]] = []
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


class Manifest:
    def __init__(self, directory: Path, sync: bool) -> None:
        self.dir = directory
        self._sync = sync  # fdatasync batch marks (fsync != never)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._acked = 0
        self._pending: deque[tuple[int, int]] = deque()  # batches not yet acknowledged
        self.errors = 0  # failed manifest writes

    @property
    def acked(self) -> int:
        return self._acked

    def open(self, acked: int, batches: list[tuple[int, int]]) -> None:
        with self._lock:
            self._acked = acked
            self._pending = deque(batches)
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.dir / "manifest.tmp"
        records = [(b"A", 0, self._acked)] + [(b"B", a, b) for a, b in self._pending]
        data = b"".join(_record(*r) for r in records)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / NAME)
        fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.dir / NAME, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)

    def mark_batch(self, first: int, end: int) -> None:
        with self._lock:
            fd = self._append(_record(b"B", first, end))
            if self._sync:
                os.fdatasync(fd)
            self._pending.append((first, end))

    def ack(self, end: int) -> bool:
        """Record that every seq < end is stored (no fsync: losing an ack only means a
        deduplicated replay). False if end acknowledges nothing new."""
        with self._lock:
            if end <= self._acked:
                return False
            try:
                self._append(_record(b"A", 0, end))
            except OSError as exc:  # disk full: the events are stored all the same
                log.warning("spool: could not record ack %d on disk (%s); a restart replays "
                            "those batches, deduplicated", end, exc)
            self._acked = end
            while self._pending and self._pending[0][1] <= end:
                self._pending.popleft()
            if self._size > _COMPACT_BYTES:
                self._rewrite()
            return True

    def _append(self, record: bytes) -> int:
        if self._fd is None:
            raise SpoolClosed("spool is closed")
        try:
            if os.write(self._fd, record) != len(record):
                raise OSError(errno.ENOSPC, "short write to the spool manifest")
        except OSError:
            self.errors += 1
            with suppress(OSError):  # no torn record left for later ones to follow (O_APPEND)
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(record)
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
