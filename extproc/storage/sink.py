"""Insert one batch of UsageEvents into ClickHouse, idempotently.

Dedup: every insert carries insert_deduplication_token = a hash of the batch's serialized
events. A retry of the same batch (after a timeout whose insert in fact succeeded, or a replay
after a crash) carries the same token, and ClickHouse drops it: raw table and rollup once.
usage_events has non_replicated_deduplication_window (Replicated tables dedup by default), and
deduplicate_blocks_in_dependent_materialized_views=1 lets a retry complete a rollup insert
that failed after the raw insert had succeeded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
from google.protobuf.message import DecodeError

from extproc.config import INSERT_FORMATS
from extproc.events import UsageEvent
from extproc.storage import pbinput
from extproc.storage.columns import ColumnStats, to_arrow
from extproc.storage.decode import decode

log = logging.getLogger(__name__)

TABLE = "usage_events"

# ClickHouse error codes that mean "this data can never be inserted": retrying is useless, the
# batch is split to isolate the bad rows. Everything else (network, timeouts, HTTP 5xx, memory
# limits, too many parts, readonly, ...) is retried with the same token.
DATA_ERROR_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,   # ATTEMPT_TO_READ_AFTER_EOF
    33,   # CANNOT_READ_ALL_DATA
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    436,  # a Protobuf value that does not fit its column (an http_status > 65535)
    444,  # Protobuf records that are corrupted or do not match the schema
    469,  # VIOLATED_CONSTRAINT
})


class DataError(Exception):
    """Not retryable: the content of the batch is the problem."""


def is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, DataError):
        return True
    code = getattr(exc, "code", None)
    try:
        return int(code) in DATA_ERROR_CODES  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _no_inline_schema(exc: BaseException) -> bool:
    """A server (or clickhouse-connect's check of its settings) that does not know
    format_schema_source: ClickHouse before the inline schema setting."""
    return "format_schema_source" in str(exc) and (
        getattr(exc, "code", None) in (115, "115") or "unknown" in str(exc).lower()
        or "not valid" in str(exc).lower() or "readonly" in str(exc).lower())


def batch_token(payloads: Sequence[bytes]) -> str:
    """Same events in the same order -> same token, in any process, on any host."""
    h = hashlib.blake2b(digest_size=16)
    for p in payloads:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return "extproc-" + h.hexdigest()


@runtime_checkable
class BatchWriter(Protocol):
    """What the batcher needs: write(payloads, token) stores a batch of serialized UsageEvents
    (spool records) or raises DataError (not retryable: the batcher isolates the bad records)
    or anything else (retried)."""

    def write(self, payloads: Sequence[bytes], token: str) -> None: ...


@runtime_checkable
class PipelinedWriter(BatchWriter, Protocol):
    """A writer that also splits write() in two: prepare(payloads) -> P (CPU work, may raise
    DataError) and start(P, token) -> wait (starts the insert; wait() blocks until it is done
    and raises like write). The batcher then builds the next batch while the current one is
    being inserted."""

    def prepare(self, payloads: Sequence[bytes]) -> Any: ...

    def start(self, prepared: Any, token: str) -> Callable[[], None]: ...


class ClientRunner(Protocol):
    """Runs fn(client) on the storage's ClickHouse thread (see store.Storage)."""

    def submit(self, fn: Callable[[Any], Any], timeout: float | None) -> Future[Any]: ...

    def wait(self, future: Future[Any], timeout: float | None) -> Any: ...


def decode_all(payloads: Sequence[bytes]) -> list[UsageEvent]:
    events, bad = decode(payloads)
    if bad:
        raise DataError(f"{len(bad)} record(s) not a valid UsageEvent (protobuf or UTF-8 error)")
    return events


@dataclass(frozen=True)
class _ProtobufBody:
    payloads: Sequence[bytes]  # kept to convert to Arrow if the server turns out not to take it
    body: bytes


class ClickHouseWriter:
    """insert_format protobuf (default): the records as they are, parsed by ClickHouse
    (pbinput.py). arrow: decoded here and converted to Arrow columns (columns.py), the path
    for a ClickHouse server too old for an inline Protobuf schema (format_schema_source)."""

    def __init__(
        self,
        runner: ClientRunner,
        *,
        table: str = TABLE,
        timeout: float | None = 30.0,
        max_value_bytes: int = 65_536,
        stats: ColumnStats | None = None,
        insert_format: str = "protobuf",
        protobuf_settings: dict[str, str] | None = None,
    ) -> None:
        if insert_format not in INSERT_FORMATS:
            raise ValueError(f"insert_format must be one of {INSERT_FORMATS}")
        self._runner = runner
        self._table = table
        self._timeout = timeout
        self._max_value_bytes = max_value_bytes
        self._format = insert_format
        # how ClickHouse finds the schema (pbinput.INLINE_SETTINGS or file_settings(path))
        self._protobuf_settings = protobuf_settings or pbinput.INLINE_SETTINGS
        self.stats = stats if stats is not None else ColumnStats()

    def prepare(self, payloads: Sequence[bytes]) -> _ProtobufBody | pa.Table:
        try:
            if self._format == "protobuf":
                return _ProtobufBody(payloads, pbinput.encode(payloads, self._max_value_bytes, self.stats))
            return to_arrow(decode_all(payloads), self._max_value_bytes, self.stats)
        except DataError:
            raise
        except DecodeError as exc:
            raise DataError(str(exc)) from exc
        except Exception as exc:  # a value Arrow cannot take, e.g. http_status > 65535
            raise DataError(f"column conversion failed: {exc}") from exc

    def start(self, prepared: _ProtobufBody | pa.Table, token: str) -> Callable[[], None]:
        if isinstance(prepared, _ProtobufBody) and self._format == "arrow":
            prepared = self.prepare(prepared.payloads)  # prepared before the fallback below
        settings: dict[str, Any] = {
            "insert_deduplicate": 1,
            "insert_deduplication_token": token,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        }
        if isinstance(prepared, _ProtobufBody):
            settings.update(self._protobuf_settings)
            body = prepared.body

            def insert(c: Any) -> Any:
                return c.raw_insert(self._table, pbinput.COLUMNS, body, settings=settings,
                                    fmt="Protobuf")
        else:
            def insert(c: Any) -> Any:
                return c.insert_arrow(self._table, prepared, settings=settings)

        future = self._runner.submit(insert, self._timeout)

        def wait() -> None:
            try:
                self._runner.wait(future, self._timeout)
            except Exception as exc:
                if isinstance(prepared, _ProtobufBody) and _no_inline_schema(exc):
                    self._fall_back_to_arrow(exc)
                    raise  # retried by the batcher: write() prepares it again, as Arrow
                if is_data_error(exc):
                    raise DataError(str(exc)) from exc
                raise

        return wait

    def _fall_back_to_arrow(self, exc: Exception) -> None:
        if self._format != "arrow":
            self._format = "arrow"
            log.warning("this ClickHouse cannot take an inline Protobuf schema (%s); inserting as "
                        "Arrow from now on (set storage.insert_format: arrow to start that way)",
                        str(exc).splitlines()[0][:200])

    def write(self, payloads: Sequence[bytes], token: str) -> None:
        self.start(self.prepare(payloads), token)()
