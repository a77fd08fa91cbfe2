"""Against the real embedded engine (chDB): schema, raw vs rollup totals, dedup, faults."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from extproc.events import TokenSource, token_source_name
from extproc.storage.migrations import load_migrations, migrate
from extproc.storage.sink import batch_token
from extproc.storage.store import Storage, open_storage_sync
from tests.storage_helpers import chdb_storage, flaky, make_event, settings_for, wait_until

ROOT = Path(__file__).resolve().parent.parent


async def rows(storage: Storage, sql: str, **params) -> list[tuple]:
    return await storage.run(lambda c: c.query(sql, parameters=params or None).result_rows)


async def test_migrations_rerun_cleanly_and_ttl_follows_config(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with chdb_storage(settings) as st:
        assert st.migrations_applied == ["0001_usage_events", "0002_usage_hourly", "0003_protobuf_input",
                                         "0004_operation_columns", "0005_pricing", "0006_gpu_pool_rates"]
        assert await st.run(lambda c: migrate(c, settings)) == []
        assert await rows(st, "SELECT DISTINCT version FROM schema_migrations ORDER BY version") == [
            (1,), (2,), (3,), (4,), (5,), (6,)
        ]
        tables = await rows(st, "SELECT name, engine FROM system.tables WHERE database = 'extproc' ORDER BY name")
        assert tables == [
            ("gpu_pool_rates", "ReplacingMergeTree"),
            ("schema_migrations", "ReplacingMergeTree"),
            ("usage_events", "MergeTree"),
            ("usage_hourly", "AggregatingMergeTree"),
            ("usage_hourly_mv", "MaterializedView"),
        ]
        settings.storage.ttl_days = 90
        settings.storage.rollup_ttl_days = 730
        assert await st.run(lambda c: migrate(c, settings)) == [
            "ttl usage_events 90d", "ttl usage_hourly 730d"
        ]
        assert await st.run(lambda c: migrate(c, settings)) == []  # unchanged: no ALTER
        settings.storage.ttl_days = 0
        assert await st.run(lambda c: migrate(c, settings)) == ["ttl usage_events removed"]


def test_cluster_ddl_matches_the_single_node_ddl() -> None:
    single, cluster = load_migrations(), load_migrations(cluster=True)
    assert [m.version for m in single] == [m.version for m in cluster]
    for s, c in zip(single, cluster, strict=True):
        assert len(s.statements()) == len(c.statements())
        for statement in c.statements():
            assert "ON CLUSTER '{cluster}'" in statement
            if "ENGINE" in statement:
                assert "ENGINE = Replicated" in statement and "'{replica}'" in statement
    # deploy/clickhouse shows the packaged SQL to users
    assert (ROOT / "deploy" / "clickhouse").resolve() == (ROOT / "extproc" / "sql").resolve()
    assert (ROOT / "deploy" / "clickhouse" / "queries" / "chargeback.sql").is_file()


@pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])
async def test_all_fields_round_trip_in_utc(tmp_path: Path, insert_format: str) -> None:
    e = make_event(
        1, cached_tokens=7, reasoning_tokens=3, client_aborted=True, usage_injected=True,
        token_source=TokenSource.TOKENIZER, tokenizer="o200k_base", error="upstream_error",
        error_detail="boom", http_status=502, response_model="", finish_reason="length,stop",
    )
    payload = e.SerializeToString()
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        await asyncio.to_thread(st.writer().write, [payload], batch_token([payload]))
        (row,) = await st.run(lambda c: list(c.query(
            "SELECT *, team, feature, model FROM usage_events").named_results()))
    start = datetime.fromtimestamp(e.start_time_unix_nano / 1e9, UTC)
    assert row["start_time"].replace(tzinfo=UTC) == start  # chDB returns naive UTC
    assert row["labels"] == dict(e.labels)
    assert (row["team"], row["feature"], row["model"]) == ("team-1", "feature-1", "llama-3-8b")
    for name in ("event_id", "request_id", "endpoint", "path", "method", "request_model",
                 "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "reasoning_tokens", "total_tokens", "tokenizer", "time_to_first_token_ns",
                 "duration_ns", "client_aborted", "metered", "choices", "usage_injected", "error",
                 "error_detail", "response_events", "http_status", "stream", "response_model"):
        assert row[name] == getattr(e, name), name
    assert row["token_source"] == "tokenizer"


async def test_raw_table_and_rollup_have_equal_totals(tmp_path: Path) -> None:
    # a spread over 3 months, so the batch spans partitions
    events = [make_event(i, start_time_unix_nano=1_790_000_000_000_000_000 + i * 3_600_000_000_000 // 7)
              for i in range(5000)]
    async with chdb_storage(settings_for(tmp_path, batch={"max_batch_size": 1000})) as st:
        sink = st.sink()
        await sink.start()
        for e in events:
            sink.emit(e)
        assert await sink.force_flush(20)
        key = "team, feature, model, endpoint"
        raw = await rows(st, f"""
            SELECT {key}, count(), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens)
            FROM usage_events GROUP BY {key} ORDER BY {key}""")
        rollup = await rows(st, f"""
            SELECT {key}, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens)
            FROM usage_hourly GROUP BY {key} ORDER BY {key}""")
        assert raw == rollup and len(raw) == 6
        assert sum(r[-1] for r in raw) == sum(e.total_tokens for e in events)
        assert sum(r[4] for r in raw) == 5000
        partitions = await rows(st, "SELECT uniqExact(_partition_id) FROM usage_events")
        assert partitions[0][0] >= 2


@pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])
async def test_same_batch_twice_is_stored_once(tmp_path: Path, insert_format: str) -> None:
    events = [make_event(i) for i in range(300)]
    payloads = [e.SerializeToString() for e in events]
    token = batch_token(payloads)
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        writer = st.writer()
        for _ in range(3):  # the original and two retries
            await asyncio.to_thread(writer.write, payloads, token)
        assert await rows(st, "SELECT count(), uniqExact(event_id) FROM usage_events") == [(300, 300)]
        assert await rows(st, "SELECT sum(requests) FROM usage_hourly") == [(300,)]
        # a different token is a different insert: the dedup is the token, not luck
        await asyncio.to_thread(writer.write, payloads, "another-token")
        assert await rows(st, "SELECT count() FROM usage_events") == [(600,)]


@pytest.mark.parametrize("fault", ["connection_refused", "http_500", "timeout"])
async def test_clickhouse_faults_under_a_stream_deliver_exactly_once(tmp_path: Path, fault: str) -> None:
    settings = settings_for(tmp_path, batch={"max_batch_size": 200, "max_queue_size": 500})
    async with chdb_storage(settings) as st:
        sink = st.sink()
        # timeouts are the nasty case: the insert happened, the client did not hear back
        faulty = flaky(sink._writer, fault, commit_then_fail=fault == "timeout")
        sink._writer = faulty
        await sink.start()
        events = [make_event(i) for i in range(4000)]
        for n, e in enumerate(events):
            if n == 800:
                faulty.failing.set()
            if n == 3000:  # end the outage once it has really been hit
                await asyncio.to_thread(wait_until, lambda: faulty.failures >= 2, 10)
                faulty.failing.clear()
            sink.emit(e)
            if n % 200 == 0:
                await asyncio.sleep(0.01)
        await sink.shutdown(20)
        assert faulty.failures > 0 and sink.events_spooled > 0 and sink.events_dropped == 0
        assert await rows(st, "SELECT count(), uniqExact(event_id) FROM usage_events") == [(4000, 4000)]
        assert await rows(st, "SELECT sum(requests), sum(total_tokens) FROM usage_hourly") == [
            (4000, sum(e.total_tokens for e in events))
        ]


def test_dsn_parsing_and_redaction() -> None:
    from extproc.storage.client import parse_dsn

    assert parse_dsn("chdb://memory", "db").path is None
    assert parse_dsn("chdb:///abs/dir", "db").path == "/abs/dir"
    assert parse_dsn("chdb:///./rel/dir", "db").path == str(Path("rel/dir").resolve())
    t = parse_dsn("https://alice:s3cr%40t@ch.example:8443/usage", "extproc")
    assert (t.kind, t.database) == ("http", "usage")
    assert "s3cr" not in t.redacted and "alice:***@ch.example:8443" in t.redacted
    assert parse_dsn("http://ch:8123", "extproc").database == "extproc"


async def test_server_down_at_start_spools_then_replays(tmp_path: Path, caplog) -> None:
    from extproc.storage.store import open_storage

    down = settings_for(tmp_path)
    down.storage.dsn = "http://default:pw@127.0.0.1:1/extproc"  # refused at once
    down.storage.connect_timeout_ms = 1000
    storage = await open_storage(down)  # not fatal: a server may come back
    assert "not reachable" in caplog.text and "pw@" not in caplog.text
    sink = storage.sink()
    await sink.start()
    events = [make_event(i) for i in range(100)]
    for e in events:
        sink.emit(e)
    assert not await sink.force_flush(0.5)
    assert sink.insert_failures > 0 and sink.backlog == 100
    await storage.close(timeout=0.2)  # gives up; the events stay in the spool
    async with chdb_storage(settings_for(tmp_path)) as st:  # same spool dir, ClickHouse "back"
        sink = st.sink()
        await sink.start()
        assert sink.events_recovered == 100
        assert await sink.force_flush(10)
        assert await rows(st, "SELECT count(), uniqExact(event_id) FROM usage_events") == [(100, 100)]


@pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])
async def test_missing_times_fall_back_to_the_other_time_then_now(tmp_path: Path, insert_format: str) -> None:
    only_end = make_event(1, start_time_unix_nano=0, end_time_unix_nano=1_790_000_000_123_456_789)
    neither = make_event(2, start_time_unix_nano=0, end_time_unix_nano=0)
    payloads = [only_end.SerializeToString(), neither.SerializeToString()]
    before = datetime.now(UTC).replace(tzinfo=None)
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))
        got = await rows(st, "SELECT toUnixTimestamp64Nano(start_time), toUnixTimestamp64Nano(end_time), "
                             "start_time FROM usage_events ORDER BY request_id")
    assert got[0][:2] == (1_790_000_000_123_456_789, 1_790_000_000_123_456_789)
    assert got[1][0] == got[1][1] and got[1][2] >= before - timedelta(seconds=1)


async def test_a_store_from_before_migration_0003_upgrades_in_place(tmp_path: Path, monkeypatch) -> None:
    from extproc.storage import migrations, sink
    from extproc.storage.columns import to_arrow

    current = migrations.load_migrations
    monkeypatch.setattr(migrations, "load_migrations", lambda cluster=False: current(cluster)[:3])
    # what a sidecar of that time sent: no columns of later migrations (0004's and 0005's)
    later = ("operation", "cache_creation_tokens", "audio_seconds",
             "price_status", "price_ref", "gpu_pool", "list_cost_micros", "gpu_work_milli")
    monkeypatch.setattr(sink, "to_arrow", lambda *a, **k: to_arrow(*a, **k).drop_columns(list(later)))
    old = [make_event(i).SerializeToString() for i in range(10)]
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": "arrow"})) as st:
        assert st.migrations_applied[-1] == "0002_usage_hourly"
        await asyncio.to_thread(st.writer().write, old, batch_token(old))
    monkeypatch.undo()
    new = [make_event(i).SerializeToString() for i in range(10, 30)]
    async with chdb_storage(settings_for(tmp_path)) as st:
        assert st.migrations_applied == ["0003_protobuf_input", "0004_operation_columns", "0005_pricing",
                                         "0006_gpu_pool_rates"]
        await asyncio.to_thread(st.writer().write, new, batch_token(new))
        assert await rows(st, "SELECT count(), uniqExact(event_id), min(start_time) > '2020-01-01' "
                              "FROM usage_events") == [(30, 30, True)]
        assert await rows(st, "SELECT sum(requests) FROM usage_hourly") == [(30,)]


@pytest.mark.parametrize("dsn", ["dir", "memory"])
async def test_protobuf_inserts_leave_nothing_in_the_working_directory(tmp_path: Path, monkeypatch, dsn: str) -> None:
    """Given an inline schema, the embedded engine caches a copy under the process's working
    directory; chDB gets it as a file in its data directory (or a temporary one) instead."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    settings = settings_for(tmp_path)
    if dsn == "memory":
        settings.storage.dsn = "chdb://memory"
    payloads = [make_event(i).SerializeToString() for i in range(5)]
    async with chdb_storage(settings) as st:
        await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))
        assert await rows(st, "SELECT count() FROM usage_events") == [(5,)]
    assert list(cwd.iterdir()) == []
    if dsn == "dir":
        assert (tmp_path / "chdb" / "format_schemas" / "usage_event.proto").is_file()


