"""The on-disk spool: order, rotation, acks, recovery from torn tails and corruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.storage.spool import MAGIC, Spool, SpoolClosed, iter_segment


def payload(i: int, size: int = 40) -> bytes:
    return f"event-{i:08d}-".encode().ljust(size, b"x")


def read_all(spool: Spool, from_seq: int) -> list[tuple[int, bytes]]:
    reader = spool.reader(from_seq)
    try:
        return reader.read(10**9)
    finally:
        reader.close()


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool", fsync="batch", segment_bytes=4096, write_interval_ms=10_000)
    s.open()
    yield s
    s.close()


def test_append_read_in_order_across_segments(spool: Spool) -> None:
    for i in range(500):
        assert spool.append(payload(i)) == i
        if i % 50 == 49:
            spool.flush()  # batch mode rotates between writes: one flush = one write
    segments = sorted(spool.dir.glob("*.seg"))
    assert len(segments) > 3  # rotated at 4 KiB
    records = read_all(spool, 0)
    assert [seq for seq, _ in records] == list(range(500))
    assert all(p == payload(seq) for seq, p in records)
    assert [seq for seq, _ in read_all(spool, 321)] == list(range(321, 500))


def test_reader_follows_the_writer(spool: Spool) -> None:
    reader = spool.reader(0)
    for i in range(10):
        spool.append(payload(i))
    assert reader.read(100) == []  # buffered (fsync=batch), not written yet
    spool.flush()
    assert [s for s, _ in reader.read(100)] == list(range(10))
    for i in range(10, 300):
        spool.append(payload(i))
    spool.flush()
    assert [s for s, _ in reader.read(1000)] == list(range(10, 300))
    reader.close()


def test_ack_deletes_acknowledged_segments(spool: Spool) -> None:
    for i in range(1000):
        spool.append(payload(i))
        if i % 50 == 49:
            spool.flush()
    before = spool.spool_bytes
    spool.ack(900)
    assert spool.spool_bytes < before / 3
    remaining = [seq for path in sorted(spool.dir.glob("*.seg")) for seq, _ in iter_segment(path)]
    assert remaining[0] <= 900 and remaining[-1] == 999


def test_reopen_keeps_acks_batches_and_unacked_events(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="batch", segment_bytes=4096)
    s.open()
    for i in range(200):
        s.append(payload(i))
    s.ensure_durable(200)
    s.mark_batch(0, 100)
    s.ack(100)
    s.mark_batch(100, 150)  # handed to ClickHouse, outcome unknown
    s.close()

    s2 = Spool(tmp_path, fsync="batch", segment_bytes=4096)
    rec = s2.open()
    assert (rec.acked, rec.batches, rec.next_seq, rec.events) == (100, [(100, 150)], 200, 100)
    assert [seq for seq, _ in read_all(s2, rec.acked)] == list(range(100, 200))
    assert s2.append(b"new") == 200
    s2.close()


@pytest.mark.parametrize("tail", [b"", b"\x00" * 4096, b"\x07garbage that is not a record"])
def test_torn_tail_is_cut_off(tmp_path: Path, tail: bytes) -> None:
    s = Spool(tmp_path, fsync="always")
    s.open()
    for i in range(50):
        s.append(payload(i))
    s.close()
    (seg,) = sorted(tmp_path.glob("*.seg"))
    data = seg.read_bytes()
    # simulate a crash in the middle of writing record 49, plus whatever the disk left behind
    cut = len(data) - 17
    seg.write_bytes(data[:cut] + tail)

    s2 = Spool(tmp_path, fsync="always")
    rec = s2.open()
    record = 16 + len(payload(49))  # header + payload of the record cut in half
    assert rec.truncated_bytes == record - 17 + len(tail)
    assert [seq for seq, _ in read_all(s2, 0)] == list(range(49))
    assert rec.corrupt_bytes == 0
    assert s2.append(b"after") == 49  # the torn record's seq is reused: it never existed
    s2.close()
    assert [seq for seq, _ in read_all_reopened(tmp_path)] == [*range(49), 49]


def read_all_reopened(path: Path) -> list[tuple[int, bytes]]:
    s = Spool(path)
    s.open()
    try:
        return read_all(s, 0)
    finally:
        s.close()


def test_corruption_in_the_middle_is_quarantined_not_fatal(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="batch", segment_bytes=2048)
    s.open()
    for i in range(200):
        s.append(payload(i))
        if i % 20 == 19:
            s.flush()
    s.close()
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 200] ^= 0xFF  # flip a byte inside the 4th record
    first.write_bytes(bytes(data))

    s2 = Spool(tmp_path)
    rec = s2.open()
    seqs = [seq for seq, _ in read_all(s2, 0)]
    s2.close()
    assert rec.corrupt_bytes > 0
    assert seqs[:3] == [0, 1, 2]
    assert seqs[-1] == 199 and 3 not in seqs  # later segments intact
    assert list((tmp_path / "deadletter").glob("corrupt-*.bin"))


def test_fsync_always_writes_before_append_returns(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="always")
    s.open()
    s.append(payload(1))
    # no flush(): the record is already in the file (page cache), so a SIGKILL cannot lose it
    (seg,) = tmp_path.glob("*.seg")
    assert [p for _, p in iter_segment(seg)] == [payload(1)]
    assert s.written_seq == 1
    s.close()


def test_fsync_batch_writes_on_its_interval(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="batch", write_interval_ms=20)
    s.open()
    s.append(payload(1))
    assert s.written_seq == 0
    deadline = 100
    while s.synced_seq < 1 and deadline:
        deadline -= 1
        import time

        time.sleep(0.01)
    assert s.written_seq == 1 and s.synced_seq == 1
    s.close()


def test_closed_spool_rejects_appends(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.open()
    s.close()
    with pytest.raises(SpoolClosed):
        s.append(b"x")


def test_manifest_compaction_keeps_state(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="never", segment_bytes=1 << 16)
    s.open()
    for i in range(30_000):
        s.append(payload(i, 8))
        if i % 2 == 1:
            s.flush()
            s.mark_batch(i - 1, i + 1)
            s.ack(i + 1)
    s.mark_batch(30_000, 30_000)
    assert os.path.getsize(tmp_path / "manifest.log") < 300 * 1024
    s.close()
    rec = Spool(tmp_path).open()
    assert rec.acked == 30_000


def test_dead_letter_keeps_records_and_reasons(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.open()
    s.dead_letter([(7, b"bad"), (8, b"worse")], "rejected by ClickHouse: Code: 53")
    s.close()
    dl = tmp_path / "deadletter"
    assert list(iter_segment(dl / "deadletter.seg")) == [(7, b"bad"), (8, b"worse")]
    assert "Code: 53" in (dl / "index.jsonl").read_text()
    assert s.dead_lettered == 2


def test_record_larger_than_the_read_chunk(spool: Spool) -> None:
    big = os.urandom(3 << 20)
    spool.append(payload(0))
    spool.append(big)
    spool.append(payload(2))
    spool.flush()
    assert [p for _, p in read_all(spool, 0)] == [payload(0), big, payload(2)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["append", "flush", "ack", "reopen"]),
                          st.integers(1, 40)), max_size=40))
def test_property_unacked_events_survive_any_sequence(tmp_path_factory, ops) -> None:
    path = tmp_path_factory.mktemp("prop")
    s = Spool(path, fsync="batch", segment_bytes=1024, write_interval_ms=10_000)
    s.open()
    expected: dict[int, bytes] = {}
    acked = 0
    for op, n in ops:
        if op == "append":
            for _ in range(n):
                seq = s.next_seq
                expected[seq] = payload(seq, 20)
                assert s.append(expected[seq]) == seq
        elif op == "flush":
            s.flush()
        elif op == "ack":
            s.flush()
            acked = min(s.next_seq, acked + n)
            s.ack(acked)
        else:
            s.close()  # a clean close writes the buffer
            s = Spool(path, fsync="batch", segment_bytes=1024, write_interval_ms=10_000)
            assert s.open().acked == acked
    s.flush()
    assert read_all(s, acked) == [(k, v) for k, v in sorted(expected.items()) if k >= acked]
    s.close()


def test_fsync_always_maps_preallocated_segments_and_recovers_them_untrimmed(tmp_path: Path) -> None:
    import shutil

    live = tmp_path / "live"
    s = Spool(live, fsync="always", segment_bytes=1 << 20)
    s.open()
    for i in range(100):
        s.append(payload(i))
    (seg,) = live.glob("*.seg")
    assert seg.stat().st_size == 1 << 20  # preallocated: a full disk fails here, not mid-copy
    # what a SIGKILL leaves behind: the mapped pages, the zeros of the unused tail
    shutil.copytree(live, tmp_path / "crashed")
    s.close()
    assert seg.stat().st_size < 1 << 20  # a clean close trims the tail
    crashed = Spool(tmp_path / "crashed", fsync="always")
    rec = crashed.open()
    assert rec.events == 100 and rec.corrupt_bytes == 0 and rec.truncated_bytes > 0
    assert [p for _, p in read_all(crashed, 0)] == [payload(i) for i in range(100)]
    crashed.close()


def test_a_spool_written_by_the_format_as_documented_is_replayed(tmp_path: Path) -> None:
    """The on-disk format, built here byte by byte (not with the spool's own encoder): a spool
    left by an older release is replayed by this one."""
    import struct
    import zlib

    def record(seq: int, data: bytes) -> bytes:
        crc = zlib.crc32(data, zlib.crc32(struct.pack("<QI", seq, len(data))))
        return struct.pack("<QII", seq, len(data), crc) + data

    def mark(kind: bytes, first: int, end: int) -> bytes:
        body = struct.pack("<cQQ", kind, first, end)
        return body + struct.pack("<I", zlib.crc32(body))

    (tmp_path / f"{0:020d}.seg").write_bytes(b"EXSPOOL1" + b"".join(record(i, payload(i)) for i in range(10)))
    (tmp_path / f"{10:020d}.seg").write_bytes(b"EXSPOOL1" + b"".join(record(i, payload(i)) for i in range(10, 15)))
    (tmp_path / "manifest.log").write_bytes(mark(b"A", 0, 4) + mark(b"B", 4, 8))
    s = Spool(tmp_path, fsync="always")
    rec = s.open()
    assert (rec.acked, rec.batches, rec.next_seq, rec.events) == (4, [(4, 8)], 15, 11)
    assert read_all(s, 4) == [(i, payload(i)) for i in range(4, 15)]
    assert s.append(b"next") == 15
    s.close()


def fill_with_spares(s: Spool, n: int) -> None:
    """Append n records, letting the sync thread prepare each spare before the rotation."""
    from tests.storage_helpers import wait_until

    for i in range(n):
        s.append(payload(i))
        if s._spare_wanted:
            assert wait_until(lambda: s._spare is not None, 5)


def test_fsync_always_rotates_into_segments_prepared_off_the_append_path(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync="always", segment_bytes=16 * 1024)
    s.open()
    fill_with_spares(s, 2000)  # ~110 KiB: 7 rotations
    assert s.segments_created_inline == 0  # every rotation swapped in a preallocated spare
    assert [p for _, p in read_all(s, 0)] == [payload(i) for i in range(2000)]
    s.close()
    assert all(list(iter_segment(p)) for p in tmp_path.glob("*.seg"))  # no unused spare left
    assert [seq for seq, _ in read_all_reopened(tmp_path)] == list(range(2000))


def test_crash_with_an_unused_spare_recovers_the_last_segment_as_torn(tmp_path: Path) -> None:
    """A SIGKILL leaves the preallocated spare (magic, zeros) after the active segment: it is
    removed, counts as nothing torn, and the active segment's half-written record is cut off as
    a torn tail (not quarantined as corruption: the spare is not the last segment written)."""
    import shutil

    live = tmp_path / "live"
    s = Spool(live, fsync="always", segment_bytes=16 * 1024)
    s.open()
    fill_with_spares(s, 250)  # past half of the first segment: a spare is ready
    assert s._spare is not None
    shutil.copytree(live, tmp_path / "crashed")
    s.close()
    crashed = tmp_path / "crashed"
    (active,) = [p for p in crashed.glob("*.seg") if list(iter_segment(p))]
    data = bytearray(active.read_bytes())
    end = len(data.rstrip(b"\0"))
    data[end - 10:end] = b"\x01" * 10  # the last record, torn mid-copy
    active.write_bytes(bytes(data))
    s2 = Spool(crashed, fsync="always", segment_bytes=16 * 1024)
    rec = s2.open()
    assert rec.corrupt_bytes == 0 and not list((crashed / "deadletter").iterdir())
    assert rec.events == 249 and [seq for seq, _ in read_all(s2, 0)] == list(range(249))
    assert rec.truncated_bytes < 16 * 1024  # the active one's tail; the spare counts nothing
    s2.close()


def test_full_disk_when_preallocating_the_spare_fails_the_rotation_not_the_spool(tmp_path: Path,
                                                                                 monkeypatch, caplog) -> None:
    """No room for the next segment: the preallocation thread says so (logged once), the
    rotation then tries in append() and fails there (OSError: the batcher counts it, the seq is
    a gap); with room again the next append rotates and spares are prepared again."""
    import errno

    from tests.storage_helpers import wait_until

    full = {"on": False}
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    s = Spool(tmp_path, fsync="always", segment_bytes=4096)
    s.open()
    full["on"] = True
    seq = 0
    while not s._spare_failed:  # an eighth of the first segment: the spare is asked for
        assert s.append(payload(seq)) == seq
        seq += 1
        if s._spare_wanted:
            assert wait_until(lambda: not s._spare_wanted, 5)
    assert "could not preallocate the next segment" in caplog.text
    with pytest.raises(OSError):
        while True:  # until the segment is full and the rotation has to create one here
            s.append(payload(seq))
            seq += 1
    lost = seq
    assert s.unwritten(0) == 1 and s.segments_created_inline == 1
    full["on"] = False
    for i in range(seq + 1, seq + 200):
        s.append(payload(i))
        if s._spare_wanted:
            assert wait_until(lambda: s._spare is not None, 5)
    assert s._spare is not None and not s._spare_failed  # asked for again, and ready
    got = [q for q, _ in read_all(s, 0)]
    assert lost not in got and got == [q for q in range(seq + 200) if q != lost]
    s.close()
