"""The price book's GPU pool rates -> ClickHouse's gpu_pool_rates table (migration 0006).

The reports allocate each pool-hour's cost from this table, so it always holds what the
current pricing file says: replaced as a whole at start and by `extproc reprice`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from extproc.governance.pricing import PriceBook, rate_rows

TABLE = "gpu_pool_rates"
_COLUMNS = ("pool", "since", "hour_cost_micros", "capacity_work_milli", "explicit_start")


def sync_rates(client: Any, book: PriceBook) -> int:
    """Synchronous: on the storage's ClickHouse thread. Returns the rows written."""
    rows = [[r["pool"], datetime.fromtimestamp(r["since_ns"] // 1_000_000_000, tz=UTC)
             .replace(microsecond=(r["since_ns"] % 1_000_000_000) // 1000),
             r["hour_cost_micros"], r["capacity_work_milli"], r["explicit_start"]]
            for r in rate_rows(book)]
    client.command(f"TRUNCATE TABLE IF EXISTS {TABLE}")
    if rows:
        client.insert(TABLE, rows, column_names=list(_COLUMNS))
    return len(rows)
