"""Spool records -> ClickHouse's Protobuf input format (length-delimited UsageEvents).

The spool already holds every event serialized, so a batch goes to ClickHouse as those bytes,
each prefixed by its length, and ClickHouse's C++ reader parses them. Decoding each event in
Python and building Arrow columns cost ~17 µs per event on the batcher thread, which shares the
GIL with the gRPC loop; this costs ~2-4 µs. Columns match the proto's field names; the two
times land in EPHEMERAL columns (migration 0003) from which the DateTime64 columns are computed.

Two checks stay here because ClickHouse would not make them: every record is valid protobuf
with valid UTF-8 strings (else DataError: the batcher isolates and dead-letters the record),
and no string is longer than max_value_bytes (truncated, counted, logged). Only a record longer
than max_value_bytes can hold such a string, so only those are decoded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from extproc.events import TokenSource, UsageEvent, token_source_name
from extproc.storage.columns import ColumnStats, count_truncated, truncate_utf8
from extproc.storage.decode import batch_parses, varint

_VALIDATE_CHUNK = 512  # records per protobuf parse: keeps each GIL hold well under 1 ms

_SCALAR = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
}


def schema_text() -> str:
    """UsageEvent as .proto source, rendered from the compiled descriptor, so it cannot drift
    from what the sidecar serializes."""
    msg = UsageEvent.DESCRIPTOR
    enums: dict[str, str] = {}
    lines = []
    for f in msg.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            typ = f"map<{_SCALAR[key.type]}, {_SCALAR[value.type]}>"
        elif f.type == FieldDescriptor.TYPE_ENUM:
            e = f.enum_type
            if e is None:
                raise TypeError(f"enum field {f.name} without an enum descriptor")
            if e is not TokenSource.DESCRIPTOR:
                raise TypeError(f"no stored names for enum {e.full_name}")
            # values named as the arrow path stores them ("tokenizer", not "TOKENIZER"):
            # ClickHouse writes an enum into a String column by the name in this schema
            enums[e.name] = "\n".join(f"  {token_source_name(v.number)} = {v.number};" for v in e.values)
            typ = e.name
        else:
            typ = _SCALAR[f.type]
        lines.append(f"  {typ} {f.name} = {f.number};")
    out = ['syntax = "proto3";']
    out += [f"enum {name} {{\n{body}\n}}" for name, body in enums.items()]
    out.append(f"message {msg.name} {{\n" + "\n".join(lines) + "\n}")
    return "\n".join(out) + "\n"


COLUMNS: tuple[str, ...] = tuple(f.name for f in UsageEvent.DESCRIPTOR.fields)
SCHEMA = schema_text()
# A ClickHouse server: the schema inline, nothing to install on it.
INLINE_SETTINGS: dict[str, str] = {
    "format_schema_source": "string",
    "format_schema": SCHEMA,
    "format_schema_message_name": UsageEvent.DESCRIPTOR.name,
}


def file_settings(path: str) -> dict[str, str]:
    """chDB: the schema as a file (absolute path, SCHEMA written there by the caller). Given
    inline, the embedded engine caches a copy under the process's working directory."""
    return {"format_schema": f"{path}:{UsageEvent.DESCRIPTOR.name}"}


_STRINGS = tuple(f.name for f in UsageEvent.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING)


def _shorten(payload: bytes, max_bytes: int, counts: Counter[str]) -> bytes:
    event = UsageEvent.FromString(payload)
    changed = False
    for name in _STRINGS:
        value = getattr(event, name)
        if len(value) * 4 > max_bytes and len(value.encode("utf-8")) > max_bytes:
            setattr(event, name, truncate_utf8(value, max_bytes))
            counts[name] += 1
            changed = True
    long = [k for k in event.labels
            if len(k.encode("utf-8")) > max_bytes or len(event.labels[k].encode("utf-8")) > max_bytes]
    for k in long:
        value = event.labels.pop(k)
        event.labels[truncate_utf8(k, max_bytes)] = truncate_utf8(value, max_bytes)
        counts["labels"] += 1
        changed = True
    return event.SerializeToString() if changed else payload


def encode(payloads: Sequence[bytes], max_value_bytes: int, stats: ColumnStats) -> bytes:
    """The insert body for these records; raises DecodeError if one is not a valid event."""
    for i in range(0, len(payloads), _VALIDATE_CHUNK):
        if not batch_parses(payloads[i:i + _VALIDATE_CHUNK]):
            raise DecodeError("not a valid UsageEvent (protobuf or UTF-8 error)")
    counts: Counter[str] = Counter()
    parts: list[bytes] = []
    add = parts.append
    for p in payloads:
        if len(p) > max_value_bytes:
            p = _shorten(p, max_value_bytes, counts)
        add(varint(len(p)))
        add(p)
    for name, n in counts.items():
        count_truncated(stats, name, n, max_value_bytes)
    return b"".join(parts)
