"""Money in ClickHouse: list cost and GPU work stored per event (both insert formats), the
chargeback report's cost columns, the worked example of README to the cent, the idle line of
the gpu_pools report, and unpriced events counted, never billed as a silent zero."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from extproc.governance.pricing import load_pricing
from extproc.governance.stamp import stamp
from extproc.storage.sink import batch_token
from tests.storage_helpers import chdb_storage, make_event, settings_for

ROOT = Path(__file__).resolve().parent.parent
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
HOUR = datetime(2026, 12, 1, 10, tzinfo=UTC)
HOUR_NS = int(HOUR.timestamp()) * 1_000_000_000


def _priced(book, i: int, team: str, *, at: int = HOUR_NS, model: str = LLAMA, **tokens: int):
    ev = make_event(i, team=team, start_time_unix_nano=at + i * 1_000_000, request_model=model,
                    response_model=model, **tokens)
    ev.total_tokens = ev.prompt_tokens + ev.completion_tokens
    stamp(book, ev)
    return ev


def _worked_example(book) -> list:
    """README: in one hour, search sends 3M uncached prompt + 0.6M completion tokens (in three
    requests), support 1M prompt of which 0.5M cached + 0.2M completion (in two)."""
    return [
        _priced(book, 0, "search", prompt_tokens=1_000_000, completion_tokens=200_000),
        _priced(book, 1, "search", prompt_tokens=1_500_000, completion_tokens=100_000),
        _priced(book, 2, "search", prompt_tokens=500_000, completion_tokens=300_000),
        _priced(book, 3, "support", prompt_tokens=600_000, cached_tokens=300_000, completion_tokens=150_000),
        _priced(book, 4, "support", prompt_tokens=400_000, cached_tokens=200_000, completion_tokens=50_000),
    ]


async def _store(st, events) -> None:
    payloads = [e.SerializeToString() for e in events]
    await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))


@pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])
async def test_worked_example_to_the_cent(tmp_path: Path, insert_format: str) -> None:
    book = load_pricing(ROOT / "deploy" / "pricing.example.yaml")
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        await st.sync_pool_rates(book)
        await _store(st, _worked_example(book))
        rows = await st.report("chargeback", ["team"], since=HOUR, until=HOUR + timedelta(hours=1))
        pools = await st.report("gpu_pools", ["pool"], since=HOUR, until=HOUR + timedelta(hours=1))
        stored = await st.run(lambda c: c.query(
            "SELECT team, sum(list_cost_micros), sum(gpu_work_milli), any(gpu_pool), any(price_status) "
            "FROM usage_events GROUP BY team ORDER BY team").result_rows)
    by_team = {r["team"]: r for r in rows}
    # list price: search 3M x 0.20 + 0.6M x 0.80 = 1.08; support 0.5M x 0.20 + 0.5M x 0.02 + 0.2M x 0.80 = 0.27
    assert by_team["search"]["cost_usd"] == Decimal("1.08")
    assert by_team["support"]["cost_usd"] == Decimal("0.27")
    # the pool: 10.84 USD/h, capacity 20M work units/h; work search 6M, support 1.5M
    assert stored == [("search", 1_080_000, 6_000_000_000, "h100-a", "priced"),
                      ("support", 270_000, 1_500_000_000, "h100-a", "priced")]
    assert by_team["search"]["gpu_cost_usd"] == Decimal("3.252")   # 10.84 x 6 / 20
    assert by_team["support"]["gpu_cost_usd"] == Decimal("0.813")  # 10.84 x 1.5 / 20
    assert all(r["unpriced_requests"] == 0 for r in rows)
    (pool,) = pools
    assert (pool["pool"], pool["pool_hours"], pool["pool_cost_usd"], pool["allocated_usd"], pool["idle_usd"]) == (
        "h100-a", 1, Decimal("10.84"), Decimal("4.065"), Decimal("6.775"))  # idle = 10.84 x (1 - 7.5 / 20)


async def test_a_saturated_hour_has_no_idle_and_shares_the_whole_cost(tmp_path: Path) -> None:
    book = load_pricing(ROOT / "deploy" / "pricing.example.yaml")
    heavy = [_priced(book, i, team, prompt_tokens=2_000_000, completion_tokens=400_000)  # 4M work each
             for i, team in enumerate(["a", "a", "a", "b", "b"])]  # 20M + ... = 20M: exactly at capacity
    heavy.append(_priced(book, 9, "b", prompt_tokens=4_000_000, completion_tokens=0))  # 24M in all
    async with chdb_storage(settings_for(tmp_path)) as st:
        await st.sync_pool_rates(book)
        await _store(st, heavy)
        rows = await st.report("chargeback", ["team"], since=HOUR, until=HOUR + timedelta(hours=1))
        (pool,) = await st.report("gpu_pools", ["pool"], since=HOUR, until=HOUR + timedelta(hours=1))
    by_team = {r["team"]: r["gpu_cost_usd"] for r in rows}
    # over capacity: cost x w / W, all of it allocated
    assert by_team == {"a": Decimal("5.42"), "b": Decimal("5.42")}  # 12M / 24M each
    assert (pool["allocated_usd"], pool["idle_usd"], pool["utilization"]) == (Decimal("10.84"), Decimal(0), 1.2)


async def test_hours_without_traffic_are_idle_from_the_pools_from_date(tmp_path: Path) -> None:
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text(
        "models:\n  m:\n    input_per_mtok: 1\n    output_per_mtok: 1\n    pool: p\n"
        "gpu_pools:\n  p:\n    gpus: 1\n    rent_per_gpu_hour: 2\n    capacity_work_per_hour: 1000\n"
        "    from: 2026-12-01T08:00:00Z\n")
    book = load_pricing(pricing)
    async with chdb_storage(settings_for(tmp_path)) as st:
        await st.sync_pool_rates(book)
        await _store(st, [_priced(book, 0, "t", model="m", prompt_tokens=250, completion_tokens=50)])
        start = datetime(2026, 12, 1, 6, tzinfo=UTC)
        pools = await st.report("gpu_pools", ["pool", "hour"], since=start, until=start + timedelta(hours=6))
    # before 08:00 the pool did not exist; 08, 09, 11 are idle; 10:00 used 250 + 5 x 50 of 1000
    got = {r["hour"].hour: (r["allocated_usd"], r["idle_usd"]) for r in pools}
    assert got == {8: (0, 2), 9: (0, 2), 10: (Decimal("1"), Decimal("1")), 11: (0, 2)}


async def test_unpriced_models_and_unmetered_paths_are_counted_not_billed(tmp_path: Path) -> None:
    book = load_pricing(ROOT / "deploy" / "pricing.example.yaml")
    events = [_priced(book, 0, "x", model="mistral-7b", prompt_tokens=100, completion_tokens=10),
              _priced(book, 1, "x", prompt_tokens=1_000_000, completion_tokens=0)]
    unmetered = make_event(2, team="x", start_time_unix_nano=HOUR_NS, metered=False, request_model="",
                           response_model="", prompt_tokens=0, completion_tokens=0, total_tokens=0)
    stamp(book, unmetered)
    async with chdb_storage(settings_for(tmp_path)) as st:
        await _store(st, [*events, unmetered])
        (row,) = await st.report("chargeback", ["team"], since=HOUR, until=HOUR + timedelta(hours=1))
        status = await st.run(lambda c: c.query(
            "SELECT model, price_status, list_cost_micros FROM usage_events ORDER BY request_id").result_rows)
        (spender,) = await st.report("top_spenders", ["team"])
    assert status == [("mistral-7b", "unpriced", 0), (LLAMA, "priced", 200_000), ("", "unmetered", 0)]
    assert (row["requests"], row["unpriced_requests"], row["cost_usd"]) == (3, 1, Decimal("0.2"))
    assert (spender["cost_usd"], spender["unpriced_requests"]) == (Decimal("0.2"), 1)


async def test_exports_keep_money_exact(tmp_path: Path) -> None:
    import io

    import orjson
    import pyarrow.parquet as pq

    from extproc.storage.reports import render

    book = load_pricing(ROOT / "deploy" / "pricing.example.yaml")
    async with chdb_storage(settings_for(tmp_path)) as st:
        await st.sync_pool_rates(book)
        await _store(st, _worked_example(book))
        rows = await st.report("chargeback", ["team"], since=HOUR, until=HOUR + timedelta(hours=1))
    table = pq.read_table(io.BytesIO(render(rows, "parquet")))
    assert str(table.schema.field("cost_usd").type).startswith("decimal")
    assert dict(zip(table.column("team").to_pylist(), table.column("gpu_cost_usd").to_pylist(), strict=True)) == {
        "search": Decimal("3.252"), "support": Decimal("0.813")}
    as_json = {r["team"]: r["cost_usd"] for r in orjson.loads(render(rows, "json"))}
    assert as_json == {"search": "1.080000", "support": "0.270000"}  # decimal strings, never floats
    assert ",1.080000," in render(rows, "csv").decode()


async def test_history_from_before_pricing_shows_as_unpriced_after_the_upgrade(tmp_path: Path, monkeypatch) -> None:
    from extproc.storage import migrations, sink
    from extproc.storage.columns import to_arrow

    current = migrations.load_migrations
    monkeypatch.setattr(migrations, "load_migrations", lambda cluster=False: current(cluster)[:4])  # to 0003
    new_columns = ["operation", "cache_creation_tokens", "audio_seconds",  # 0004's
                   "price_status", "price_ref", "gpu_pool", "list_cost_micros", "gpu_work_milli"]
    monkeypatch.setattr(sink, "to_arrow", lambda *a, **k: to_arrow(*a, **k).drop_columns(new_columns))
    old = [make_event(i, team="search", start_time_unix_nano=HOUR_NS + i) for i in range(5)]
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": "arrow"})) as st:
        assert st.migrations_applied[-1] == "0003_protobuf_input"
        await _store(st, old)
    monkeypatch.setattr(migrations, "load_migrations", current)
    monkeypatch.setattr(sink, "to_arrow", to_arrow)
    book = load_pricing(ROOT / "deploy" / "pricing.example.yaml")
    async with chdb_storage(settings_for(tmp_path)) as st:
        assert st.migrations_applied == ["0004_operation_columns", "0005_pricing", "0006_gpu_pool_rates"]
        await st.sync_pool_rates(book)
        await _store(st, [_priced(book, 10, "search", prompt_tokens=1_000_000, completion_tokens=0)])
        (row,) = await st.report("chargeback", ["team"], since=HOUR, until=HOUR + timedelta(hours=1))
    # the 5 old events were never priced: counted as such, not as free
    assert (row["requests"], row["unpriced_requests"], row["cost_usd"]) == (6, 5, Decimal("0.2"))
