"""Hostile values: stored exactly, or repaired / truncated / dead-lettered, counted and logged;
never a failed batch that takes good rows with it."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from extproc.storage.columns import ColumnStats, to_arrow
from extproc.storage.spool import iter_segment
from tests.storage_helpers import chdb_storage, make_event, settings_for

HOSTILE = {
    "quotes": "it's \"quoted\" `back` 'x'",
    "newlines": "line1\nline2\r\nline3\t",
    "sql": "'); DROP TABLE usage_events; --",
    "nul": "a\x00b",
    "backslash": "C:\\path\\n\\'",
    "unicode": "équipe 数据 🚀 \u202e",
    "ten_kb": "k" * 10_240,
    "braces": "{team:String} %(x)s {{select}}",
}


FORMATS = pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])


@FORMATS
async def test_hostile_label_values_are_stored_exactly(tmp_path: Path, insert_format: str) -> None:
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        sink = st.sink()
        await sink.start()
        for i, (kind, value) in enumerate(HOSTILE.items()):
            e = make_event(i, team=value)
            e.labels[kind] = value  # also as a key... of its own name
            e.labels[value[:100]] = kind  # ...and as a label name
            sink.emit(e)
        assert await sink.force_flush(10)
        stored = await st.run(lambda c: c.query(
            "SELECT team, labels FROM usage_events ORDER BY request_id").result_rows)
        assert sink.events_dead_lettered == 0 and st.column_stats.values_truncated == 0
    by_team = {team: labels for team, labels in stored}
    assert set(by_team) == set(HOSTILE.values())
    for kind, value in HOSTILE.items():
        assert by_team[value][kind] == value
        assert by_team[value][value[:100]] == kind


@FORMATS
async def test_oversized_values_are_truncated_counted_and_logged(tmp_path: Path, caplog, insert_format: str) -> None:
    settings = settings_for(tmp_path, storage={"max_value_bytes": 1000, "insert_format": insert_format})
    caplog.set_level(logging.WARNING)
    async with chdb_storage(settings) as st:
        sink = st.sink()
        await sink.start()
        sink.emit(make_event(1, team="é" * 5000, error_detail="d" * 5000))  # 10 KB of UTF-8
        sink.emit(make_event(2))
        assert await sink.force_flush(10)
        stored = await st.run(lambda c: c.query(
            "SELECT team, length(team), length(error_detail) FROM usage_events "
            "ORDER BY request_id").result_rows)
    assert stored[0][1:] == (1000, 1000)  # bytes; a 2-byte character is never cut in half
    assert stored[0][0] == "é" * 500
    assert stored[1][0] == "team-2"
    assert st.column_stats.values_truncated == 2
    assert "truncated 1 label(s) to 1000 bytes" in caplog.text
    assert "usage_events.error_detail: truncated 1 value(s)" in caplog.text


@FORMATS
async def test_invalid_utf8_and_unstorable_rows_do_not_sink_the_batch(tmp_path: Path, insert_format: str) -> None:
    settings = settings_for(tmp_path, batch={"max_batch_size": 1000}, storage={"insert_format": insert_format})
    events = [make_event(i) for i in range(50)]
    events[10].http_status = 70_000  # fits the proto's uint32, not the UInt16 column
    async with chdb_storage(settings) as st:
        sink = st.sink()
        await sink.start()
        with sink._source.lock:  # a record arriving through another path, bytes not valid UTF-8
            raw = events[20].SerializeToString().replace(b"team-2", b"team\xff2")
            seq = sink._spool.append(raw)
            assert sink._source.offer(seq, raw, on_disk=True)
        for n, e in enumerate(events):
            if n != 20:
                sink.emit(e)
        assert await sink.force_flush(10)
        count = await st.run(lambda c: c.command("SELECT count() FROM usage_events"))
        assert count == 48
        assert sink.events_dead_lettered == 2 and sink.events_inserted == 48
        assert sink.events_dropped == 0
    dead = tmp_path / "spool" / "deadletter"
    assert len(list(iter_segment(dead / "deadletter.seg"))) == 2
    reasons = (dead / "index.jsonl").read_text()
    assert "not a valid UsageEvent" in reasons
    # arrow fails converting the value; ClickHouse's Protobuf reader names it (code 436)
    assert ("column conversion failed" if insert_format == "arrow" else "Could not convert value '70000'") in reasons


def test_strings_that_are_not_utf8_are_repaired_and_counted() -> None:
    # protobuf cannot hold them, but an event built another way (a dict, JSON) could
    fake = make_event(1)
    fields = {f.name: getattr(fake, f.name) for f in fake.DESCRIPTOR.fields}
    fields.update(labels={"team": "bad\udcff"}, error_detail="half a surrogate \ud800")
    stats = ColumnStats()
    table = to_arrow([SimpleNamespace(**fields)], stats=stats)  # type: ignore[list-item]
    assert stats.values_repaired == 2
    assert table.column("labels").to_pylist() == [[("team", "bad\ufffd")]]
    assert table.column("error_detail").to_pylist() == ["half a surrogate \ufffd"]
