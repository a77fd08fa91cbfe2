"""BatchProcessor against an in-memory writer with ClickHouse's dedup semantics: batching,
flush/shutdown, faults, queue overflow, data-error isolation, replay after a restart."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path

import pytest

from extproc.config import BatchSettings
from extproc.storage import spool as spool_mod
from extproc.storage.batcher import BatchProcessor
from extproc.storage.spool import Spool, iter_segment
from tests.storage_helpers import (
    FAULTS,
    FakeWriter,
    PipelinedFakeWriter,
    flaky,
    make_event,
    wait_until,
)


def batcher(tmp_path: Path, writer, *, fsync: str = "batch", **batch) -> BatchProcessor:
    settings = BatchSettings(
        **{"flush_interval_ms": 50, "retry_initial_ms": 5, "retry_max_ms": 40, **batch}
    )
    return BatchProcessor(writer, Spool(tmp_path / "spool", fsync, segment_bytes=64 * 1024),
                          settings)


def assert_exactly_once(writer: FakeWriter, ids: list[str]) -> None:
    counts = writer.ids()
    assert set(counts) == set(ids), f"missing {len(set(ids) - set(counts))}"
    assert max(counts.values()) == 1, "duplicates"


class _FullDisk:
    """ENOSPC from the spool's files (segments, manifest) and from preallocation while `on`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.hits = 0
        real_write, real_fallocate = os.write, os.posix_fallocate

        def write(fd: int, data: bytes) -> int:
            if self.on and os.readlink(f"/proc/self/fd/{fd}").endswith((".seg", "manifest.log")):
                self._fail()
            return real_write(fd, data)

        def fallocate(fd: int, offset: int, length: int) -> None:
            if self.on:
                self._fail()
            real_fallocate(fd, offset, length)

        monkeypatch.setattr(spool_mod.os, "write", write)
        monkeypatch.setattr(spool_mod.os, "posix_fallocate", fallocate)

    def _fail(self) -> None:
        self.hits += 1
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer_cls", [FakeWriter, PipelinedFakeWriter])
async def test_flushes_at_max_batch_size(tmp_path: Path, writer_cls, caplog) -> None:
    w = writer_cls()
    bp = batcher(tmp_path, w, max_batch_size=100, flush_interval_ms=60_000)
    await bp.start()
    for i in range(1000):
        bp.emit(make_event(i))
    assert await asyncio.to_thread(wait_until, lambda: len(w.rows) == 1000, 5)
    assert w.batch_sizes == [100] * 10  # size-triggered, the interval never elapsed
    await bp.shutdown()
    # the worker loop's own bugs are caught, logged and retried: none may happen here
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_flushes_on_interval(tmp_path: Path) -> None:
    w = FakeWriter()
    bp = batcher(tmp_path, w, max_batch_size=10_000, flush_interval_ms=100)
    await bp.start()
    t0 = time.monotonic()
    for i in range(3):
        bp.emit(make_event(i))
    assert await asyncio.to_thread(wait_until, lambda: len(w.rows) == 3, 5)
    assert 0.05 < time.monotonic() - t0 < 1.0
    await bp.shutdown()


async def test_force_flush_and_shutdown_flush_everything(tmp_path: Path) -> None:
    w = FakeWriter()
    bp = batcher(tmp_path, w, flush_interval_ms=60_000)
    await bp.start()
    events = [make_event(i) for i in range(250)]
    for e in events[:200]:
        bp.emit(e)
    assert await bp.force_flush(5)
    assert len(w.rows) == 200
    for e in events[200:]:
        bp.emit(e)
    await bp.shutdown(5)
    assert_exactly_once(w, [e.event_id for e in events])
    assert bp.events_inserted == 250 and bp.backlog == 0 and bp.spool_bytes == 0
    assert not list((tmp_path / "spool").glob("*.seg"))  # nothing left to replay


