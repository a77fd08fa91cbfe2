"""UsageEvents -> one Arrow table (column-oriented insert into usage_events).

Values are data, never SQL: the table goes to ClickHouse as an Arrow stream, so quotes,
newlines or NULs in a label need no escaping. What can still go wrong is bounded here:
over-long strings are truncated (counted, logged) and strings that are not valid UTF-8 (only
possible for events built outside protobuf) are repaired with U+FFFD (counted, logged).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from extproc.events import UsageEvent, token_source_name

log = logging.getLogger(__name__)

_TS = pa.timestamp("ns", tz="UTC")
_LABELS = pa.map_(pa.string(), pa.string())

# (column, arrow type); order = usage_events column order (MATERIALIZED/DEFAULT ones omitted)
STRING_FIELDS = (
    "event_id", "request_id", "endpoint", "path", "method", "request_model", "response_model",
    "finish_reason", "tokenizer", "error", "error_detail",
    "price_status", "price_ref", "gpu_pool", "operation",
)
INT_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("http_status", pa.uint16()),
    ("prompt_tokens", pa.uint64()),
    ("completion_tokens", pa.uint64()),
    ("cached_tokens", pa.uint64()),
    ("reasoning_tokens", pa.uint64()),
    ("total_tokens", pa.uint64()),
    ("time_to_first_token_ns", pa.int64()),
    ("duration_ns", pa.int64()),
    ("choices", pa.uint32()),
    ("response_events", pa.uint32()),
    ("list_cost_micros", pa.int64()),
    ("gpu_work_milli", pa.uint64()),
    ("cache_creation_tokens", pa.uint64()),
    ("audio_seconds", pa.uint32()),
)
BOOL_FIELDS = ("stream", "client_aborted", "metered", "usage_injected")


@dataclass
class ColumnStats:
    values_truncated: int = 0
    values_repaired: int = 0  # invalid UTF-8 replaced
    # start/end time 0 -> a real time, so TTL and partitions stay sane (counted on the arrow
    # path; with insert_format=protobuf the column defaults of migration 0003 do it, uncounted)
    times_defaulted: int = 0


_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return _SURROGATES.sub("\ufffd", str(value))  # lone surrogates cannot be encoded


def truncate_utf8(value: str, max_bytes: int) -> str:
    """At most max_bytes of UTF-8, never half a character."""
    return value.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def count_truncated(stats: ColumnStats, name: str, n: int, max_bytes: int) -> None:
    """Count and log values of column `name` cut to max_bytes (both insert formats)."""
    stats.values_truncated += n
    if name == "labels":
        log.warning("usage_events.labels: truncated %d label(s) to %d bytes", n, max_bytes)
    else:
        log.warning("usage_events.%s: truncated %d value(s) to %d bytes (storage.max_value_bytes)",
                    name, n, max_bytes)


def _string_array(name: str, values: list[Any], max_bytes: int, stats: ColumnStats) -> pa.Array:
    try:
        arr = pa.array(values, pa.string())
    except (pa.ArrowException, UnicodeError, TypeError):
        fixed = [_utf8(v) for v in values]
        repaired = sum(1 for a, b in zip(values, fixed, strict=True) if a != b)
        stats.values_repaired += repaired
        log.warning("usage_events.%s: repaired %d value(s) that were not valid UTF-8", name, repaired)
        values = fixed
        arr = pa.array(values, pa.string())
    if len(arr) and pc.max(pc.binary_length(arr)).as_py() > max_bytes:
        values = arr.to_pylist()
        long = [i for i, v in enumerate(values) if len(v.encode("utf-8")) > max_bytes]
        for i in long:
            values[i] = truncate_utf8(values[i], max_bytes)
        count_truncated(stats, name, len(long), max_bytes)
        arr = pa.array(values, pa.string())
    return arr


def _labels_array(events: Sequence[UsageEvent], max_bytes: int, stats: ColumnStats) -> pa.Array:
    # Flat keys/values + offsets: ~3x faster than a list of rows of tuples, and this runs on
    # the ClickHouse thread, which competes with the gRPC loop for the GIL.
    keys: list[str] = []
    values: list[str] = []
    offsets = [0]
    add_key, add_value, add_offset = keys.append, values.append, offsets.append
    for e in events:
        m = e.labels
        for k in m:  # keys + lookups: ~1.5x faster than items() on upb maps
            add_key(k)
            add_value(m[k])
        add_offset(len(keys))
    try:
        arr = pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys, _LABELS.key_type),
                                      pa.array(values, _LABELS.item_type))
    except (pa.ArrowException, UnicodeError, TypeError):
        rows = [[(_utf8(k), _utf8(m[k])) for k in m] for m in (e.labels for e in events)]
        stats.values_repaired += 1
        log.warning("usage_events.labels: repaired label(s) that were not valid UTF-8")
        arr = pa.array(rows, _LABELS)
    flat = pa.concat_arrays([arr.keys, arr.items]) if len(arr) else None
    if flat is not None and len(flat) and pc.max(pc.binary_length(flat)).as_py() > max_bytes:
        count = 0
        fixed_rows = []
        for row in arr.to_pylist():
            fixed = []
            for k, v in row:
                if len(k.encode()) > max_bytes or len(v.encode()) > max_bytes:
                    count += 1
                    k, v = truncate_utf8(k, max_bytes), truncate_utf8(v, max_bytes)
                fixed.append((k, v))
            fixed_rows.append(fixed)
        count_truncated(stats, "labels", count, max_bytes)
        arr = pa.array(fixed_rows, _LABELS)
    return arr


def _times(events: Sequence[UsageEvent], stats: ColumnStats) -> tuple[pa.Array, pa.Array]:
    starts = [e.start_time_unix_nano for e in events]
    ends = [e.end_time_unix_nano for e in events]
    if 0 in starts or 0 in ends:
        now = time.time_ns()
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if s <= 0 or e <= 0:
                stats.times_defaulted += 1
                starts[i] = s if s > 0 else (e if e > 0 else now)
                ends[i] = e if e > 0 else starts[i]
    return pa.array(starts, pa.int64()).cast(_TS), pa.array(ends, pa.int64()).cast(_TS)


def to_arrow(
    events: Sequence[UsageEvent], max_value_bytes: int = 65_536, stats: ColumnStats | None = None
) -> pa.Table:
    stats = stats if stats is not None else ColumnStats()
    cols: dict[str, pa.Array] = {}
    for name in ("event_id", "request_id"):
        cols[name] = _string_array(name, [getattr(e, name) for e in events], max_value_bytes, stats)
    cols["start_time"], cols["end_time"] = _times(events, stats)
    cols["labels"] = _labels_array(events, max_value_bytes, stats)
    for name in STRING_FIELDS[2:]:
        cols[name] = _string_array(name, [getattr(e, name) for e in events], max_value_bytes, stats)
    for name, typ in INT_FIELDS:
        cols[name] = pa.array([getattr(e, name) for e in events], typ)
    for name in BOOL_FIELDS:
        cols[name] = pa.array([getattr(e, name) for e in events], pa.bool_())
    cols["token_source"] = pa.array([token_source_name(e.token_source) for e in events], pa.string())
    return pa.table(cols)
