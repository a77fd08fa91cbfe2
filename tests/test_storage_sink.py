"""ClickHouseWriter against a ClickHouse that cannot take an inline Protobuf schema: it falls
back to Arrow once, and the batch that hit the error is stored, not lost."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from extproc.storage.sink import ClickHouseWriter
from tests.storage_helpers import make_event
from tests.test_storage_batcher import batcher


class OldServerError(Exception):
    code = 115


class OldServer:
    """A client whose server predates format_schema_source (ClickHouse's message, code 115)."""

    def __init__(self) -> None:
        self.raw_inserts = 0
        self.rows: list[str] = []
        self.tokens: set[str] = set()

    def raw_insert(self, table: str, columns: Any, body: bytes, settings: dict[str, Any], fmt: str) -> None:
        self.raw_inserts += 1
        assert fmt == "Protobuf" and settings["format_schema_source"] == "string"
        raise OldServerError("Code: 115. DB::Exception: Unknown setting 'format_schema_source'. (UNKNOWN_SETTING)")

    def insert_arrow(self, table: str, arrow: Any, settings: dict[str, Any]) -> None:
        token = settings["insert_deduplication_token"]
        if token not in self.tokens:
            self.tokens.add(token)
            self.rows.extend(arrow.column("event_id").to_pylist())


class Runner:
    def __init__(self, client: OldServer) -> None:
        self.client = client

    def submit(self, fn: Any, timeout: float | None) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(self.client))
        except Exception as exc:
            f.set_exception(exc)
        return f

    def wait(self, future: Future[Any], timeout: float | None) -> Any:
        return future.result(timeout)


async def test_a_server_without_inline_schemas_gets_arrow_and_loses_nothing(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    server = OldServer()
    writer = ClickHouseWriter(Runner(server))  # insert_format protobuf, the default
    bp = batcher(tmp_path, writer, max_batch_size=50)
    await bp.start()
    events = [make_event(i) for i in range(120)]
    for e in events:
        bp.emit(e)
    assert await bp.force_flush(10)
    await bp.shutdown()
    assert sorted(server.rows) == sorted(e.event_id for e in events)
    assert server.raw_inserts == 1  # tried once, then Arrow for good
    assert bp.events_dead_lettered == 0 and bp.events_dropped == 0
    assert "cannot take an inline Protobuf schema" in caplog.text
    assert caplog.text.count("inline Protobuf schema") == 1


def test_other_errors_do_not_switch_the_format() -> None:
    class Flaky(OldServer):
        def raw_insert(self, *args: Any, **kwargs: Any) -> None:
            self.raw_inserts += 1
            raise ConnectionError("Connection refused")

    server = Flaky()
    writer = ClickHouseWriter(Runner(server))
    payloads = [make_event(1).SerializeToString()]
    for _ in range(2):
        with pytest.raises(ConnectionError):
            writer.write(payloads, "t")
    assert server.raw_inserts == 2 and not server.rows  # still Protobuf: only the server's answer switches
