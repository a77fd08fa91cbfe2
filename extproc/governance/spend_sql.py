"""The query that brings a period's spend back from ClickHouse after a restart (pure: SQL text
and bound parameters; the caller runs it)."""

from __future__ import annotations

from typing import Any

from extproc.governance.policy import Budget

# label name in usage_events.labels for each scope field; the key's id is stored as label "key"
_LABELS = {"team": "team", "feature": "feature", "user": "user", "key": "key"}


# what each budget unit sums: tokens, or the list cost in integer micro-USD the pricing stage
# stamped on each event (unpriced events carry 0, as they counted $0 at admission)
_COLUMNS = {"tokens": "total_tokens", "usd": "list_cost_micros"}


def spend_query(budget: Budget, period_start: int, unit: str = "tokens") -> tuple[str, dict[str, Any]]:
    """Tokens (or micro-USD) spent by this budget's scope since `period_start` (Unix seconds).
    The hourly rollup serves team / feature scopes (periods start on an hour); the raw events
    the others."""
    column = _COLUMNS[unit]
    s = budget.scope
    params: dict[str, Any] = {"since": period_start}
    fields = [(f, getattr(s, f)) for f in ("team", "feature", "user", "key") if getattr(s, f)]
    rollup = all(f in ("team", "feature") for f, _ in fields)
    where = []
    for i, (f, value) in enumerate(fields):
        params[f"v{i}"] = value
        if rollup:
            where.append(f"{f} = {{v{i}:String}}")
        else:
            params[f"l{i}"] = _LABELS[f]
            where.append(f"labels[{{l{i}:String}}] = {{v{i}:String}}")
    cond = " AND ".join(where)
    if rollup:
        sql = f"SELECT sum({column}) FROM usage_hourly WHERE hour >= toDateTime({{since:Int64}}) AND {cond}"
    else:
        sql = (f"SELECT sum({column}) FROM usage_events "
               f"WHERE start_time >= toDateTime64({{since:Int64}}, 9) AND {cond}")
    return sql, params
