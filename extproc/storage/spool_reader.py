"""Sequential reader of a spool's written records, for the batcher's worker thread."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from extproc.storage.spool_records import MAGIC, REC, Segment, parse_records

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20


class SegmentIndex(Protocol):
    """What a reader needs from the spool (Spool implements it)."""

    def segment_after(self, first_seq: int) -> tuple[Segment | None, int, bool]:
        """The segment starting at first_seq, or the first one after it (when it is gone),
        with its written size and whether it is sealed."""
        ...

    def segment_start(self, seq: int) -> int:
        """first_seq of the segment that may hold seq."""
        ...

    def count_corrupt(self, nbytes: int) -> None: ...


class SpoolReader:
    """Records with seq >= from_seq, in order (gaps are skipped)."""

    def __init__(self, index: SegmentIndex, from_seq: int) -> None:
        self._index = index
        self.next_seq = from_seq
        self._seg_first = index.segment_start(from_seq)
        self._path: Path | None = None
        self._fd: int | None = None
        self._offset = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, seg: Segment) -> int:
        self.close()
        self._seg_first, self._path = seg.first_seq, seg.path
        self._fd = fd = os.open(seg.path, os.O_RDONLY)
        self._offset = len(MAGIC)
        return fd

    def read(self, max_records: int, end_seq: int | None = None) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        while len(out) < max_records:
            seg, limit, sealed = self._index.segment_after(self._seg_first)
            if seg is None:
                break
            fd = self._fd
            if fd is None or seg.first_seq != self._seg_first:
                fd = self._open(seg)
            if self._offset >= limit:
                if not sealed:
                    break  # caught up with the writer
                self._seg_first = seg.first_seq + 1  # next segment
                self.close()
                continue
            want = min(limit - self._offset, _READ_CHUNK)
            data = os.pread(fd, want, self._offset)
            records, used, bad = parse_records(data)
            if used == 0 and not bad:
                # a record bigger than the chunk: read exactly its length
                length = REC.unpack_from(data, 0)[1] if len(data) >= REC.size else -1
                if length >= 0 and self._offset + REC.size + length <= limit:
                    data = os.pread(fd, REC.size + length, self._offset)
                    records, used, bad = parse_records(data)
                if used == 0:
                    bad = True  # a published size that does not end on a record
            for seq, payload in records:
                if end_seq is not None and seq >= end_seq:
                    return out
                self._offset += REC.size + len(payload)
                if seq >= self.next_seq:
                    out.append((seq, payload))
                    self.next_seq = seq + 1
                    if len(out) >= max_records:
                        return out
            if bad:
                log.error("spool %s: corrupt record at offset %d, skipping the rest of the "
                          "segment", self._path, self._offset)
                self._index.count_corrupt(limit - self._offset)
                self._seg_first = seg.first_seq + 1
                self.close()
        return out
