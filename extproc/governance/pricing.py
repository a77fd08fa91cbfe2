"""The pricing file -> a PriceBook: list prices per model and the cost of our own GPU pools.

Money is integers, never floats: prices are read from the YAML text as Decimal and kept as
micro-USD per 1M tokens (so a token costs an exact number of pico-dollars), and a request's
list cost is rounded once, half up, to the micro-dollar. A pool's cost per hour is rounded to
the micro-dollar when the file is loaded; per-request GPU work is kept in milli work units.

Every value is checked at load; an error names the file and the line (PricingError, a
ConfigError). See README "Pricing and chargeback in money" for the file format.
"""

from __future__ import annotations

import bisect
import fnmatch
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from extproc.config import ConfigError

MICRO = 1_000_000
HOURS_PER_YEAR = 8760
HOURS_PER_MONTH = Decimal(HOURS_PER_YEAR) / 12  # 730
MILLI = 1000
# defaults for the GPU work of one token (see README): a decode step reads the whole model and
# KV cache from memory for one token per sequence, prefill processes many tokens per pass
DEFAULT_PREFILL_WEIGHT = Decimal(1)
DEFAULT_DECODE_WEIGHT = Decimal(5)

_PRICE_KEYS = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "reasoning_per_mtok",
               "request_fee")
_MODEL_KEYS = frozenset((*_PRICE_KEYS, "pool", "from", "changes"))
_POOL_COST_KEYS = ("gpus", "purchase_price_per_gpu", "depreciation_years", "depreciation_hours",
                   "rent_per_gpu_hour", "power_kw_per_gpu", "pue", "electricity_per_kwh", "ops_per_month",
                   "prefill_weight", "decode_weight", "capacity_work_per_hour")
_POOL_KEYS = frozenset((*_POOL_COST_KEYS, "from", "changes"))
_TOP_KEYS = frozenset(("currency", "models", "gpu_pools"))


class PricingError(ConfigError):
    """A pricing file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices from `since_ns` on (until the next change)."""

    since_ns: int
    input_micros_per_mtok: int
    cached_input_micros_per_mtok: int
    output_micros_per_mtok: int
    reasoning_micros_per_mtok: int
    request_fee_micros: int
    ref: str  # "<pattern>@<date>": which entry priced an event


@dataclass(frozen=True)
class ModelEntry:
    pattern: str
    periods: tuple[ModelPrice, ...]  # by since_ns; empty: the model only names its pool
    pool: str
    line: int

    def price_at(self, at_unix_nano: int) -> ModelPrice | None:
        periods = self.periods
        if len(periods) == 1:
            return periods[0] if periods[0].since_ns <= at_unix_nano else None
        i = bisect.bisect_right(self._starts, at_unix_nano) - 1
        return periods[i] if i >= 0 else None

    @cached_property
    def _starts(self) -> list[int]:  # once per loaded price book, not per event
        return [p.since_ns for p in self.periods]


@dataclass(frozen=True)
class PoolRate:
    """A GPU pool's cost and capacity from `since_ns` on."""

    since_ns: int
    hour_cost_micros: int
    capacity_work_milli: int  # work units per hour x 1000
    prefill_weight_milli: int
    decode_weight_milli: int
    # the parts of hour_cost (exact, before rounding), for the README's worked example and logs
    capital_per_hour: Decimal = Decimal(0)
    power_per_hour: Decimal = Decimal(0)
    ops_per_hour: Decimal = Decimal(0)


