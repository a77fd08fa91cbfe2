"""BatchProcessor.emit() latency on the event loop, fsync=always, where the loop used to wait on
the disk: segment rotation and memory-queue overflow.

    .venv/bin/python -m bench.emit_latency            # ~30 s
    .venv/bin/python -m bench.emit_latency --events 50000 --rounds 1

Every emit() is timed (perf_counter_ns) by one asyncio producer that yields to the loop every
100 events. The writer stands in for ClickHouse without its CPU cost (no chDB here), so the
figures are the spool's and the batcher's alone:

  steady    1 MiB segments (a rotation every few thousand events), a writer that keeps up
  overflow  the same, a 2,000-event memory queue and a writer that takes 20 ms per batch of
            500: the queue fills, new events wait on disk, the worker reads them back and
            switches to the memory queue again, over and over
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.storage_bench import EventFactory
from extproc.config import BatchSettings
from extproc.storage.batcher import BatchProcessor
from extproc.storage.spool import Spool


class CountingWriter:
    """Takes a batch in `delay` seconds (a stand-in for a ClickHouse insert)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.rows = 0
        self._done = threading.Event()

    def write(self, payloads: Sequence[bytes], token: str) -> None:
        if self.delay:
            self._done.wait(self.delay)
        self.rows += len(payloads)


SCENARIOS: dict[str, dict[str, Any]] = {
    "steady": {"queue": 100_000, "batch": 5_000, "delay": 0.0},
    "overflow": {"queue": 2_000, "batch": 500, "delay": 0.02},
}


async def run(scenario: str, n: int, directory: Path) -> dict[str, Any]:
    cfg = SCENARIOS[scenario]
    settings = BatchSettings(max_queue_size=cfg["queue"], max_batch_size=cfg["batch"],
                             flush_interval_ms=50)
    writer = CountingWriter(cfg["delay"])
    spool = Spool(directory, "always", segment_bytes=1 << 20)
    sink = BatchProcessor(writer, spool, settings)
    await sink.start()
    factory = EventFactory()
    events = [factory.next() for _ in range(64)]
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(n):
        event = events[i & 63]
        t = clock()
        sink.emit(event)
        samples.append(clock() - t)
        if i % 100 == 99:
            await asyncio.sleep(0)
    ok = await sink.force_flush(300)
    spooled = sink.events_spooled
    await sink.shutdown()
    samples.sort()
    us = [s / 1000 for s in samples]
    return {
        "scenario": scenario, "events": n, "stored": writer.rows, "flushed": ok,
        "events_spooled": spooled, "events_dropped": sink.events_dropped,
        "segments_created_in_emit": getattr(spool, "segments_created_inline", None),
        "p50_us": round(statistics.median(us), 2),
        "p99_us": round(us[int(len(us) * 0.99)], 2),
        "p999_us": round(us[int(len(us) * 0.999)], 1),
        "max_us": round(us[-1], 1),
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="extproc-emit-bench-", dir=args.dir) as tmp:
        for r in range(args.rounds):
            for scenario in SCENARIOS:
                row = await run(scenario, args.events, Path(tmp) / f"{scenario}-{r}")
                row["round"] = r + 1
                rows.append(row)
                print(json.dumps(row))
    return rows


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the spools go (default: the temp dir)")
    args = p.parse_args()
    rows = asyncio.run(main(args))
    print("\nmedian over rounds (µs):")
    for scenario in SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        med = {k: statistics.median(r[k] for r in mine) for k in ("p50_us", "p99_us", "p999_us",
                                                                   "max_us")}
        print(f"  {scenario:9s} " + "  ".join(f"{k} {v:g}" for k, v in med.items()))


if __name__ == "__main__":
    cli()