async def test_emit_never_raises(tmp_path: Path) -> None:
    w = FakeWriter()
    bp = batcher(tmp_path, w)
    await bp.start()
    bp.emit("not an event")  # type: ignore[arg-type]
    assert bp.events_dropped == 1
    await bp.shutdown()
    bp.emit(make_event(1))  # after shutdown: counted, not raised
    assert bp.events_dropped == 2


async def test_events_emitted_before_start_are_kept(tmp_path: Path) -> None:
    w = FakeWriter()
    bp = batcher(tmp_path, w)
    events = [make_event(i) for i in range(10)]
    for e in events:
        bp.emit(e)
    await bp.start()
    await bp.shutdown()
    assert_exactly_once(w, [e.event_id for e in events])


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("commit_then_fail", [False, True])
@pytest.mark.parametrize("writer_cls", [FakeWriter, PipelinedFakeWriter])
async def test_failures_under_load_deliver_exactly_once(
    tmp_path: Path, fault: str, commit_then_fail: bool, writer_cls: type[FakeWriter]
) -> None:
    inner = writer_cls()
    faulty = flaky(inner, fault, commit_then_fail=commit_then_fail)
    bp = batcher(tmp_path, faulty, max_batch_size=50, max_queue_size=300)
    await bp.start()
    events = [make_event(i) for i in range(3000)]
    for n, e in enumerate(events):
        if n == 500:
            faulty.failing.set()
        if n == 2500:  # end the outage once it has really been hit
            await asyncio.to_thread(wait_until, lambda: faulty.failures >= 2, 10)
            faulty.failing.clear()
        bp.emit(e)
        if n % 100 == 0:
            await asyncio.sleep(0.005)  # a stream, not one burst
    assert await bp.force_flush(10)
    await bp.shutdown()
    assert faulty.failures > 0 and bp.insert_failures == faulty.failures
    assert bp.events_spooled > 0  # the 300-event queue overflowed to disk meanwhile
    assert bp.events_dropped == 0
    assert_exactly_once(inner, [e.event_id for e in events])
    # in order: sequence order is emit order
    assert [e.request_id for e in inner.rows] == [e.request_id for e in events]


async def test_queue_full_spools_and_replays_in_order(tmp_path: Path) -> None:
    inner = FakeWriter()
    faulty = flaky(inner)
    faulty.failing.set()
    bp = batcher(tmp_path, faulty, max_batch_size=100, max_queue_size=200)
    await bp.start()
    events = [make_event(i) for i in range(5000)]
    for e in events:
        bp.emit(e)
    assert bp.queue_depth <= 200
    assert bp.events_spooled >= 4700
    assert bp.backlog == 5000
    await asyncio.sleep(0.2)
    assert bp.spool_oldest_age_s > 0.1
    faulty.failing.clear()
    assert await bp.force_flush(10)
    assert bp.events_replayed >= 4700
    assert bp.spool_oldest_age_s == 0
    await bp.shutdown()
    assert [e.request_id for e in inner.rows] == [e.request_id for e in events]
    assert_exactly_once(inner, [e.event_id for e in events])


@pytest.mark.parametrize("writer_cls", [FakeWriter, PipelinedFakeWriter])
async def test_data_error_isolates_the_bad_row(tmp_path: Path, writer_cls) -> None:
    events = [make_event(i) for i in range(100)]
    w = writer_cls(poison={events[37].event_id})
    bp = batcher(tmp_path, w, max_batch_size=100)
    await bp.start()
    for e in events:
        bp.emit(e)
    await bp.shutdown()
    assert_exactly_once(w, [e.event_id for n, e in enumerate(events) if n != 37])
    assert bp.events_dead_lettered == 1 and bp.events_dropped == 0
    dead = list(iter_segment(tmp_path / "spool" / "deadletter" / "deadletter.seg"))
    assert [p for _, p in dead] == [events[37].SerializeToString()]
    reason = (tmp_path / "spool" / "deadletter" / "index.jsonl").read_text()
    assert "poisoned test row" in reason


