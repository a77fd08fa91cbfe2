"""Shared helpers for tests/test_storage_*.py: events, fake and flaky writers, chDB storage."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.storage.sink import BatchWriter, DataError, decode_all
from extproc.storage.store import Storage, open_storage

T0 = 1_795_000_000_000_000_000  # 2026-11-18 UTC, in ns


def make_event(i: int, *, team: str | None = None, **fields: Any) -> UsageEvent:
    start = fields.pop("start_time_unix_nano", T0 + i * 1_000_000_000)
    e = UsageEvent(
        event_id=fields.pop("event_id", str(uuid.uuid4())),
        request_id=f"req-{i}",
        start_time_unix_nano=start,
        end_time_unix_nano=start + 2_000_000_000,
        endpoint="chat",
        path="/v1/chat/completions",
        method="POST",
        request_model="llama-3-8b",
        response_model="llama-3-8b",
        stream=True,
        http_status=200,
        finish_reason="stop",
        prompt_tokens=100 + i % 10,
        completion_tokens=10 + i % 7,
        total_tokens=110 + i % 10 + i % 7,
        token_source=TokenSource.UPSTREAM_USAGE,
        time_to_first_token_ns=50_000_000,
        duration_ns=2_000_000_000,
        metered=True,
        choices=1,
        response_events=12,
    )
    for key, value in fields.items():
        setattr(e, key, value)
    e.labels.update({
        "team": team if team is not None else f"team-{i % 3}",
        "feature": f"feature-{i % 2}",
        "user": f"user-{i % 5}",
        "env": "prod",
    })
    return e


def settings_for(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    s = Settings()
    s.storage.dsn = f"chdb://{tmp_path / 'chdb'}"
    s.spool.dir = str(tmp_path / "spool")
    s.batch.flush_interval_ms = 50
    s.batch.retry_initial_ms = 10
    s.batch.retry_max_ms = 50
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(s, section), key, value)
    return s


@asynccontextmanager
async def chdb_storage(settings: Settings) -> AsyncIterator[Storage]:
    storage = await open_storage(settings)
    try:
        yield storage
    finally:
        await storage.close(timeout=10)


def http_500() -> Exception:
    return DatabaseError("HTTPDriver for http://127.0.0.1:8123 received ClickHouse error code 500")


FAULTS: dict[str, Callable[[], Exception]] = {
    "connection_refused": lambda: OperationalError(
        "Error HTTPConnectionPool(host='127.0.0.1', port=8123): [Errno 111] Connection refused"
    ),
    "http_500": http_500,
    "timeout": lambda: TimeoutError("insert timed out"),
}


class FakeWriter:
    """In-memory ClickHouse stand-in with ClickHouse's token dedup semantics."""

    def __init__(self, poison: set[str] | None = None) -> None:
        self.tokens: set[str] = set()
        self.rows: list[UsageEvent] = []
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.poison = poison or set()
        self.lock = threading.Lock()

    def write(self, payloads: Sequence[bytes], token: str) -> None:
        events = decode_all(payloads)  # raises DataError, as ClickHouse would reject them
        with self.lock:
            self.calls += 1
            if any(e.event_id in self.poison for e in events):
                raise DataError("Code: 53. TYPE_MISMATCH (poisoned test row)")
            if token in self.tokens:
                return  # deduplicated, like insert_deduplication_token
            self.tokens.add(token)
            self.rows.extend(events)
            self.batch_sizes.append(len(events))

    def ids(self) -> Counter[str]:
        with self.lock:
            return Counter(e.event_id for e in self.rows)


class FlakyWriter:
    """Wraps a writer; fails while `failing` is set. commit_then_fail: the insert happens but
    the caller sees a timeout (the case only dedup can make exactly-once)."""

    def __init__(self, inner: BatchWriter, fault: str = "connection_refused",
                 commit_then_fail: bool = False) -> None:
        self.inner = inner
        self.fault = FAULTS[fault]
        self.commit_then_fail = commit_then_fail
        self.failing = threading.Event()
        self.failures = 0

    def write(self, payloads: Sequence[bytes], token: str) -> None:
        if self.failing.is_set():
            self.failures += 1
            if self.commit_then_fail:
                self.inner.write(payloads, token)
            raise self.fault()
        self.inner.write(payloads, token)


class PipelinedFlakyWriter(FlakyWriter):
    """The same faults on the prepare()/start() path of a pipelined writer."""

    def prepare(self, payloads: Sequence[bytes]) -> Any:
        return self.inner.prepare(payloads)  # type: ignore[attr-defined]

    def start(self, prepared: Any, token: str) -> Callable[[], None]:
        if not self.failing.is_set():
            return self.inner.start(prepared, token)  # type: ignore[attr-defined]
        self.failures += 1
        wait = self.inner.start(prepared, token) if self.commit_then_fail else None  # type: ignore[attr-defined]
        fault = self.fault()

        def fail() -> None:
            if wait is not None:
                wait()
            raise fault

        return fail


def flaky(inner: BatchWriter, fault: str = "connection_refused",
          commit_then_fail: bool = False) -> FlakyWriter:
    cls = PipelinedFlakyWriter if hasattr(inner, "prepare") else FlakyWriter
    return cls(inner, fault, commit_then_fail)


class PipelinedFakeWriter(FakeWriter):
    """FakeWriter with the optional prepare()/start() protocol."""

    def prepare(self, payloads: Sequence[bytes]) -> list[bytes]:
        if any(e.event_id in self.poison for e in decode_all(payloads)):
            raise DataError("column conversion failed (poisoned test row)")
        return list(payloads)

    def start(self, prepared: list[bytes], token: str) -> Callable[[], None]:
        return lambda: self.write(prepared, token)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
