"""Governance metrics: observable instruments reading the governor's counters at collection
time (nothing on the request path). Names are public: rename nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Meter, Observation

if TYPE_CHECKING:
    from extproc.governance.runtime import Governance

BUDGET_SPEND = "extproc.budget.spend"  # tokens or USD (attribute unit), used + reserved
BUDGET_LIMIT = "extproc.budget.limit"
BUDGET_REMAINING = "extproc.budget.remaining"
REFUSED = "extproc.governance.refused"  # {request}, attribute reason
LABELS_OVERRIDDEN = "extproc.governance.labels_overridden"  # {request}, attribute label
REDIS_ERRORS = "extproc.governance.redis_errors"
REDIS_FALLBACKS = "extproc.governance.redis_fallbacks"  # decisions taken on local state
POLICY_RELOADS = "extproc.governance.policy_reloads"
POLICY_RELOAD_ERRORS = "extproc.governance.policy_reload_errors"
ALERTS = "extproc.governance.budget_alerts"
WEBHOOK_ERRORS = "extproc.governance.webhook_errors"

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def register(meter: Meter, governance: Governance) -> None:
    gov = governance.governor
    ledger = governance.ledger

    def one(fn: Callable[[], int]) -> Callback:
        return lambda _o: [Observation(int(fn()))]

    def by(tally_of: Callable[[], dict[str, int]], attr: str) -> Callback:
        return lambda _o: [Observation(v, {attr: k}) for k, v in dict(tally_of()).items()]

    def budgets(which: str) -> Callback:
        def cb(_o: CallbackOptions) -> list[Observation]:
            out = []
            for b, unit, key, limit, _start, _end in gov.budget_keys():
                spent = gov.known.get(key, 0)
                value = {"spend": spent, "limit": limit, "remaining": max(0, limit - spent)}[which]
                attrs = {"scope": b.scope.name, "period": b.period, "unit": unit, "hard": str(b.hard).lower()}
                out.append(Observation(value / 1e6 if unit == "usd" else value, attrs))
            return out
        return cb

    for name, which, desc in ((BUDGET_SPEND, "spend", "Budget used (and reserved by requests in flight)."),
                              (BUDGET_LIMIT, "limit", "Budget limit for the period."),
                              (BUDGET_REMAINING, "remaining", "Budget left in the period.")):
        meter.create_observable_gauge(name, [budgets(which)], unit="1", description=desc)
    counters = (
        (REFUSED, "{request}", "Requests refused (401 / 429 / 503), by reason.", by(lambda: gov.stats.refused, "reason")),
        (LABELS_OVERRIDDEN, "{request}", "Client label headers ignored because the key's labels win.",
         by(lambda: gov.stats.labels_overridden, "label")),
        (REDIS_ERRORS, "{error}", "Redis calls that failed.", one(lambda: getattr(ledger, "errors", 0))),
        (REDIS_FALLBACKS, "{decision}", "Decisions taken on this process's local state, Redis down.",
         one(lambda: getattr(ledger, "fallbacks", 0))),
        (POLICY_RELOADS, "{reload}", "Policy file reloads installed.", one(lambda: governance.watcher.reloads)),
        (POLICY_RELOAD_ERRORS, "{reload}", "Policy reloads refused (the last good policy stays).",
         one(lambda: governance.watcher.errors)),
        (ALERTS, "{alert}", "Budget thresholds (50/80/100 %) crossed.", one(lambda: gov.stats.alerts)),
        (WEBHOOK_ERRORS, "{alert}", "Budget webhooks that failed.", one(lambda: governance.webhooks.errors)),
    )
    for name, unit, desc, cb in counters:
        meter.create_observable_counter(name, [cb], unit=unit, description=desc)