async def test_undecodable_spool_record_is_dead_lettered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    good = [make_event(i) for i in range(5)]
    spool.append(good[0].SerializeToString())
    bad = good[1].SerializeToString().replace(b"team-1", b"team\xff1")  # invalid UTF-8
    spool.append(bad)
    for e in good[2:]:
        spool.append(e.SerializeToString())
    spool.close()
    w = FakeWriter()
    bp = batcher(tmp_path, w)
    await bp.start()
    assert bp.events_recovered == 5
    await bp.shutdown()
    assert_exactly_once(w, [good[i].event_id for i in (0, 2, 3, 4)])
    assert bp.events_dead_lettered == 1


async def test_restart_replays_what_the_spool_holds(tmp_path: Path) -> None:
    inner = FakeWriter()
    faulty = flaky(inner)
    faulty.failing.set()
    first = batcher(tmp_path, faulty)
    await first.start()
    events = [make_event(i) for i in range(700)]
    for e in events:
        first.emit(e)
    await first.shutdown(timeout=0.3)  # ClickHouse down: gives up, everything stays spooled
    assert inner.rows == [] and first.backlog == 700

    second = batcher(tmp_path, inner)
    await second.start()
    assert second.events_recovered == 700
    await second.shutdown()
    assert_exactly_once(inner, [e.event_id for e in events])


async def test_replayed_batch_is_deduplicated_after_an_unacknowledged_insert(tmp_path: Path) -> None:
    """The insert reached ClickHouse but the process died before recording it: the replay
    sends the very same batch (same boundaries, same token) and ClickHouse drops it."""
    inner = PipelinedFakeWriter()
    faulty = flaky(inner, "timeout", commit_then_fail=True)
    faulty.failing.set()
    first = batcher(tmp_path, faulty, max_batch_size=64)
    await first.start()
    events = [make_event(i) for i in range(200)]
    for e in events:
        first.emit(e)
    await asyncio.to_thread(wait_until, lambda: len(inner.rows) > 0, 5)
    await first.shutdown(timeout=0.2)
    assert 0 < len(inner.rows) < 200
    assert first.backlog > 0

    second = batcher(tmp_path, inner, max_batch_size=64)
    await second.start()
    await second.shutdown()
    assert_exactly_once(inner, [e.event_id for e in events])