@dataclass(frozen=True)
class GpuPool:
    name: str
    rates: tuple[PoolRate, ...]
    explicit_start: bool  # `from` given: costs count from then, traffic or not
    line: int

    def rate_at(self, at_unix_nano: int) -> PoolRate | None:
        rates = self.rates
        if len(rates) == 1 and rates[0].since_ns <= at_unix_nano:
            return rates[0]
        i = bisect.bisect_right(self._starts, at_unix_nano) - 1
        return rates[i] if i >= 0 else rates[0] if not self.explicit_start else None

    @cached_property
    def _starts(self) -> list[int]:
        return [r.since_ns for r in self.rates]

    def work_milli(self, at_unix_nano: int, *, prompt_tokens: int, cached_tokens: int,
                   completion_tokens: int) -> int:
        """w = prefill_weight x uncached prompt tokens + decode_weight x completion tokens."""
        rate = self.rate_at(at_unix_nano)
        if rate is None:
            return 0
        uncached = max(prompt_tokens - cached_tokens, 0)
        return rate.prefill_weight_milli * uncached + rate.decode_weight_milli * completion_tokens


@dataclass
class PriceBook:
    path: str
    models: tuple[ModelEntry, ...]
    pools: dict[str, GpuPool]
    currency: str = "USD"
    _cache: dict[str, ModelEntry | None] = field(default_factory=dict, repr=False)

    def entry(self, model: str) -> ModelEntry | None:
        """Exact name first, then the first glob in file order that matches ("*" last)."""
        hit = self._cache.get(model, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        found = next((m for m in self.models if m.pattern == model), None)
        if found is None:
            globs = [m for m in self.models if m.pattern != "*" and _is_glob(m.pattern)]
            found = next((m for m in globs if fnmatch.fnmatchcase(model, m.pattern)), None)
        if found is None:
            found = next((m for m in self.models if m.pattern == "*"), None)
        if len(self._cache) < 4096:  # model names come from requests: bounded
            self._cache[model] = found
        return found

    def price(self, model: str, at_unix_nano: int) -> ModelPrice | None:
        entry = self.entry(model)
        return entry.price_at(at_unix_nano) if entry is not None else None

    def list_cost_micros(self, model: str, *, prompt_tokens: int, cached_tokens: int,
                         completion_tokens: int, reasoning_tokens: int, at_unix_nano: int,
                         request_fee: bool = True) -> int | None:
        """What a hosted API with these list prices would charge, in integer micro-USD
        (rounded half up once per request); None when the model has no price then."""
        p = self.price(model, at_unix_nano)
        if p is None:
            return None
        return cost_micros(p, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                           completion_tokens=completion_tokens, reasoning_tokens=reasoning_tokens,
                           request_fee=request_fee)

    def pool_for(self, model: str) -> GpuPool | None:
        entry = self.entry(model)
        return self.pools.get(entry.pool) if entry is not None and entry.pool else None


_MISSING = object()


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def cost_micros(p: ModelPrice, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                reasoning_tokens: int, request_fee: bool = True) -> int:
    # token counts are unsigned in the event; cached is part of prompt, reasoning of completion
    prompt = prompt_tokens if prompt_tokens > 0 else 0
    completion = completion_tokens if completion_tokens > 0 else 0
    cached = cached_tokens if 0 < cached_tokens < prompt else (prompt if cached_tokens > 0 else 0)
    reasoning = reasoning_tokens if 0 < reasoning_tokens < completion else (completion if reasoning_tokens > 0 else 0)
    # micro-USD per 1M tokens x tokens = micro-USD x 1e6
    scaled = ((prompt - cached) * p.input_micros_per_mtok + cached * p.cached_input_micros_per_mtok
              + (completion - reasoning) * p.output_micros_per_mtok + reasoning * p.reasoning_micros_per_mtok)
    tokens = (scaled + 500_000) // MICRO
    return tokens + (p.request_fee_micros if request_fee else 0)


def pool_hour_cost(gpus: int, capital_per_gpu_hour: Decimal, power_kw_per_gpu: Decimal, pue: Decimal,
                   electricity_per_kwh: Decimal, ops_per_month: Decimal) -> tuple[Decimal, Decimal, Decimal]:
    """(capital, power, operations) per pool-hour in USD, exact."""
    return (gpus * capital_per_gpu_hour, gpus * power_kw_per_gpu * pue * electricity_per_kwh,
            ops_per_month / HOURS_PER_MONTH)


def to_micros(usd: Decimal) -> int:
    return int((usd * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---- loading --------------------------------------------------------------------------------


class _Loader:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, message: str) -> PricingError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return PricingError(f"{self.path}{line}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: frozenset[str] | None = None
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.fail(k, f"{what}: keys must be plain strings")
            key = str(k.value)
            if key in out:
                raise self.fail(k, f"{what}: duplicate key {key!r}")
            if allowed is not None and key not in allowed:
                raise self.fail(k, f"{what}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
            out[key] = (k, v)
        return out

    def number(self, node: yaml.Node, name: str, places: int, *, positive: bool = False) -> Decimal:
        ok_tag = node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
        if not isinstance(node, yaml.ScalarNode) or not ok_tag:
            raise self.fail(node, f"{name} must be a number, got {_show(node)}")
        try:
            value = Decimal(str(node.value).replace("_", ""))
        except InvalidOperation:
            raise self.fail(node, f"{name} must be a number, got {_show(node)}") from None
        if not value.is_finite():
            raise self.fail(node, f"{name} must be a finite number, got {_show(node)}")
        if value < 0:
            raise self.fail(node, f"{name} must not be negative, got {node.value}")
        if positive and value == 0:
            raise self.fail(node, f"{name} must be greater than 0")
        if value != value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):
            raise self.fail(node, f"{name} has more than {places} decimal places: {node.value}")
        return value

    def integer(self, node: yaml.Node, name: str) -> int:
        value = self.number(node, name, 0, positive=True)
        return int(value)

    def since(self, node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            text = str(node.value).strip()
            try:
                if len(text) == 10:
                    d = date.fromisoformat(text)
                    dt = datetime(d.year, d.month, d.day, tzinfo=UTC)
                else:
                    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
                    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
                return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
            except ValueError:
                pass
        raise self.fail(node, f"from must be an ISO 8601 date or time (UTC), got {_show(node)}")

    def changes(self, node: yaml.Node, what: str) -> list[tuple[int, yaml.Node, yaml.Node]]:
        """(since_ns, the mapping node, the `from` node), in file order, dates rising."""
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what}.changes must be a list of {{from: DATE, ...}}")
        out: list[tuple[int, yaml.Node, yaml.Node]] = []
        for item in node.value:
            keys = self.mapping(item, f"{what}.changes[]")
            if "from" not in keys:
                raise self.fail(item, f"{what}: every change needs a `from` date")
            since = self.since(keys["from"][1])
            if out and since <= out[-1][0]:
                raise self.fail(keys["from"][1], f"{what}: changes must be in rising date order")
            out.append((since, item, keys["from"][1]))
        return out


def _show(node: yaml.Node) -> str:
    return repr(node.value) if isinstance(node, yaml.ScalarNode) else type(node).__name__.replace("Node", "").lower()


def _date_ref(since_ns: int) -> str:
    if since_ns <= 0:
        return "start"
    dt = datetime.fromtimestamp(since_ns / 1e9, tz=UTC)
    return dt.strftime("%Y-%m-%d") if dt.hour == dt.minute == dt.second == 0 else dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _model_entry(ld: _Loader, pattern: str, node: yaml.Node, pools: dict[str, GpuPool]) -> ModelEntry:
    what = f"models.{pattern!r}"
    keys = ld.mapping(node, what, _MODEL_KEYS)
    pool = ""
    if "pool" in keys:
        pnode = keys["pool"][1]
        pool = str(pnode.value) if isinstance(pnode, yaml.ScalarNode) else ""
        if pool not in pools:
            known = ", ".join(sorted(pools)) or "none defined"
            raise ld.fail(pnode, f"{what}: unknown GPU pool {_show(pnode)} (gpu_pools: {known})")
    steps: list[tuple[int, dict[str, tuple[yaml.Node, yaml.Node]], yaml.Node]] = []
    base = {k: v for k, v in keys.items() if k in _PRICE_KEYS}
    first_since = ld.since(keys["from"][1]) if "from" in keys else 0
    if base or "from" in keys:
        steps.append((first_since, base, node))
    if "changes" in keys:
        for since, item, from_node in ld.changes(keys["changes"][1], what):
            if steps and since <= steps[0][0]:
                raise ld.fail(from_node, f"{what}: a change must come after the entry's own `from`")
            ck = ld.mapping(item, f"{what}.changes[]", frozenset((*_PRICE_KEYS, "from")))
            steps.append((since, {k: v for k, v in ck.items() if k != "from"}, item))
    periods: list[ModelPrice] = []
    current: dict[str, Decimal] = {}
    for since, values, at in steps:
        for key, (_, vnode) in values.items():
            current[key] = ld.number(vnode, key, 6)
        if "input_per_mtok" not in current or "output_per_mtok" not in current:
            raise ld.fail(at, f"{what}: a price needs input_per_mtok and output_per_mtok")
        inp, out = current["input_per_mtok"], current["output_per_mtok"]
        periods.append(ModelPrice(
            since_ns=since,
            input_micros_per_mtok=to_micros(inp),
            cached_input_micros_per_mtok=to_micros(current.get("cached_input_per_mtok", inp)),
            output_micros_per_mtok=to_micros(out),
            reasoning_micros_per_mtok=to_micros(current.get("reasoning_per_mtok", out)),
            request_fee_micros=to_micros(current.get("request_fee", Decimal(0))),
            ref=f"{pattern}@{_date_ref(since)}",
        ))
    if not periods and not pool:
        raise ld.fail(node, f"{what}: give prices (input_per_mtok, output_per_mtok) or a pool, or both")
    return ModelEntry(pattern, tuple(periods), pool, node.start_mark.line + 1)


def _pool_rate(ld: _Loader, what: str, since: int, v: dict[str, Decimal], at: yaml.Node) -> PoolRate:
    if "gpus" not in v:
        raise ld.fail(at, f"{what}: gpus is required")
    if ("rent_per_gpu_hour" in v) == ("purchase_price_per_gpu" in v):
        raise ld.fail(at, f"{what}: give either rent_per_gpu_hour or purchase_price_per_gpu "
                          "(with depreciation_years or depreciation_hours)")
    if "purchase_price_per_gpu" in v:
        if ("depreciation_years" in v) == ("depreciation_hours" in v):
            raise ld.fail(at, f"{what}: purchase_price_per_gpu needs depreciation_years or depreciation_hours")
        hours = v["depreciation_hours"] if "depreciation_hours" in v else v["depreciation_years"] * HOURS_PER_YEAR
        capital = v["purchase_price_per_gpu"] / hours
    else:
        capital = v["rent_per_gpu_hour"]
    if "capacity_work_per_hour" not in v:
        raise ld.fail(at, f"{what}: capacity_work_per_hour is required (work units the pool does in an "
                          "hour at full load; see README)")
    pue = v.get("pue", Decimal(1))
    if pue < 1:
        raise ld.fail(at, f"{what}: pue is at least 1 (facility power / IT power), got {pue}")
    cap, power, ops = pool_hour_cost(int(v["gpus"]), capital, v.get("power_kw_per_gpu", Decimal(0)), pue,
                                     v.get("electricity_per_kwh", Decimal(0)), v.get("ops_per_month", Decimal(0)))
    return PoolRate(
        since_ns=since,
        hour_cost_micros=to_micros(cap + power + ops),
        capacity_work_milli=int(v["capacity_work_per_hour"] * MILLI),
        prefill_weight_milli=int(v.get("prefill_weight", DEFAULT_PREFILL_WEIGHT) * MILLI),
        decode_weight_milli=int(v.get("decode_weight", DEFAULT_DECODE_WEIGHT) * MILLI),
        capital_per_hour=cap, power_per_hour=power, ops_per_hour=ops,
    )


_POOL_PLACES = {"gpus": 0, "depreciation_years": 3, "depreciation_hours": 0, "power_kw_per_gpu": 4,
                "pue": 3, "prefill_weight": 3, "decode_weight": 3, "capacity_work_per_hour": 3}


def _pool(ld: _Loader, name: str, node: yaml.Node) -> GpuPool:
    what = f"gpu_pools.{name}"
    keys = ld.mapping(node, what, _POOL_KEYS)
    positive = {"gpus", "depreciation_years", "depreciation_hours", "capacity_work_per_hour"}

    def values(items: dict[str, tuple[yaml.Node, yaml.Node]]) -> dict[str, Decimal]:
        return {k: ld.number(vn, k, _POOL_PLACES.get(k, 6), positive=k in positive)
                for k, (_, vn) in items.items() if k in _POOL_COST_KEYS}

    current = values(keys)
    start = ld.since(keys["from"][1]) if "from" in keys else 0
    rates = [_pool_rate(ld, what, start, current, node)]
    if "changes" in keys:
        for since, item, from_node in ld.changes(keys["changes"][1], what):
            if since <= start:
                raise ld.fail(from_node, f"{what}: a change must come after the pool's own `from`")
            ck = ld.mapping(item, f"{what}.changes[]", frozenset((*_POOL_COST_KEYS, "from")))
            changed = values(ck)
            if "rent_per_gpu_hour" in changed:
                for k in ("purchase_price_per_gpu", "depreciation_years", "depreciation_hours"):
                    current.pop(k, None)
            if "purchase_price_per_gpu" in changed:
                current.pop("rent_per_gpu_hour", None)
            current.update(changed)
            rates.append(_pool_rate(ld, what, since, current, item))
    return GpuPool(name, tuple(rates), "from" in keys, node.start_mark.line + 1)


def parse_pricing(text: str, path: str = "<pricing>") -> PriceBook:
    ld = _Loader(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context_mark", None)
        if context is not None and (mark is None or context.line != mark.line):
            problem += f" ({getattr(exc, 'context', None) or 'what was'} opened on line {context.line + 1})"
        raise PricingError(f"{path}{line}: not valid YAML: {problem}") from None
    if root is None:
        raise PricingError(f"{path}: empty pricing file")
    top = ld.mapping(root, "the pricing file", _TOP_KEYS)
    currency = "USD"
    if "currency" in top:
        cnode = top["currency"][1]
        if not isinstance(cnode, yaml.ScalarNode) or str(cnode.value) != "USD":
            raise ld.fail(cnode, f"currency: only USD is supported, got {_show(cnode)}")
    pools: dict[str, GpuPool] = {}
    if "gpu_pools" in top:
        for name, (_, pnode) in ld.mapping(top["gpu_pools"][1], "gpu_pools").items():
            pools[name] = _pool(ld, name, pnode)
    if "models" not in top:
        raise ld.fail(root, "the pricing file needs a `models:` mapping")
    models = tuple(_model_entry(ld, pattern, mnode, pools)
                   for pattern, (_, mnode) in ld.mapping(top["models"][1], "models").items())
    return PriceBook(path, models, pools, currency)


def load_pricing(path: str | Path) -> PriceBook:
    """Read and validate a pricing file; raises PricingError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PricingError(f"{path}: cannot read the pricing file: {exc}") from None
    return parse_pricing(text, str(path))


def rate_rows(book: PriceBook) -> list[dict[str, Any]]:
    """The pools' rates as rows of ClickHouse's gpu_pool_rates table (what reports join)."""
    return [{"pool": p.name, "since_ns": r.since_ns, "hour_cost_micros": r.hour_cost_micros,
             "capacity_work_milli": r.capacity_work_milli, "explicit_start": p.explicit_start}
            for p in book.pools.values() for r in p.rates]
