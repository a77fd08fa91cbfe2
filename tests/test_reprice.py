"""A price correction re-prices history: per-event costs from the corrected book (the same
integer arithmetic as at ingest), the rollup rebuilt so reports agree with per-event sums, and
history before `since` untouched."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from extproc.governance.pricing import parse_pricing
from extproc.governance.stamp import stamp
from extproc.storage.reprice import reprice
from extproc.storage.sink import batch_token
from tests.storage_helpers import chdb_storage, make_event, settings_for

DAY1 = datetime(2026, 12, 1, tzinfo=UTC)
NS = 1_000_000_000
WRONG = """
models:
  "llama-*":
    input_per_mtok: 0.20
    cached_input_per_mtok: 0.02
    output_per_mtok: 8.00          # a typo: should have been 0.80
    request_fee: 0.000010
    pool: p
  "qwen":
    input_per_mtok: 0.30
    output_per_mtok: 1.20
    changes:
      - from: 2026-12-02T12:00:00Z
        output_per_mtok: 1.00
  "*":
    pool: p                        # served by the pool, no list price: unpriced
gpu_pools:
  p:
    gpus: 1
    rent_per_gpu_hour: 2
    decode_weight: 4
    capacity_work_per_hour: 100000
"""
FIXED = WRONG.replace("output_per_mtok: 8.00", "output_per_mtok: 0.80").replace("decode_weight: 4", "decode_weight: 6")
ROLLUP = ("SELECT team, model, hour, gpu_pool, sum(requests), sum(prompt_tokens), sum(completion_tokens), "
          "sum(list_cost_micros), sum(priced_requests), sum(unmetered_requests), sum(gpu_work_milli), "
          "quantilesTDigestMerge(0.5)(total_tokens_digest) FROM usage_hourly "
          "GROUP BY team, model, hour, gpu_pool ORDER BY team, model, hour, gpu_pool")


def _events(book) -> list:
    out = []
    for i in range(60):  # one event every 2 hours over 5 days, three models, two teams
        model = ("llama-3-8b", "qwen", "mistral")[i % 3]
        ev = make_event(i, team=("search", "ads")[i % 2], start_time_unix_nano=int(DAY1.timestamp()) * NS
                        + i * 2 * 3600 * NS + 17 * NS, request_model=model, response_model=model,
                        prompt_tokens=1000 + 37 * i, cached_tokens=(i % 4) * 100, completion_tokens=50 + 11 * i,
                        reasoning_tokens=i % 5)
        if i % 10 == 9:  # an unmetered path (/v1/models): no model, no price, no GPU work
            ev.metered, ev.request_model, ev.response_model = False, "", ""
        stamp(book, ev)
        out.append(ev)
    return out


async def _store(st, events) -> None:
    payloads = [e.SerializeToString() for e in events]
    await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))


async def test_a_correction_reprices_history_from_since_and_reports_agree(tmp_path: Path) -> None:
    wrong, fixed = parse_pricing(WRONG), parse_pricing(FIXED)
    events = _events(wrong)
    since = DAY1 + timedelta(days=2, minutes=30)  # from the start of that hour
    cut = int((DAY1 + timedelta(days=2)).timestamp()) * NS
    async with chdb_storage(settings_for(tmp_path)) as st:
        await st.sync_pool_rates(wrong)
        await _store(st, events)
        result = await st.reprice(fixed, since)
        stored = dict(await st.run(lambda c: c.query(
            "SELECT request_id, tuple(list_cost_micros, price_status, price_ref, gpu_pool, gpu_work_milli) "
            "FROM usage_events").result_rows))
        per_event = dict(await st.run(lambda c: c.query(
            "SELECT team, sum(list_cost_micros) FROM usage_events GROUP BY team").result_rows))
        report = await st.report("chargeback", ["team"])
    expected = {}
    for ev in events:
        again = type(ev)()
        again.CopyFrom(ev)
        for name in ("list_cost_micros", "price_status", "price_ref", "gpu_pool", "gpu_work_milli"):
            again.ClearField(name)
        stamp(fixed if ev.start_time_unix_nano >= cut else wrong, again)
        expected[ev.request_id] = (again.list_cost_micros, again.price_status, again.price_ref, again.gpu_pool,
                                   again.gpu_work_milli)
    assert stored == expected
    assert {v[1] for v in expected.values()} == {"priced", "unpriced", "unmetered"}  # mistral has no price
    assert sum(1 for e in events if e.start_time_unix_nano >= cut) == result["events"] == 36
    assert result["since"] == "2026-12-03T00:00:00Z" and result["rollup_hours"] == 36
    assert Decimal(result["list_cost_usd_after"]) < Decimal(result["list_cost_usd_before"])
    # the rollup (what reports read) agrees with the per-event sums, to the micro-dollar
    assert {r["team"]: r["cost_usd"] for r in report} == {t: Decimal(m) / 1_000_000 for t, m in per_event.items()}


async def test_a_rebuilt_rollup_is_what_the_view_wrote(tmp_path: Path) -> None:
    book = parse_pricing(WRONG)
    async with chdb_storage(settings_for(tmp_path)) as st:
        await _store(st, _events(book))
        written = await st.run(lambda c: c.query(ROLLUP).result_rows)
        await st.run(lambda c: reprice(c, book, DAY1))  # same prices: nothing may change
        rebuilt = await st.run(lambda c: c.query(ROLLUP).result_rows)
    assert rebuilt == written and len(written) == 60


async def test_reprice_refuses_hours_whose_raw_events_expired(tmp_path: Path) -> None:
    async with chdb_storage(settings_for(tmp_path)) as st:
        with pytest.raises(ValueError, match="storage.ttl_days"):
            await st.run(lambda c: reprice(c, parse_pricing(FIXED), DAY1, ttl_days=30,
                                           now=DAY1 + timedelta(days=31)))


def test_reprice_and_report_on_the_store_when_no_sidecar_runs(tmp_path: Path) -> None:
    """The CLI's direct path: no sidecar answers, so `extproc reprice --pricing` opens the store."""
    import json
    import subprocess
    import sys

    from extproc.devtools.devstack import free_port

    wrong = parse_pricing(WRONG)
    settings = settings_for(tmp_path)

    async def fill() -> None:
        async with chdb_storage(settings) as st:
            await st.sync_pool_rates(wrong)
            await _store(st, _events(wrong))

    asyncio.run(fill())
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(FIXED)
    common = ["--dsn", settings.storage.dsn, "--spool-dir", settings.spool.dir,
              "--admin-url", f"http://127.0.0.1:{free_port()}"]  # nobody listens there

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "extproc", *args, *common], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = json.loads(cli("reprice", "--since", "2026-12-01", "--pricing", str(fixed)))
    assert out["events"] == 60 and out["since"] == "2026-12-01T00:00:00Z"
    pools = json.loads(cli("report", "--report", "gpu_pools", "--format", "json",
                           "--since", "2026-12-01", "--until", "2026-12-02"))
    assert [(p["pool"], p["pool_hours"], p["pool_cost_usd"]) for p in pools] == [("p", 24, "48.000000")]
    rows = json.loads(cli("report", "--by", "team", "--format", "json"))
    assert sum(Decimal(r["cost_usd"]) for r in rows) == Decimal(out["list_cost_usd_after"])
