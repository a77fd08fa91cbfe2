"""Storage benchmark: events/s from BatchProcessor.emit() into embedded ClickHouse (chDB), and
process memory under a 10x burst.

    .venv/bin/python -m bench.storage_bench            # ~1 min; writes bench/results/storage.json
    .venv/bin/python -m bench.storage_bench --quick    # smaller, for a smoke run

sustained  N events emitted as fast as one asyncio producer can, through the real pipeline
           (spool write-ahead, batching, Arrow, dedup-token insert, rollup MV); the rate is
           N / (first emit -> force_flush() returned, i.e. all of them stored).
burst      a steady rate, then 10x that rate, then back; RSS sampled every 50 ms. Run twice:
           ClickHouse keeping up, and ClickHouse stalled through the burst (inserts blocked),
           where the memory queue fills and the rest goes to the disk spool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.storage.batcher import BatchProcessor
from extproc.storage.sink import BatchWriter
from extproc.storage.spool import Spool
from extproc.storage.store import Storage, open_storage

RESULTS = Path(__file__).resolve().parent / "results" / "storage.json"
TEAMS = ["search", "ads", "support", "research", "platform", "growth", "mobile", "infra"]
MODELS = ["llama-3-8b", "llama-3-70b", "qwen-2.5-7b", "deepseek-r1"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class RssSampler:
    def __init__(self, every: float = 0.05) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_mb()))
            self._stop.wait(every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max(v for _, v in self.samples)


class EventFactory:
    """Realistic, unique events without paying for building a message per event."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:12]
        self.pool: list[UsageEvent] = []
        for i in range(64):
            e = UsageEvent(
                endpoint="chat", path="/v1/chat/completions", method="POST",
                request_model=MODELS[i % 4], response_model=MODELS[i % 4], stream=i % 3 != 0,
                http_status=200 if i % 50 else 500, finish_reason="stop",
                prompt_tokens=200 + 37 * i, completion_tokens=50 + 11 * i, cached_tokens=16 * (i % 4),
                total_tokens=250 + 48 * i, token_source=TokenSource.UPSTREAM_USAGE,
                time_to_first_token_ns=40_000_000 + i * 1_000_000, duration_ns=900_000_000 + i * 9_000_000,
                metered=True, choices=1, usage_injected=True, response_events=50 + i,
            )
            e.labels.update({"team": TEAMS[i % 8], "feature": f"feature-{i % 5}",
                             "user": f"user-{i % 64}", "env": "prod"})
            self.pool.append(e)
        self.n = 0

    def next(self) -> UsageEvent:
        n = self.n
        self.n = n + 1
        e = self.pool[n & 63]
        e.event_id = f"{self.run}-{n}"
        e.request_id = f"req-{n}"
        now = time.time_ns()
        e.start_time_unix_nano = now - e.duration_ns
        e.end_time_unix_nano = now
        return e


class Gate:
    """A BatchWriter that blocks while the gate is closed: ClickHouse stalled."""

    def __init__(self, inner: BatchWriter) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()

    def write(self, payloads: Sequence[bytes], token: str) -> None:
        self.open.wait()
        self.inner.write(payloads, token)


def settings_in(directory: Path, fsync: str) -> Settings:
    s = Settings()
    s.storage.dsn = f"chdb://{directory / 'chdb'}"
    s.spool.dir = str(directory / f"spool-{fsync}-{uuid.uuid4().hex[:6]}")
    s.spool.fsync = fsync
    return s


def processor(storage: Storage, fsync: str, writer: BatchWriter | None = None) -> BatchProcessor:
    s = storage.settings
    spool = Spool(Path(s.spool.dir), fsync, s.spool.segment_bytes, s.spool.write_interval_ms)
    return BatchProcessor(writer or storage.writer(), spool, s.batch)


async def stored(storage: Storage) -> int:
    return int(await storage.run(lambda c: c.command("SELECT count() FROM usage_events")))


async def sustained(storage: Storage, n: int, fsync: str) -> dict[str, Any]:
    storage.settings.spool.fsync = fsync
    storage.settings.spool.dir = str(Path(storage.settings.spool.dir).parent / f"spool-{fsync}")
    sink = processor(storage, fsync)
    await sink.start()
    factory = EventFactory()
    before = await stored(storage)
    emit_us: list[float] = []
    with RssSampler() as rss:
        t0 = time.perf_counter()
        for i in range(n):
            if i % 100 == 0:
                t = time.perf_counter()
                sink.emit(factory.next())
                emit_us.append((time.perf_counter() - t) * 1e6)
                if i % 1000 == 0:
                    await asyncio.sleep(0)  # a server loop has other work: let it breathe
            else:
                sink.emit(factory.next())
        t_emit = time.perf_counter() - t0
        ok = await sink.force_flush(600)
        t_all = time.perf_counter() - t0
    inserted = await stored(storage) - before
    await sink.shutdown()
    emit_us.sort()
    return {
        "fsync": fsync, "events": n, "flushed": ok, "stored": inserted,
        "events_per_s": round(n / t_all), "emit_rate_per_s": round(n / t_emit),
        "seconds": round(t_all, 2),
        "emit_us_p50": round(statistics.median(emit_us), 2),
        "emit_us_p99": round(emit_us[int(len(emit_us) * 0.99)], 2),
        "emit_us_max": round(emit_us[-1], 1),
        "batches": sink.batches_inserted, "avg_batch": round(n / max(1, sink.batches_inserted)),
        "events_spooled": sink.events_spooled, "events_dropped": sink.events_dropped,
        "peak_rss_mb": round(rss.peak, 1),
    }