async def test_emit_does_not_block_while_clickhouse_hangs(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    class Hanging(FakeWriter):
        def write(self, events, token):
            release.wait(10)
            super().write(events, token)

    w = Hanging()
    bp = batcher(tmp_path, w, max_batch_size=10)
    await bp.start()
    worst = 0.0
    for i in range(2000):
        t = time.perf_counter()
        bp.emit(make_event(i))
        worst = max(worst, time.perf_counter() - t)
    assert worst < 0.05
    release.set()
    await bp.shutdown()
    assert len(w.ids()) == 2000


@pytest.mark.parametrize("writer_cls", [FakeWriter, PipelinedFakeWriter])
@pytest.mark.parametrize("fsync", ["batch", "always"])
async def test_disk_full_under_the_spool_loses_no_event(tmp_path: Path, fsync: str, writer_cls, monkeypatch) -> None:
    """ENOSPC while spooling (a write in batch mode, a new preallocated segment in always mode,
    batch marks and acks in the manifest): the events stay queued in memory and reach ClickHouse
    once each, no batch waits for the disk, the errors are counted, and once the disk has room
    again the spool carries on: a restart finds nothing left to replay."""
    disk = _FullDisk(monkeypatch)
    w = writer_cls()
    bp = batcher(tmp_path, w, fsync=fsync, max_batch_size=50, flush_interval_ms=20)
    await bp.start()
    events = [make_event(i) for i in range(600)]
    for n, e in enumerate(events):
        disk.on = 200 <= n < 400  # small segments: in always mode new ones are needed meanwhile
        bp.emit(e)
        if n % 50 == 0:
            await asyncio.sleep(0.03)  # let batch mode's flusher write while the disk is full
    disk.on = False
    await bp.shutdown()
    assert disk.hits > 0
    assert_exactly_once(w, [e.event_id for e in events])
    assert bp.events_dropped == 0
    assert bp.spool_errors > 0 and bp.stats()["spool_errors"] == bp.spool_errors  # what /metrics shows
    assert bp.events_inserted == len(events)
    assert bp._spool.manifest_errors > 0  # batch marks or acks hit the full disk too

    w2 = writer_cls()
    again = batcher(tmp_path, w2, fsync=fsync)
    await again.start()
    await again.shutdown()
    assert w2.rows == [] and again.events_recovered == 0


async def test_disk_full_at_shutdown_with_clickhouse_down_says_what_is_lost(tmp_path: Path, monkeypatch,
                                                                             caplog) -> None:
    """The worst case: ClickHouse down and the disk full when the sidecar stops. Shutdown still
    completes (no exception), says how many events could not be kept, and the next start replays
    exactly what had reached the disk before it filled up."""
    disk = _FullDisk(monkeypatch)
    down = flaky(FakeWriter())
    down.failing.set()
    bp = batcher(tmp_path, down, max_batch_size=50)
    await bp.start()
    kept = [make_event(i) for i in range(100)]
    for e in kept:
        bp.emit(e)
    assert await asyncio.to_thread(wait_until, lambda: bp._spool.written_seq >= 100, 5)  # on disk
    disk.on = True
    for i in range(100, 300):
        bp.emit(make_event(i))
    with caplog.at_level(logging.ERROR, logger="extproc.storage.batcher"):
        await bp.shutdown(timeout=1)
    assert any(r.getMessage().startswith("shutdown: 300 usage event(s) not yet in ClickHouse; 200 of them could "
                                         "not be written to the spool") for r in caplog.records)

    disk.on = False
    w = FakeWriter()
    again = batcher(tmp_path, w)
    await again.start()
    await again.shutdown()
    assert_exactly_once(w, [e.event_id for e in kept])


class _OwnedLock:
    """A lock that knows which thread holds it."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> _OwnedLock:
        import threading

        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()

    def held_here(self) -> bool:
        import threading

        return self.owner == threading.get_ident()


@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_no_file_syscall_under_a_lock_emit_takes(tmp_path: Path, monkeypatch, fsync: str) -> None:
    """emit() takes the batcher's queue lock and the spool's lock: no thread may create, write,
    read, truncate or sync a file while holding either (else emit() waits on the disk), through
    segment rotations and memory-queue overflows and the switches back."""
    import threading

    w = FakeWriter()
    bp = batcher(tmp_path, w, fsync=fsync, max_queue_size=100, max_batch_size=40, flush_interval_ms=10)
    queue_lock, spool_lock = _OwnedLock(), _OwnedLock()
    bp._source.lock = bp._lock = queue_lock  # type: ignore[assignment]
    bp._spool._lock = spool_lock  # type: ignore[assignment]
    bad: list[str] = []
    for name in ("open", "write", "pread", "ftruncate", "fdatasync", "fsync", "posix_fallocate"):
        real = getattr(os, name)

        def checked(*args, _real=real, _name=name):
            if queue_lock.held_here() or spool_lock.held_here():
                bad.append(f"os.{_name} in {threading.current_thread().name}")
            return _real(*args)

        monkeypatch.setattr(os, name, checked)
    await bp.start()
    events = [make_event(i) for i in range(3000)]
    for n, e in enumerate(events):
        bp.emit(e)
        if bp._spool._spare_wanted:  # the rotation after it must find its spare ready
            assert await asyncio.to_thread(wait_until, lambda: bp._spool._spare is not None, 5)
        if n % 200 == 199:
            await asyncio.to_thread(wait_until, lambda: bp.queue_depth == 0, 5)  # switch back
    await bp.shutdown()
    assert_exactly_once(w, [e.event_id for e in events])
    assert bp.events_spooled > 0 and bp._spool.segments_created_inline == 0
    assert bad == []
    left = await asyncio.to_thread(lambda: list(tmp_path.glob("spool/*.seg")))
    assert left == []  # all stored: nothing left, no spare either
