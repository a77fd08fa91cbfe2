"""Reports: named SQL, whitelisted dimensions, bound values, the four output formats."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from extproc.storage.reports import REPORTS, ReportError, build_query, format_rows, render
from tests.storage_helpers import T0, chdb_storage, make_event, settings_for

NASTY = "x'); DROP TABLE usage_events; --\n\"{since:String}\\"


@pytest.fixture
async def storage(tmp_path: Path):
    async with chdb_storage(settings_for(tmp_path)) as st:
        sink = st.sink()
        await sink.start()
        for i in range(300):  # 300 s apart from T0: 2026-11-18 ~18:13 .. 19:38 UTC
            sink.emit(make_event(i))
        sink.emit(make_event(1000, team=NASTY, total_tokens=5))
        assert await sink.force_flush(10)
        yield st


async def test_chargeback_by_team_and_day(storage) -> None:
    rows = await storage.report("chargeback", by=["team", "day"])
    assert {r["team"] for r in rows} == {"team-0", "team-1", "team-2", NASTY}
    assert all(r["day"] == date(2026, 11, 18) for r in rows)
    assert sum(r["requests"] for r in rows) == 301
    assert rows == sorted(rows, key=lambda r: -r["total_tokens"])


async def test_dimensions_filters_time_range_and_limit(storage) -> None:
    start = datetime.fromtimestamp(T0 / 1e9, UTC)
    rows = await storage.report("top_spenders", by=["user"], since=start,
                                until=start + timedelta(seconds=100), limit=2)
    assert len(rows) == 2 and sum(r["requests"] for r in rows) <= 100
    one = await storage.report("top_spenders", by="team,feature", filters={"team": "team-1"})
    assert {r["team"] for r in one} == {"team-1"} and sum(r["requests"] for r in one) == 100
    hours = await storage.report("chargeback", by=["hour"])
    assert all(r["hour"].tzinfo is UTC for r in hours)  # chDB drops the zone: we put it back
    total = await storage.report("chargeback", by=[])
    assert len(total) == 1 and total[0]["requests"] == 301


async def test_label_values_are_bound_never_spliced(storage) -> None:
    rows = await storage.report("chargeback", by=["team"], filters={"team": NASTY})
    assert [(r["team"], r["requests"], r["total_tokens"]) for r in rows] == [(NASTY, 1, 5)]
    for name in REPORTS:
        dim = "pool" if REPORTS[name].source == "pools" else "team"  # gpu_pools: pool-hours
        sql, params = build_query(name, by=[dim], filters={dim: NASTY},
                                  label_names=["user"])
        assert NASTY not in sql and NASTY in params.values()


async def test_every_report_runs(storage) -> None:
    for name in REPORTS:
        rows = await storage.report(name)
        # gpu_pools has rows once a pricing file defines pools (tests/test_pricing_reports.py)
        assert rows or name == "gpu_pools", name
    pct = await storage.report("token_percentiles", by=["model"])
    assert pct[0]["total_p50"] <= pct[0]["total_p90"] <= pct[0]["total_p99"]
    lat = await storage.report("latency", by=["model"])
    assert lat[0]["duration_ms_p50"] == pytest.approx(2000, rel=0.01)


@pytest.mark.parametrize("by", [["team; DROP TABLE x"], ["labels['team']"], ["`team`"],
                                ["nope"], ["user"]])
def test_unknown_dimensions_are_rejected(by) -> None:
    # "user" is a raw-table label: the rollup-based chargeback cannot group by it
    with pytest.raises(ReportError, match="cannot group by"):
        build_query("chargeback", by=by, label_names=["user"])


def test_bad_report_filter_and_limit_are_rejected() -> None:
    with pytest.raises(ReportError, match="unknown report"):
        build_query("../../etc/passwd")
    with pytest.raises(ReportError, match="cannot filter"):
        build_query("chargeback", filters={"1=1 OR team": "x"})
    with pytest.raises(ReportError, match="limit"):
        build_query("chargeback", limit=0)


ROWS = [
    {"team": "a,\"b\"\nc", "day": date(2026, 11, 18), "requests": 3, "total_tokens": 1200,
     "hour": datetime(2026, 11, 18, 10, tzinfo=UTC), "avg": 2.5},
    {"team": "z", "day": date(2026, 11, 19), "requests": 10, "total_tokens": 7,
     "hour": datetime(2026, 11, 19, 0, tzinfo=UTC), "avg": 0.1},
]


def test_format_table_json_csv() -> None:
    table = render(ROWS, "table").decode()
    assert table.splitlines()[0].split() == list(ROWS[0])
    assert "a,\"b\"\\nc" in table  # one row per line, even with a newline in a value
    data = json.loads(render(ROWS, "json"))
    assert data[0]["hour"] == "2026-11-18T10:00:00Z" and data[0]["day"] == "2026-11-18"
    import csv

    parsed = list(csv.DictReader(io.StringIO(render(ROWS, "csv").decode())))
    assert parsed[0]["team"] == "a,\"b\"\nc" and parsed[1]["requests"] == "10"
    assert render([], "table") == b"(no rows)\n"


def test_format_parquet_to_file_and_stdout(tmp_path: Path, capsysbinary) -> None:
    out = tmp_path / "r.parquet"
    format_rows(ROWS, "parquet", str(out))
    back = pq.read_table(out).to_pylist()
    assert back[0]["team"] == ROWS[0]["team"] and back[1]["total_tokens"] == 7
    assert str(pq.read_schema(out).field("hour").type) == "timestamp[us, tz=UTC]"
    format_rows(ROWS, "csv")
    assert capsysbinary.readouterr().out.startswith(b"team,day,")
    with pytest.raises(ReportError):
        render(ROWS, "xml")