async def paced(sink: BatchProcessor, factory: EventFactory, rate: int, seconds: float,
                stats: dict[str, float]) -> None:
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    end = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < end:
        for _ in range(per_tick):
            sink.emit(factory.next())
        stats["queue_max"] = max(stats["queue_max"], sink.queue_depth)
        stats["backlog_max"] = max(stats["backlog_max"], sink.backlog)
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


async def burst(storage: Storage, base_rate: int, stall: bool, phase_s: float) -> dict[str, Any]:
    gate = Gate(storage.writer())
    sink = processor(storage, "batch", gate)
    await sink.start()
    factory = EventFactory()
    before = await stored(storage)
    st = {"queue_max": 0.0, "backlog_max": 0.0}
    with RssSampler() as rss:
        await paced(sink, factory, base_rate, phase_s, st)
        rss_base = rss_mb()
        if stall:
            gate.open.clear()
        t_burst = time.monotonic()
        await paced(sink, factory, base_rate * 10, phase_s, st)
        achieved = (factory.n - base_rate * phase_s) / (time.monotonic() - t_burst)
        rss_burst_end = rss_mb()
        spool_peak = sink.spool_bytes
        gate.open.set()
        t_drain = time.monotonic()
        await paced(sink, factory, base_rate, phase_s, st)
        ok = await sink.force_flush(600)
        drain_s = time.monotonic() - t_drain
    inserted = await stored(storage) - before
    await sink.shutdown()
    return {
        "clickhouse": "stalled during burst" if stall else "available",
        "base_rate": base_rate, "burst_rate": base_rate * 10,
        "burst_rate_achieved": round(achieved), "phase_s": phase_s,
        "events": factory.n, "stored": inserted, "flushed": ok,
        "rss_before_burst_mb": round(rss_base, 1), "rss_end_of_burst_mb": round(rss_burst_end, 1),
        "rss_peak_mb": round(rss.peak, 1),
        "queue_depth_max": int(st["queue_max"]), "backlog_max": int(st["backlog_max"]),
        "events_spooled": sink.events_spooled, "spool_mb_end_of_burst": round(spool_peak / 1e6, 1),
        "events_dropped": sink.events_dropped, "drain_s": round(drain_s, 2),
    }


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="extproc-storage-bench-"))
    try:
        storage = await open_storage(settings_in(work, "batch"))
        rss_start = rss_mb()
        results: dict[str, Any] = {"sustained": [], "burst": []}
        # bursts first: their RSS figures should not include caches grown by 1M prior inserts
        for stall in (False, True):
            results["burst"].append(await burst(storage, args.base_rate, stall, args.phase))
        for fsync, n in (("batch", args.events), ("always", args.events // 2),
                         ("never", args.events // 2)):
            results["sustained"].append(await sustained(storage, n, fsync))
        await storage.close()
        results["rss_after_open_mb"] = round(rss_start, 1)
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()}
        results["command"] = "python -m bench.storage_bench " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "quick")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--base-rate", type=int, default=5_000, help="events/s before the 10x burst")
    p.add_argument("--phase", type=float, default=3.0, help="seconds per burst phase")
    p.add_argument("--quick", action="store_true", help="50k events, 1 s phases")
    args = p.parse_args()
    if args.quick:
        args.events, args.phase = 50_000, 1.0
    results = asyncio.run(main(args))
    print("\nsustained: BatchProcessor.emit() -> chDB, all events stored")
    print(table(results["sustained"], ["fsync", "events", "events_per_s", "emit_rate_per_s",
                                       "emit_us_p50", "emit_us_p99", "avg_batch",
                                       "events_spooled", "events_dropped", "peak_rss_mb"]))
    print(f"\n10x burst ({args.base_rate}/s -> {args.base_rate * 10}/s -> {args.base_rate}/s, "
          f"{args.phase:g} s each); RSS after opening chDB: {results['rss_after_open_mb']} MB")
    print(table(results["burst"], ["clickhouse", "burst_rate_achieved", "rss_before_burst_mb",
                                   "rss_peak_mb", "queue_depth_max", "events_spooled",
                                   "spool_mb_end_of_burst", "events_dropped", "drain_s"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    cli()
