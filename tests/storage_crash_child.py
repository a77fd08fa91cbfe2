"""Child process for tests/test_storage_crash.py.

emit MODE DIR: emit ~20k events/s through the real storage sink; after each
emit() returns, publish (events whose emit returned, spool.written_seq) in DIR/progress, an
mmap'ed file the parent reads after SIGKILL. Prints "ready" after 3000 events.
recover DIR: open the same storage (replaying the spool), shut down, print what is stored.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import struct
import sys
from pathlib import Path

from extproc.storage.store import open_storage
from tests.storage_helpers import make_event, settings_for


def _settings(directory: Path, fsync: str = "batch"):
    return settings_for(
        directory,
        spool={"fsync": fsync, "write_interval_ms": 50},
        batch={"flush_interval_ms": 200, "max_batch_size": 2000},
    )


async def emit(fsync: str, directory: Path) -> None:
    storage = await open_storage(_settings(directory, fsync))
    sink = storage.sink()
    await sink.start()
    spool = sink._spool
    fd = os.open(directory / "progress", os.O_RDWR)
    progress = mmap.mmap(fd, 16)
    for i in range(2_000_000):
        sink.emit(make_event(i))
        struct.pack_into("<QQ", progress, 0, i + 1, spool.written_seq)
        if i == 3000:
            print("ready", flush=True)
        if i % 200 == 0:
            await asyncio.sleep(0.01)  # ~20k events/s: a busy sidecar, not a tight loop


async def recover(directory: Path) -> None:
    storage = await open_storage(_settings(directory))
    sink = storage.sink()
    await sink.start()
    recovered = sink.events_recovered
    await sink.shutdown(60)
    ids = await storage.run(lambda c: c.query(
        "SELECT toUInt64(substring(request_id, 5)) FROM usage_events").result_columns)
    await storage.close()
    print(json.dumps({"ids": list(ids[0]) if ids else [], "recovered": recovered,
                      "dropped": sink.events_dropped}))


if __name__ == "__main__":
    if sys.argv[1] == "emit":
        asyncio.run(emit(sys.argv[2], Path(sys.argv[3])))
    else:
        asyncio.run(recover(Path(sys.argv[2])))
