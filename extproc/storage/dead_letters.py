"""The spool's deadletter/ folder: what can never be inserted, kept for an operator.

deadletter.seg holds records ClickHouse rejected as data errors (the segment format of
spool_records.py) and index.jsonl the reason for each; corrupt-*.bin hold bytes recovery found
damaged in a segment. Never deleted automatically, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from extproc.storage.spool_records import MAGIC, encode_record

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self.count = 0  # records dead-lettered by this process

    def quarantine(self, name: str, data: bytes, reason: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"corrupt-{name}-{time.time_ns()}.bin"
        target.write_bytes(data)
        log.error("spool: %s in %s: %d byte(s) moved to %s", reason, name, len(data), target)

    def add(self, records: list[tuple[int, bytes]], reason: str) -> None:
        if not records:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            with open(self.dir / "deadletter.seg", "ab") as f:
                if f.tell() == 0:
                    f.write(MAGIC)
                f.write(b"".join(encode_record(seq, p) for seq, p in records))
                f.flush()
                os.fsync(f.fileno())
            now = time.time()
            with open(self.dir / "index.jsonl", "a", encoding="utf-8") as f:
                for seq, payload in records:
                    f.write(json.dumps({"seq": seq, "bytes": len(payload), "time": now,
                                        "reason": reason[:500]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.count += len(records)
        log.error("spool: %d event(s) moved to %s: %s", len(records), self.dir, reason[:500])
