"""Wiring for the sidecar: settings -> governor with its ledger (local or Redis), the policy
watcher, the webhook sender and the spend restored from storage at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from extproc.config import ConfigError, Settings
from extproc.governance.alerts import WebhookSender
from extproc.governance.governor import Governor, PriceTable
from extproc.governance.ledger import COUNTER_GRACE_S, LocalLedger
from extproc.governance.policy import Policy, PolicyError
from extproc.governance.reload import PolicyWatcher
from extproc.governance.spend_sql import spend_query

if TYPE_CHECKING:
    from extproc.governance.redis_ledger import RedisLedger
    from extproc.storage.store import Storage

log = logging.getLogger(__name__)


class Governance:
    def __init__(self, settings: Settings, prices: PriceTable | None = None) -> None:
        p = settings.policy
        self.settings = settings
        self.watcher = PolicyWatcher(p.file, self._install)
        try:
            policy = self.watcher.load_initial()
        except PolicyError as exc:
            raise ConfigError(f"policy.file: {exc}") from None
        self.webhooks = WebhookSender(p.webhook_url)
        if p.redis_url:
            from extproc.governance.redis_ledger import RedisLedger

            ledger: LocalLedger | RedisLedger = RedisLedger(p.redis_url, prefix=p.redis_prefix, on_failure=p.redis_on_failure,
                                      timeout_s=p.redis_timeout_ms / 1000)
        else:
            ledger = LocalLedger()
        self.ledger = ledger
        self.governor = Governor(policy, ledger, prices=prices, default_max_tokens=p.default_max_tokens,
                                 upstream_key=p.upstream_key, alert=self.webhooks,
                                 stop_streams=p.stop_streams_over_budget)
        self._task: asyncio.Task[None] | None = None

    def _install(self, policy: Policy) -> None:
        self.governor.policy = policy
        self.governor.stats.reloads += 1

    async def start(self, storage: Storage | None = None) -> None:
        self.webhooks.start()
        if storage is not None:
            await self.restore(storage)
        interval = self.settings.policy.reload_interval_ms / 1000
        self._task = asyncio.create_task(self.watcher.run(interval), name="extproc-policy-watch")
        pol = self.governor.policy
        log.info("policy %s: %d keys, %d budgets (%d hard), %d rate limits, require_key %s, state %s",
                 self.watcher.path, len(pol.keys), len(pol.budgets), sum(b.hard for b in pol.budgets),
                 len(pol.rate_limits), pol.require_key,
                 "in Redis (shared by replicas)" if self.ledger.is_async else "in this process only")

    async def restore(self, storage: Storage) -> None:
        """The period's spend so far (tokens, and list cost for USD budgets), from ClickHouse: a
        restarted sidecar (or a Redis that lost its data) does not start the month from zero.
        Never lowers a live counter."""
        gov = self.governor
        for b, unit, key, _limit, start, end in gov.budget_keys():
            sql, params = spend_query(b, start, unit)

            def spent_rows(client: Any, sql: str = sql, params: dict[str, Any] = params) -> list[Any]:
                rows: list[Any] = client.query(sql, parameters=params).result_rows
                return rows

            try:
                rows = await storage.run(spent_rows)
            except Exception as exc:
                log.warning("restoring spend of budget %s (line %d) failed: %s", b.scope.name, b.line, exc)
                continue
            spent = int(rows[0][0] or 0) if rows else 0
            if spent:
                seed = self.ledger.seed(key, spent, end + COUNTER_GRACE_S)
                if asyncio.iscoroutine(seed):
                    await seed
                log.info("budget %s: %s spent this %s so far (restored from storage)", b.scope.name,
                         f"{spent} tokens" if unit == "tokens" else f"${spent / 1e6:.6f}", b.period)

    @property
    def reload_errors(self) -> int:
        return self.watcher.errors

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.governor.drain()
        await self.webhooks.stop()
        close = getattr(self.ledger, "close", None)
        if close is not None:
            await close()

    async def report(self) -> dict[str, Any]:
        """GET /v1/budgets: spend and remaining per budget scope this period."""
        rows = []
        for sp in await self.governor.spend():
            b = sp.budget
            scale = 1e6 if sp.unit == "usd" else 1
            rows.append({"scope": b.scope.name, **{f: getattr(b.scope, f) for f in ("team", "feature", "key", "user")
                                                    if getattr(b.scope, f)},
                         "period": b.period, "period_start": sp.period_start, "period_end": sp.period_end,
                         "unit": sp.unit, "hard": b.hard, "spent": sp.spent / scale, "limit": sp.limit / scale,
                         "remaining": max(0, sp.limit - sp.spent) / scale,
                         "used_pct": round(100 * sp.spent / sp.limit, 2) if sp.limit else None,
                         "policy_line": b.line})
        st = self.governor.stats
        return {
            "policy": str(self.watcher.path), "require_key": self.governor.policy.require_key,
            "keys": len(self.governor.policy.keys), "state": "redis" if self.ledger.is_async else "local",
            "redis_available": getattr(self.ledger, "available", None),
            "last_reload_error": self.watcher.last_error or None,
            "refused": dict(st.refused), "budgets": rows,
        }
