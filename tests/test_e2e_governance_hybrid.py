"""End to end in hybrid mode (request synchronous, response observed) with the budget state in a
real redis-server: the openai SDK through the real Envoy; key attribution, 401 and 429 answered
by the request filter with exactly one event each; then Redis is stopped mid-test and the stated
policy (fail open on local state) holds: requests are served, refused past the budget, metered,
and nothing crashes."""

from __future__ import annotations

import urllib.request

import openai
import pytest

from extproc.governance.policy import hash_key
from tests.redis_server import RedisProcess
from tests.stack import metered_stack, sidecar_settings, start_sim, wait_events

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KEY, KEY_CAPPED = "sk-hybrid-search", "sk-hybrid-capped"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-gov-hybrid")
    redis = RedisProcess(work).start()
    policy = work / "policy.yaml"
    policy.write_text(
        f'keys:\n  - sha256: "{hash_key(KEY)}"\n    team: search\n'
        f'  - sha256: "{hash_key(KEY_CAPPED)}"\n    team: capped\n'
        "budgets:\n  - team: capped\n    limit_tokens: 150\n    hard: true\n")
    sim, sim_url = start_sim(work, "--reject-any-key")  # no upstream key: client keys removed
    settings = sidecar_settings(work, policy={"file": str(policy), "redis_url": redis.url,
                                              "redis_timeout_ms": 2000, "default_max_tokens": 64})

    class Stack:
        pass

    with metered_stack(work, sim_url, settings, mode="hybrid") as (url, rec, sc):
        s = Stack()
        s.url, s.rec, s.sidecar, s.redis = url, rec, sc, redis
        yield s
    sim.stop()
    redis.stop()


def _chat(stack, key: str, user: str, max_tokens: int = 8, **headers: str):  # noqa: ANN202
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0,
                           default_headers={"x-user": user, **headers})
    return client.chat.completions.create(model=MODEL, max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": "Hello."}])


def test_hybrid_attributes_refuses_and_emits_one_event_per_request(stack):
    assert _chat(stack, KEY, "h-spoof", **{"x-team": "capped"}).usage.total_tokens > 0
    assert wait_events(stack.rec, "h-spoof", 1)[0].labels["team"] == "search"
    with pytest.raises(openai.AuthenticationError):
        _chat(stack, "sk-nope", "h-unknown")
    assert wait_events(stack.rec, "h-unknown", 1)[0].error == "unknown_key"
    served = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            _chat(stack, KEY_CAPPED, "h-capped", max_tokens=30)
            served += 1
    assert info.value.code == "budget_exceeded" and 1 <= served < 20
    events = wait_events(stack.rec, "h-capped", served + 1)
    assert sum(e.total_tokens for e in events) <= 150 and events[-1].error == "budget_exceeded"


def test_redis_stopped_mid_test_fail_open_serves_meters_and_enforces_locally(stack):
    """The capped team's budget is spent in Redis; with Redis gone this sidecar decides on its own
    counts (fail open, README): it serves the team again until its local count is spent."""
    stack.redis.stop()
    assert _chat(stack, KEY, "h-down").usage.total_tokens > 0  # no budget: not held up at all
    served = 0
    with pytest.raises(openai.RateLimitError):
        for _ in range(20):
            _chat(stack, KEY_CAPPED, "h-capped-down", max_tokens=30)
            served += 1
    assert served >= 1
    events = wait_events(stack.rec, "h-capped-down", served + 1)
    assert all(e.total_tokens > 0 and not e.error for e in events[:-1])  # metering continues
    assert sum(e.total_tokens for e in events) <= 150 and events[-1].error == "budget_exceeded"
    gov = stack.sidecar.sidecar.governance
    assert gov.ledger.errors >= served and gov.ledger.fallbacks >= served and not gov.ledger.available
    admin = f"http://127.0.0.1:{stack.sidecar.sidecar.admin_port}"
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "extproc_governance_redis_errors" in text and "extproc_budget_remaining" in text
    assert 'reason="budget_exceeded"' in text
