"""`extproc reprice`: apply the current price book to stored history from a time on.

Prices are stamped on each event when it is stored (so reports are plain sums and every event
says what it cost); a corrected price therefore rewrites history: one ALTER TABLE ... UPDATE
on the raw events from the start of `since`'s hour, with the price book compiled into
`multiIf` expressions over (model, time window) -- the same integer arithmetic as
governance.pricing.cost_micros -- then the rollup rows of those hours are deleted and rebuilt
from the raw table (sql/maintenance/rebuild_usage_hourly.sql). Run on the storage's one
ClickHouse thread, nothing of ours inserts in between. Model names are bound parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from extproc.governance.pricing import MICRO, PriceBook
from extproc.storage.migrations import SQL_DIR

log = logging.getLogger(__name__)

_FOREVER = 2 ** 62
_SYNC = {"mutations_sync": 2}
_REBUILD = SQL_DIR / "maintenance" / "rebuild_usage_hourly.sql"


@dataclass
class RepriceResult:
    since: datetime
    events: int
    models: int
    rollup_hours: int
    list_cost_usd_before: str
    list_cost_usd_after: str

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat().replace("+00:00", "Z"), "events": self.events,
                "models": self.models, "rollup_hours": self.rollup_hours,
                "list_cost_usd_before": self.list_cost_usd_before, "list_cost_usd_after": self.list_cost_usd_after}


def _hour(value: datetime) -> datetime:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(minute=0, second=0, microsecond=0)


def _ns(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000_000


def _usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    return f"{sign}{abs(micros) // MICRO}.{abs(micros) % MICRO:06d}"


_UNCACHED = "(prompt_tokens - least(cached_tokens, prompt_tokens))"
_CACHED = "least(cached_tokens, prompt_tokens)"
_REASONING = "least(reasoning_tokens, completion_tokens)"
_PLAIN_OUT = f"(completion_tokens - {_REASONING})"
_WINDOW = "toUnixTimestamp64Nano(start_time) >= {lo} AND toUnixTimestamp64Nano(start_time) < {hi}"


def _expressions(book: PriceBook, models: list[str], params: dict[str, Any]) -> dict[str, str]:
    cost: list[str] = []
    priced_when: list[str] = []
    ref: list[str] = []
    pool: list[str] = []
    work: list[str] = []
    for i, model in enumerate(models):
        params[f"m{i}"] = model
        is_model = f"model = {{m{i}:String}}"
        entry = book.entry(model)
        if entry is None:
            continue
        for j, p in enumerate(entry.periods):
            hi = entry.periods[j + 1].since_ns if j + 1 < len(entry.periods) else _FOREVER
            cond = f"{is_model} AND " + _WINDOW.format(lo=int(p.since_ns), hi=int(hi))
            tokens = (f"intDiv({_UNCACHED} * {int(p.input_micros_per_mtok)} + {_CACHED} * "
                      f"{int(p.cached_input_micros_per_mtok)} + {_PLAIN_OUT} * {int(p.output_micros_per_mtok)} + "
                      f"{_REASONING} * {int(p.reasoning_micros_per_mtok)} + {MICRO // 2}, {MICRO})")
            fee = f"if(http_status < 400 AND error = '', {int(p.request_fee_micros)}, 0)"
            cost.append(f"{cond}, toInt64({tokens}) + {fee}")
            priced_when.append(f"({cond})")
            params[f"r{i}_{j}"] = p.ref
            ref.append(f"{cond}, {{r{i}_{j}:String}}")
        gp = book.pools.get(entry.pool) if entry.pool else None
        if gp is None:
            continue
        params[f"p{i}"] = gp.name
        pool.append(f"{is_model}, {{p{i}:String}}")
        for j, r in enumerate(gp.rates):
            lo = r.since_ns if (j or gp.explicit_start) else 0
            hi = gp.rates[j + 1].since_ns if j + 1 < len(gp.rates) else _FOREVER
            cond = f"{is_model} AND " + _WINDOW.format(lo=int(lo), hi=int(hi))
            work.append(f"{cond}, toUInt64({_UNCACHED} * {int(r.prefill_weight_milli)} + "
                        f"completion_tokens * {int(r.decode_weight_milli)})")

    def multi(branches: list[str], default: str) -> str:
        return f"multiIf({', '.join(branches)}, {default})" if branches else default

    priced = f"metered AND ({' OR '.join(priced_when)})" if priced_when else "false"
    return {
        "list_cost_micros": f"if(metered, {multi(cost, 'toInt64(0)')}, toInt64(0))",
        "price_status": f"if(NOT metered, 'unmetered', if({priced}, 'priced', 'unpriced'))",
        "price_ref": f"if(metered, {multi(ref, chr(39) * 2)}, '')",
        "gpu_pool": f"if(metered, {multi(pool, chr(39) * 2)}, '')",
        "gpu_work_milli": f"if(metered, {multi(work, 'toUInt64(0)')}, toUInt64(0))",
    }


def reprice(client: Any, book: PriceBook, since: datetime, *, ttl_days: int = 0,
            now: datetime | None = None) -> RepriceResult:
    """Synchronous: on the storage's ClickHouse thread. Re-prices events from the start of
    since's hour and rebuilds the rollup from there."""
    start = _hour(since)
    now = now or datetime.now(UTC)
    if ttl_days > 0 and start < now - timedelta(days=ttl_days):
        raise ValueError(f"raw events older than {ttl_days} days (storage.ttl_days) have expired: the "
                         f"rollup before {(now - timedelta(days=ttl_days)).date()} cannot be re-priced")
    bound = {"since": start.strftime("%Y-%m-%d %H:%M:%S")}
    where = "start_time >= {since:DateTime64(9, 'UTC')}"
    models = [r[0] for r in client.query(
        f"SELECT DISTINCT model FROM usage_events WHERE {where} ORDER BY model", parameters=bound).result_rows]
    before = client.query(f"SELECT count(), sum(list_cost_micros) FROM usage_events WHERE {where}",
                          parameters=bound).result_rows[0]
    params: dict[str, Any] = dict(bound)
    exprs = _expressions(book, models, params)
    sets = ", ".join(f"{col} = {expr}" for col, expr in exprs.items())
    if int(before[0]):
        client.command(f"ALTER TABLE usage_events UPDATE {sets} WHERE {where}", parameters=params,
                       settings=_SYNC)
    hours = int(client.command("SELECT count() FROM (SELECT DISTINCT hour FROM usage_hourly WHERE "
                               "hour >= {since:DateTime64(9, 'UTC')})", parameters=bound))
    client.command("ALTER TABLE usage_hourly DELETE WHERE hour >= {since:DateTime64(9, 'UTC')}",
                   parameters=bound, settings=_SYNC)
    client.command(_rebuild_sql(), parameters=bound)
    after = client.query(f"SELECT sum(list_cost_micros) FROM usage_events WHERE {where}",
                         parameters=bound).result_rows[0][0]
    result = RepriceResult(start, int(before[0]), len(models), hours, _usd(int(before[1] or 0)), _usd(int(after or 0)))
    log.info("repriced %d events of %d models since %s: list cost %s -> %s USD; %d rollup hours rebuilt",
             result.events, result.models, start.isoformat(), result.list_cost_usd_before,
             result.list_cost_usd_after, hours)
    return result


def _rebuild_sql() -> str:
    lines = [line for line in _REBUILD.read_text().splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip().rstrip(";")
