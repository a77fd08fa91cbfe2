"""Admission and settlement: who a request belongs to (its virtual key), whether its budgets and
rate limits have room for its worst case, and what it really used once it ended.

Pure decisions over a ledger: the local ledger answers at once, the Redis ledger through an
awaitable; callers handle both (`admit` returns one or the other).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from extproc.events import UsageEvent
from extproc.governance.ledger import COUNTER_GRACE_S, Bucket, Counter, LocalLedger, Outcome
from extproc.governance.periods import period_bounds
from extproc.governance.policy import Budget, KeyEntry, Policy, hash_key, key_id

if TYPE_CHECKING:  # redis is imported only where the Redis ledger is used
    from extproc.governance.redis_ledger import RedisLedger

log = logging.getLogger(__name__)

KEY_HEADERS = ("authorization", "x-api-key")
THRESHOLDS = (50, 80, 100)


class PriceTable(Protocol):
    """What budgets in money need of a price book (integer micro-USD; None: unpriced)."""

    def list_cost_micros(self, model: str, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                         reasoning_tokens: int, at_unix_nano: int) -> int | None: ...


@dataclass(slots=True)
class GovernanceStats:
    refused: Tally[str] = field(default_factory=Tally)  # by reason
    admitted: int = 0
    settled: int = 0
    # client label headers that disagreed with the key's labels, by label
    labels_overridden: Tally[str] = field(default_factory=Tally)
    unpriced: int = 0  # USD budgets: a model without a price counts 0 USD
    alerts: int = 0
    webhook_errors: int = 0
    reloads: int = 0
    reload_errors: int = 0
    settle_errors: int = 0


@dataclass(slots=True)
class Identity:
    key: KeyEntry | None

    @property
    def key_names(self) -> tuple[str, ...]:
        if self.key is None:
            return ()
        return (self.key.name, key_id(self.key.sha256)) if self.key.name else (key_id(self.key.sha256),)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # recorded as the event's error: why this request was not served
    message: str
    error_type: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Admission:
    """What was reserved for one request; settled once when it ends."""

    counters: list[Counter]
    units: list[str]  # per counter: "tokens" or "usd"
    budgets: list[Budget]  # per counter
    buckets: list[Bucket]
    bucket_units: list[str]  # per bucket: "requests" or "tokens"
    reserved_tokens: int
    reserved_micros: int
    model: str
    settled: bool = False
    # output tokens (all choices) inside the reservation: a stream past it may pass a hard limit
    output_reserved: int = 0


@dataclass(slots=True)
class Spend:
    """One budget's state for reports."""

    budget: Budget
    unit: str
    spent: int
    limit: int
    period_start: int
    period_end: int


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* spelling: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s"