def test_a_call_that_timed_out_holds_new_calls_back_instead_of_queueing_them(tmp_path: Path) -> None:
    """A ClickHouse call that outlives its timeout keeps the one ClickHouse thread: the next call
    waits for it (up to its own timeout) rather than queueing behind it, so retries cannot stack
    up duplicate inserts; once it ends, calls go through again."""
    storage = open_storage_sync(settings_for(tmp_path))
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError):
            storage.call(lambda c: release.wait(10), timeout=0.2)
        with pytest.raises(TimeoutError, match="still busy with a call that timed out"):
            storage.call(lambda c: c.command("SELECT 1"), timeout=0.2)
        release.set()
        assert storage.call(lambda c: c.command("SELECT 41 + 1"), timeout=10) == 42
    finally:
        release.set()
        storage.close_sync()
        storage.close_sync()  # twice is harmless
    with pytest.raises(RuntimeError, match="storage is closed"):
        storage.call(lambda c: None)


@pytest.mark.parametrize("insert_format", ["protobuf", "arrow"])
async def test_every_token_source_is_stored_by_its_name(tmp_path: Path, insert_format: str) -> None:
    """tokenizer_estimate (a prompt counted without the model's chat template or tokenizer)
    reaches the token_source column by name through both insert formats."""
    events = [make_event(i, token_source=v) for i, v in enumerate(TokenSource.values())]
    payloads = [e.SerializeToString() for e in events]
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": insert_format})) as st:
        await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))
        got = await st.run(lambda c: c.query("SELECT token_source FROM usage_events").result_rows)
    assert sorted(r[0] for r in got) == sorted(token_source_name(v) for v in TokenSource.values())
    assert "tokenizer_estimate" in {r[0] for r in got}
