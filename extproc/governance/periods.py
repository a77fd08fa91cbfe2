"""Calendar periods in UTC: where a budget's day, week (ISO, from Monday) or month starts and ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def period_bounds(period: str, now_s: float) -> tuple[int, int]:
    """(start, end) in Unix seconds of the period holding `now_s`."""
    now = datetime.fromtimestamp(now_s, UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return int(start.timestamp()), int(end.timestamp())