def bearer_token(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()


class Governor:
    def __init__(self, policy: Policy, ledger: LocalLedger | RedisLedger | None = None, *, prices: PriceTable | None = None,
                 default_max_tokens: int = 4096, upstream_key: str = "",
                 alert: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time, stop_streams: bool = False) -> None:
        self.policy = policy
        self.ledger: LocalLedger | RedisLedger = ledger if ledger is not None else LocalLedger(clock)
        self.prices = prices
        self.default_max_tokens = default_max_tokens
        self.upstream_key = upstream_key
        # end a stream with an SSE error event once its output passes a hard budget
        self.stop_streams = stop_streams
        self.stats = GovernanceStats()
        self._alert = alert
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        # last value seen of each budget counter (for metrics and reports without a round trip)
        self.known: dict[str, int] = {}
        # (policy, time the next period starts, rows by id(budget)): see budget_keys
        self._compiled: tuple[Policy, float, dict[int, list[Any]]] | None = None

    # -- who ---------------------------------------------------------------------------------

    def identify(self, headers: dict[str, str]) -> Identity | Refusal:
        policy = self.policy
        token = bearer_token(headers)
        if token:
            entry = policy.keys.get(hash_key(token))
            if entry is not None:
                return Identity(entry)
            if policy.keys or policy.require_key:
                if self.upstream_key and token == self.upstream_key:
                    return self._refuse(401, "unknown_key", "The upstream key cannot be used as a client key.",
                                        "invalid_request_error", "invalid_api_key")
                return self._refuse(401, "unknown_key", "Incorrect API key provided: this key is not known "
                                    "to the gateway.", "invalid_request_error", "invalid_api_key")
        elif policy.require_key:
            return self._refuse(401, "missing_key", "You didn't provide an API key: send it as "
                                "'Authorization: Bearer <key>'.", "invalid_request_error", "missing_api_key")
        return Identity(None)

    def apply_labels(self, identity: Identity, labels: MutableMapping[str, str], unattributed: str) -> None:
        """The key's labels win over the client's headers; a header that disagreed is counted."""
        if identity.key is None:
            return
        for name, value in identity.key.labels.items():
            sent = labels.get(name)
            if sent is not None and sent != unattributed and sent != value:
                self.stats.labels_overridden[name] += 1
            labels[name] = value
        labels["key"] = identity.key.id

    def upstream_headers(self) -> tuple[dict[str, str], tuple[str, ...]]:
        """(headers to set, headers to remove): the client's key never reaches the upstream."""
        if self.upstream_key:
            return {"authorization": f"Bearer {self.upstream_key}"}, ("x-api-key",)
        return {}, KEY_HEADERS

    # -- admission ---------------------------------------------------------------------------

    def estimate_tokens(self, prompt_tokens: int, max_tokens: int | None, n: int) -> int:
        """Worst case: the prompt plus every choice's output cap (None: the request sets none,
        so the configured default; 0: an endpoint that generates nothing)."""
        out = self.default_max_tokens if max_tokens is None else max(0, max_tokens)
        return prompt_tokens + out * max(1, n)

    def _cost(self, model: str, prompt: int, cached: int, completion: int, reasoning: int) -> int:
        if self.prices is None:
            return 0
        micros = self.prices.list_cost_micros(model, prompt_tokens=prompt, cached_tokens=cached,
                                              completion_tokens=completion, reasoning_tokens=reasoning,
                                              at_unix_nano=time.time_ns())
        if micros is None:
            self.stats.unpriced += 1
            return 0
        return micros

    def plan(self, identity: Identity, labels: Mapping[str, str], model: str,
             prompt_tokens: int | Callable[[], int], max_tokens: int | None, n: int = 1) -> Admission:
        """What to reserve. `prompt_tokens` may be a function: the prompt is counted only when a
        budget or limit applies to this request."""
        names = identity.key_names
        policy = self.policy
        matched = [b for b in policy.budgets if b.scope.matches(labels, names)]
        limits = [r for r in policy.rate_limits if r.scope.matches(labels, names)]
        if not matched and not limits:
            return Admission([], [], [], [], [], 0, 0, model)
        prompt = prompt_tokens() if callable(prompt_tokens) else prompt_tokens
        tokens = self.estimate_tokens(prompt, max_tokens, n)
        worst_out = tokens - prompt
        needs_usd = any(b.limit_micros is not None for b in matched)
        micros = self._cost(model, prompt, 0, worst_out, 0) if needs_usd else 0
        counters: list[Counter] = []
        units: list[str] = []
        budgets: list[Budget] = []
        for b, unit, key, limit, _start, end in self.budget_keys(matched):
            counters.append(Counter(key, limit, micros if unit == "usd" else tokens, b.hard, end + COUNTER_GRACE_S))
            units.append(unit)
            budgets.append(b)
        buckets: list[Bucket] = []
        bucket_units: list[str] = []
        for r in limits:
            if r.requests_per_minute is not None:
                buckets.append(Bucket(f"r:{r.scope.name}:requests", r.requests_per_minute, 1))
                bucket_units.append("requests")
            if r.tokens_per_minute is not None:
                buckets.append(Bucket(f"r:{r.scope.name}:tokens", r.tokens_per_minute, tokens))
                bucket_units.append("tokens")
        return Admission(counters, units, budgets, buckets, bucket_units, tokens, micros, model,
                         output_reserved=worst_out)

    def admit(self, adm: Admission) -> Admission | Refusal | Awaitable[Admission | Refusal]:
        if not adm.counters and not adm.buckets:
            self.stats.admitted += 1
            return adm
        ledger = self.ledger
        if ledger.is_async is True:
            return self._admit_async(ledger, adm)
        return self._decide(adm, ledger.reserve(adm.counters, adm.buckets))

    async def _admit_async(self, ledger: RedisLedger, adm: Admission) -> Admission | Refusal:
        return self._decide(adm, await ledger.reserve(adm.counters, adm.buckets))

    def _decide(self, adm: Admission, out: Outcome) -> Admission | Refusal:
        for c, total in zip(adm.counters, out.totals, strict=False):
            self.known[c.key] = total if out.ok else max(self.known.get(c.key, 0), total)
        if out.ok:
            self.stats.admitted += 1
            return adm
        if out.refused == -2:
            return self._refuse(503, "policy_unavailable", "The gateway cannot check budgets right now; "
                                "retry shortly.", "server_error", "budget_store_unavailable",
                                {"retry-after": "1"})
        retry = max(1, math.ceil(out.retry_after_s))
        n = len(adm.counters)
        if out.refused < n:
            b, unit = adm.budgets[out.refused], adm.units[out.refused]
            limit = f"${b.limit_usd:g}" if unit == "usd" else f"{b.limit_tokens} tokens"
            spent = out.totals[out.refused] if out.refused < len(out.totals) else 0
            return self._refuse(429, "budget_exceeded",
                                f"Budget exceeded for {b.scope.name}: {limit} per {b.period} "
                                f"({_fmt(spent, unit)} used or reserved; this request may need "
                                f"{_fmt(adm.counters[out.refused].amount, unit)}). It resets in {retry} s.",
                                "insufficient_quota", "budget_exceeded", {"retry-after": str(retry)})
        j = out.refused - n
        bucket, unit = adm.buckets[j], adm.bucket_units[j]
        remaining = int(out.remaining[0]) if out.remaining else 0
        headers = {"retry-after": str(retry), f"x-ratelimit-limit-{unit}": str(bucket.capacity),
                   f"x-ratelimit-remaining-{unit}": str(max(0, remaining)),
                   f"x-ratelimit-reset-{unit}": _duration(out.retry_after_s)}
        scope = bucket.key.split(":")[1]
        return self._refuse(429, "rate_limited", f"Rate limit reached for {scope} on {unit} per minute: "
                            f"limit {bucket.capacity}, requested {bucket.amount}. Please try again in "
                            f"{_duration(out.retry_after_s)}.", unit, "rate_limit_exceeded", headers)

    def _refuse(self, status: int, reason: str, message: str, error_type: str, code: str,
                headers: dict[str, str] | None = None) -> Refusal:
        return Refusal(status, reason, message, error_type, code, headers or {})

    def stream_over_budget(self, adm: Admission, live_output: int) -> Budget | None:
        """A hard token budget this stream's output has passed, counting what it generated
        beyond its reservation against the budget's last known total (no ledger round trip:
        checked per chunk, only once the output is past what was reserved)."""
        excess = live_output - adm.output_reserved
        if excess <= 0 or not self.stop_streams:
            return None
        for c, unit, b in zip(adm.counters, adm.units, adm.budgets, strict=True):
            if c.hard and unit == "tokens" and self.known.get(c.key, c.amount) + excess > c.limit:
                return b
        return None

    # -- settlement ---------------------------------------------------------------------------

    def settle(self, adm: Admission, event: UsageEvent) -> None:
        """The request ended (served, failed or abandoned): charge what it used, release the rest.
        Called once per admission from the event path; never raises."""
        if adm.settled:
            return
        adm.settled = True
        self.stats.settled += 1
        if not adm.counters and not adm.buckets:
            return
        used = event.total_tokens or event.prompt_tokens + event.completion_tokens
        micros = 0
        if "usd" in adm.units:
            micros = self._cost(adm.model or event.request_model, event.prompt_tokens, event.cached_tokens,
                                event.completion_tokens, event.reasoning_tokens) if used else 0
        deltas = [Counter(c.key, c.limit, (micros if u == "usd" else used) - c.amount, c.hard, c.expires_at)
                  for c, u in zip(adm.counters, adm.units, strict=True)]
        buckets = [Bucket(b.key, b.capacity, used - b.amount)
                   for b, u in zip(adm.buckets, adm.bucket_units, strict=True) if u == "tokens"]
        ledger = self.ledger
        if ledger.is_async is True:
            task = asyncio.ensure_future(self._settle_async(ledger, adm, deltas, buckets))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            totals = ledger.adjust(deltas, buckets)
        except Exception:
            self.stats.settle_errors += 1
            log.exception("settling a reservation")
            return
        self._thresholds(ledger, adm, totals)

    async def _settle_async(self, ledger: RedisLedger, adm: Admission, deltas: list[Counter],
                            buckets: list[Bucket]) -> None:
        try:
            totals = await ledger.adjust(deltas, buckets)
            await self._thresholds_async(ledger, adm, totals)
        except Exception:
            self.stats.settle_errors += 1
            log.exception("settling a reservation")

    def _crossed(self, adm: Admission, totals: list[int]) -> list[tuple[int, int, str]]:
        for c, total in zip(adm.counters, totals, strict=True):
            self.known[c.key] = total
        out = []
        for i, (c, total) in enumerate(zip(adm.counters, totals, strict=True)):
            if c.limit <= 0:
                continue
            for pct in THRESHOLDS:
                if total * 100 >= c.limit * pct:
                    out.append((i, pct, f"a:{c.key}:{pct}"))
        return out

    def _thresholds(self, ledger: LocalLedger, adm: Admission, totals: list[int]) -> None:
        for i, pct, key in self._crossed(adm, totals):
            if ledger.claim_alert(key, adm.counters[i].expires_at):
                self._fire(adm, i, pct, totals[i])

    async def _thresholds_async(self, ledger: RedisLedger, adm: Admission, totals: list[int]) -> None:
        for i, pct, key in self._crossed(adm, totals):
            if await ledger.claim_alert(key, adm.counters[i].expires_at):
                self._fire(adm, i, pct, totals[i])

    def _fire(self, adm: Admission, i: int, pct: int, total: int) -> None:
        b, unit, c = adm.budgets[i], adm.units[i], adm.counters[i]
        self.stats.alerts += 1
        log.warning("budget %s (%s per %s, %s) reached %d%%: %s of %s", b.scope.name, unit, b.period,
                    "hard" if b.hard else "soft", pct, _fmt(total, unit), _fmt(c.limit, unit))
        if self._alert is not None:
            start, end = period_bounds(b.period, self._clock())
            self._alert({"scope": b.scope.name, "period": b.period, "period_start": start, "period_end": end,
                         "unit": unit, "threshold_pct": pct, "spent": total if unit == "tokens" else total / 1e6,
                         "limit": c.limit if unit == "tokens" else c.limit / 1e6, "hard": b.hard,
                         "webhook": b.webhook, "policy_line": b.line})

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # -- reports ------------------------------------------------------------------------------

    def budget_keys(self, only: list[Budget] | None = None) -> list[tuple[Budget, str, str, int, int, int]]:
        """(budget, unit, ledger key, limit, period start, period end) for this period, per
        budget (of `only`, else all), computed once per policy and period."""
        now = self._clock()
        cached = self._compiled
        if cached is None or cached[0] is not self.policy or now >= cached[1]:
            by_budget: dict[int, list[tuple[Budget, str, str, int, int, int]]] = {}
            next_change = float("inf")
            for b in self.policy.budgets:
                start, end = period_bounds(b.period, now)
                next_change = min(next_change, end)
                base = f"b:{b.scope.name}:{b.period}:{start}"
                rows = by_budget[id(b)] = []
                if b.limit_tokens is not None:
                    rows.append((b, "tokens", base + ":tokens", b.limit_tokens, start, end))
                if b.limit_micros is not None:
                    rows.append((b, "usd", base + ":usd", b.limit_micros, start, end))
            cached = self._compiled = (self.policy, next_change, by_budget)
        table = cached[2]
        return [row for b in (self.policy.budgets if only is None else only) for row in table[id(b)]]

    async def spend(self) -> list[Spend]:
        rows = self.budget_keys()
        keys = [r[2] for r in rows]
        ledger = self.ledger
        if ledger.is_async is True:
            values = await ledger.values(keys)
        else:
            values = [ledger.value(k) for k in keys]
        self.known.update(zip(keys, values, strict=True))
        return [Spend(b, unit, v, limit, start, end) for (b, unit, _, limit, start, end), v in zip(rows, values,
                                                                                                 strict=True)]


def _fmt(amount: int, unit: str) -> str:
    return f"${amount / 1e6:.4f}" if unit == "usd" else f"{amount} tokens"

