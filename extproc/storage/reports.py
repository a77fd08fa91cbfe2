"""Named reports: the SQL files in extproc/sql/queries, run with bound parameters, formatted.

Safety: dimension names (`by`, filter keys) are checked against a whitelist and only ever
select a fixed SQL expression from the tables below; every value (label values, times, limit,
even label *names* used as map keys) is a server-side query parameter ({name:Type}).
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from extproc.storage.migrations import SQL_DIR

FORMATS = ("table", "json", "csv", "parquet")
_META = re.compile(r"^--\s*(source|default_by|default_limit):\s*(.*?)\s*$", re.MULTILINE)
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(2200, 1, 1, tzinfo=UTC)
MAX_LIMIT = 1_000_000

ROLLUP_DIMS = {
    "team": "team",
    "feature": "feature",
    "model": "model",
    "endpoint": "endpoint",
    "hour": "hour",
    "day": "toDate(hour)",
    "month": "toStartOfMonth(hour)",
}
RAW_DIMS = {
    "team": "team",
    "feature": "feature",
    "model": "model",
    "endpoint": "endpoint",
    "request_model": "request_model",
    "response_model": "response_model",
    "status": "http_status",
    "error": "error",
    "token_source": "token_source",
    "hour": "toStartOfHour(start_time)",
    "day": "toDate(start_time)",
    "month": "toStartOfMonth(start_time)",
}
# the gpu_pools report: pool-hours, not requests
POOL_DIMS = {
    "pool": "pool",
    "hour": "hour",
    "day": "toDate(hour)",
    "month": "toStartOfMonth(hour)",
}
ROLLUP_DIMS["pool"] = "gpu_pool"
RAW_DIMS["pool"] = "gpu_pool"
RAW_DIMS["price_status"] = "price_status"
_FIXED_DIMS = {"rollup": ROLLUP_DIMS, "pools": POOL_DIMS}
# dimensions whose values can be filtered on (as String)
_TIME_DIMS = {"hour", "day", "month"}
_NUMERIC_DIMS = {"status"}


class ReportError(ValueError):
    pass


@dataclass(frozen=True)
class Report:
    name: str
    source: str  # raw | rollup
    default_by: tuple[str, ...]
    default_limit: int
    template: str
    description: str


def load_reports() -> dict[str, Report]:
    out = {}
    for path in sorted((SQL_DIR / "queries").glob("*.sql")):
        text = path.read_text()
        meta = dict(_META.findall(text))
        desc = " ".join(
            line[2:].strip() for line in text.splitlines()
            if line.startswith("--") and not _META.match(line) and line[2:].strip()
        ).split(" Template ")[0]
        out[path.stem] = Report(
            name=path.stem,
            source=meta.get("source", "raw"),
            default_by=tuple(d for d in meta.get("default_by", "").replace(" ", "").split(",") if d),
            default_limit=int(meta.get("default_limit", "1000")),
            template="\n".join(line for line in text.splitlines() if not line.startswith("--")),
            description=desc,
        )
    return out


REPORTS = load_reports()


def dimensions(report: Report, label_names: Iterable[str] = ()) -> list[str]:
    """The `by` values a report accepts: fixed columns, plus configured labels on raw data."""
    dims = dict(_FIXED_DIMS.get(report.source, RAW_DIMS))
    names = list(dims)
    if report.source == "raw":
        names += [n for n in label_names if n not in dims and _LABEL_NAME.match(n)]
    return names


def _utc(value: datetime | None, default: datetime) -> str:
    value = default if value is None else value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive input means UTC
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def build_query(
    name: str,
    by: Sequence[str] | str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    filters: Mapping[str, str] | None = None,
    label_names: Iterable[str] = (),
) -> tuple[str, dict[str, Any]]:
    report = REPORTS.get(name)
    if report is None:
        raise ReportError(f"unknown report {name!r}; available: {', '.join(sorted(REPORTS))}")
    allowed = dimensions(report, label_names)
    fixed = _FIXED_DIMS.get(report.source, RAW_DIMS)
    if isinstance(by, str):
        by = [by]
    dims: list[str] = []
    for item in report.default_by if by is None else by:
        for d in str(item).split(","):
            d = d.strip()
            if not d or d in dims:
                continue
            if d not in allowed:
                raise ReportError(
                    f"report {name!r} cannot group by {d[:64]!r}; allowed: {', '.join(allowed)}"
                )
            dims.append(d)
    params: dict[str, Any] = {}

    def expr(dim: str) -> str:
        if dim in fixed:
            return fixed[dim]
        key = f"label_{len(params)}"
        params[key] = dim  # even the label name is bound, never spliced
        return f"labels[{{{key}:String}}]"

    select = "".join(f"{expr(d)} AS `{d}`,\n    " for d in dims)
    where = ""
    for i, (dim, value) in enumerate((filters or {}).items()):
        if dim not in allowed or dim in _TIME_DIMS:
            raise ReportError(f"report {name!r} cannot filter on {str(dim)[:64]!r}")
        params[f"f_{i}"] = str(value)
        column = expr(dim)
        if dim in _NUMERIC_DIMS:
            column = f"toString({column})"
        where += f"AND {column} = {{f_{i}:String}}\n  "
    if limit is None:
        limit = report.default_limit
    if not 0 < int(limit) <= MAX_LIMIT:
        raise ReportError(f"limit must be between 1 and {MAX_LIMIT}")
    params.update(since=_utc(since, _MIN_TIME), until=_utc(until, _MAX_TIME), limit=int(limit))
    sql = (
        report.template.replace("{{select}}", select)
        .replace("{{where}}", where)
        .replace("{{group_by}}", ", ".join(f"`{d}`" for d in dims) or "tuple()")
        .replace("{{order_by}}", "".join(f", `{d}`" for d in dims))
    )
    return sql, params


def _py(value: Any) -> Any:
    # chDB / clickhouse-connect return DateTime without tzinfo: the columns are UTC
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def run_report(client: Any, name: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Synchronous: call it on the storage's ClickHouse thread."""
    sql, params = build_query(name, **kwargs)
    result = client.query(sql, parameters=params)
    cols = result.column_names
    return [{c: _py(v) for c, v in zip(cols, row, strict=True)} for row in result.result_rows]


# ---- formatting ---------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e15 else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    cells = [[_text(r.get(c)).replace("\n", "\\n") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r.get(c), (int, float, Decimal)) for r in rows) for c in cols]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells]
    return "\n".join(out) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError


def render(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "table":
        return _table(rows).encode()
    if fmt == "json":
        return orjson.dumps(rows, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z) + b"\n"
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: _text(v) for k, v in r.items()} for r in rows)
        return buf.getvalue().encode()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data: bytes = sink.getvalue().to_pybytes()
        return data
    raise ReportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def format_rows(
    rows: list[dict[str, Any]], fmt: str = "table", output: str | Path | IO[Any] | None = None
) -> None:
    """Write rows as table|json|csv|parquet to a file path, a file object, or stdout."""
    data = render(rows, fmt)
    if output is None or output == "-":
        stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        if stream is not None:
            sys.stdout.flush()
            stream.write(data)
            stream.flush()
        else:  # e.g. a captured stdout (tests)
            sys.stdout.write(data.decode("utf-8", "replace"))
    elif isinstance(output, (str, Path)):
        Path(output).write_bytes(data)
    else:
        try:
            output.write(data)
        except TypeError:
            output.write(data.decode())
