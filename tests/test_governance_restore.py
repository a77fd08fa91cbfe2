"""After a restart the period's spend so far comes back from ClickHouse (real chDB): team and
team+feature budgets from the hourly rollup, user and key budgets from the raw events; events
of earlier periods and of other scopes do not count, and a live counter is never lowered."""

from __future__ import annotations

import time

from extproc.governance.policy import hash_key
from extproc.governance.runtime import Governance
from tests.storage_helpers import chdb_storage, make_event, settings_for

POLICY = f"""keys:
  - sha256: "{hash_key('sk-r')}"
    team: search
    name: rkey
budgets:
  - team: search
    period: month
    limit_tokens: 1000000
    hard: true
  - team: search
    feature: feature-1
    period: month
    limit_tokens: 1000000
  - user: alice
    period: day
    limit_tokens: 1000000
  - key: rkey
    period: month
    limit_tokens: 1000000
"""


async def test_spend_so_far_is_restored_from_storage(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = settings_for(tmp_path, policy={"file": str(policy)})
    now = time.time_ns()
    day = 86_400 * 10**9
    events = [
        make_event(0, team="search", start_time_unix_nano=now - 1000, total_tokens=100),
        make_event(1, team="search", start_time_unix_nano=now - 2000, total_tokens=50),  # feature-1
        make_event(2, team="ads", start_time_unix_nano=now - 3000, total_tokens=7),
        make_event(3, team="search", start_time_unix_nano=now - 40 * day, total_tokens=1000),  # last period
    ]
    events[0].labels["user"] = "alice"
    events[1].labels["key"] = "rkey"
    events[2].labels["user"] = "alice"
    async with chdb_storage(settings) as storage:
        sink = storage.sink()
        await sink.start()
        for e in events:
            sink.emit(e)
        assert await sink.force_flush(30)
        gov = Governance(settings)
        keys = {(b.scope.name, u): k for b, u, k, *_ in gov.governor.budget_keys()}
        gov.ledger.seed(keys[("key=rkey", "tokens")], 500, 2**40)  # live state already higher
        await gov.restore(storage)
        await sink.shutdown(10)
    v = gov.ledger.value
    assert v(keys[("team=search", "tokens")]) == 150
    assert v(keys[("team=search,feature=feature-1", "tokens")]) == 50
    assert v(keys[("user=alice", "tokens")]) == 107
    assert v(keys[("key=rkey", "tokens")]) == 500


USD_POLICY = """budgets:
  - team: search
    period: month
    limit_usd: 500
    hard: true
  - user: alice
    period: day
    limit_usd: 10
"""


async def test_usd_spend_so_far_is_restored_from_the_stamped_list_cost(tmp_path):
    """USD budgets come back as the sum of the events' list cost (integer micro-USD, as the
    pricing stage stamped it); unpriced events carry 0, as they counted $0 at admission."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(USD_POLICY)
    settings = settings_for(tmp_path, policy={"file": str(policy)})
    now = time.time_ns()
    events = [
        make_event(0, team="search", start_time_unix_nano=now - 1000, list_cost_micros=1_250_001,
                   price_status="priced"),
        make_event(1, team="search", start_time_unix_nano=now - 2000, list_cost_micros=3, price_status="priced"),
        make_event(2, team="search", start_time_unix_nano=now - 3000, price_status="unpriced"),
        make_event(3, team="ads", start_time_unix_nano=now - 4000, list_cost_micros=7_000_000,
                   price_status="priced"),
    ]
    events[1].labels["user"] = "alice"
    events[3].labels["user"] = "alice"
    async with chdb_storage(settings) as storage:
        sink = storage.sink()
        await sink.start()
        for e in events:
            sink.emit(e)
        assert await sink.force_flush(30)
        gov = Governance(settings)
        keys = {(b.scope.name, u): k for b, u, k, *_ in gov.governor.budget_keys()}
        await gov.restore(storage)
        await sink.shutdown(10)
    assert gov.ledger.value(keys[("team=search", "usd")]) == 1_250_004
    assert gov.ledger.value(keys[("user=alice", "usd")]) == 7_000_003
