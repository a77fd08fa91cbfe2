"""Keys, budgets and rate limits on the stream loop with the in-process ledger: who a request
belongs to, 401 / 429 answers as OpenAI shapes them, worst-case reservation and settlement, soft
alerts once per threshold, and the overshoot of 50 concurrent requests."""

from __future__ import annotations

import asyncio

import pytest

from extproc.governance.governor import Governor
from extproc.governance.ledger import LocalLedger
from extproc.governance.policy import parse_policy
from tests import ext_proc_msgs as m
from tests.governance_helpers import (
    KEY_ADS,
    KEY_SEARCH,
    FakePrices,
    chat_body,
    governor,
    immediate,
    policy_text,
    request,
    service_with,
)


def _mutation(resp):
    hm = resp.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in hm.set_headers}, list(hm.remove_headers)


async def test_a_known_key_wins_over_spoofed_label_headers_and_never_goes_upstream():
    gov = governor(policy_text())
    service, rec = service_with(gov)
    out = await request(service, KEY_SEARCH, chat_body(), x_team="ads", x_feature="ranking", x_user="u1")
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "response_body"]
    sets, removed = _mutation(out[0])
    assert sets == {} and set(removed) == {"authorization", "x-api-key"}
    ev = rec.events[0]
    assert (ev.labels["team"], ev.labels["feature"], ev.labels["user"]) == ("search", "ranking", "u1")
    assert ev.labels["key"] == gov.policy.keys[next(iter(gov.policy.keys))].id
    assert gov.stats.labels_overridden == {"team": 1}  # feature agreed, user is not the key's
    # x-api-key (the Anthropic route's header) identifies the key as well
    await request(service, KEY_ADS, chat_body(), header="x-api-key", x_user="u2")
    assert rec.events[1].labels["team"] == "ads" and rec.events[1].labels["key"] == "ads-bot"


async def test_an_upstream_key_replaces_the_virtual_key():
    gov = governor(policy_text(), upstream_key="sk-vllm")
    service, _ = service_with(gov)
    out = await request(service, KEY_SEARCH, chat_body())
    sets, removed = _mutation(out[0])
    assert sets == {"authorization": "Bearer sk-vllm"} and removed == ["x-api-key"]


@pytest.mark.parametrize(("key", "require", "code"), [("sk-nobody", False, "invalid_api_key"),
                                                      (None, True, "missing_api_key")])
async def test_unknown_or_missing_key_gets_401_and_an_event_saying_why(key, require, code):
    gov = governor(policy_text(require_key=require))
    service, rec = service_with(gov)
    out = await request(service, key, chat_body(), x_user="u")
    status, hdrs, body = immediate(out[0])
    assert status == 401 and body["error"]["code"] == code and hdrs["content-type"] == "application/json"
    ev = rec.events[0]
    assert ev.http_status == 401 and ev.error in ("unknown_key", "missing_key") and not ev.client_aborted
    assert ev.total_tokens == 0 and gov.stats.refused == {ev.error: 1}


async def test_no_key_without_require_key_passes_with_header_labels():
    service, rec = service_with(governor(policy_text()))
    out = await request(service, None, chat_body(), x_team="web")
    assert out[0].WhichOneof("response") == "request_headers"
    assert rec.events[0].labels["team"] == "web"


async def test_hard_token_budget_reserves_the_worst_case_and_settles_to_usage():
    gov = governor(policy_text("  - team: search\n    period: month\n    limit_tokens: 100\n    hard: true\n"))
    service, rec = service_with(gov)
    key = gov.budget_keys()[0][2]
    session = service.open_stream()
    session.on_message(m.request_headers(authorization=f"Bearer {KEY_SEARCH}"))
    session.on_message(m.body(chat_body(max_tokens=40), eos=True))
    reserved = gov.ledger.value(key)
    assert reserved >= 40 + 2  # max_tokens plus the prompt counted with the tokenizer
    session.on_message(m.body(b'{"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,'
                              b'"total_tokens":12}}', response=True, eos=True, code=200))
    session.close()
    assert gov.ledger.value(key) == 12  # settled to the real usage
    # 88 left: a request whose worst case does not fit is refused before the upstream
    out = await request(service, KEY_SEARCH, chat_body(max_tokens=90))
    status, hdrs, body = immediate(out[1])
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert body["error"]["type"] == "insufficient_quota" and "team=search" in body["error"]["message"]
    assert int(hdrs["retry-after"]) > 0  # until the month resets
    assert rec.events[-1].error == "budget_exceeded" and rec.events[-1].http_status == 429
    assert gov.ledger.value(key) == 12  # a refusal reserves nothing


async def test_every_level_must_pass_feature_inside_team():
    gov = governor(policy_text("  - team: search\n    limit_tokens: 10000\n    hard: true\n"
                               "  - team: search\n    feature: ranking\n    limit_tokens: 30\n    hard: true\n"))
    service, _ = service_with(gov)
    out = await request(service, KEY_SEARCH, chat_body(max_tokens=50))
    assert immediate(out[1])[2]["error"]["message"].startswith("Budget exceeded for team=search,feature=ranking")


async def test_usd_budget_uses_the_price_table_and_unpriced_models_count_zero_said_so():
    gov = governor(policy_text("  - team: search\n    limit_usd: 0.05\n    hard: true\n"), prices=FakePrices())
    service, _ = service_with(gov)
    await request(service, KEY_SEARCH, chat_body(max_tokens=10), usage=(5, 7))
    usd_key = gov.budget_keys()[0][2]
    assert gov.ledger.value(usd_key) == 5 * 1000 + 7 * 2000  # micro-USD
    out = await request(service, KEY_SEARCH, chat_body(max_tokens=40))  # worst case > $0.05 - $0.019
    assert immediate(out[1])[0] == 429
    await request(service, KEY_SEARCH, chat_body(max_tokens=10).replace(b'"m"', b'"other"'))
    assert gov.stats.unpriced >= 1


async def test_a_request_that_never_ends_releases_its_reservation():
    gov = governor(policy_text("  - team: search\n    limit_tokens: 1000\n    hard: true\n"))
    service, rec = service_with(gov)
    key = gov.budget_keys()[0][2]
    session = service.open_stream()
    session.on_message(m.request_headers(authorization=f"Bearer {KEY_SEARCH}"))
    session.on_message(m.body(chat_body(max_tokens=500), eos=True))
    assert gov.ledger.value(key) > 500
    session.close()  # Envoy reset the stream: no response ever came
    ev = rec.events[0]
    assert ev.client_aborted and ev.completion_tokens == 0
    # the reservation is gone; what the upstream was sent (the prompt, counted) stays billed
    assert gov.ledger.value(key) == ev.total_tokens == ev.prompt_tokens < 10


async def test_rate_limit_429_carries_retry_after_and_x_ratelimit_headers():
    gov = governor(policy_text(rate_limits="  - key: ads-bot\n    requests_per_minute: 2\n"))
    service, _ = service_with(gov)
    for _ in range(2):
        assert (await request(service, KEY_ADS, chat_body()))[1].WhichOneof("response") == "request_body"
    status, hdrs, body = immediate((await request(service, KEY_ADS, chat_body()))[1])
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert hdrs["x-ratelimit-limit-requests"] == "2" and hdrs["x-ratelimit-remaining-requests"] == "0"
    assert hdrs["x-ratelimit-reset-requests"].endswith("s") and 1 <= int(hdrs["retry-after"]) <= 30
    # another key's team is not limited by it
    assert (await request(service, KEY_SEARCH, chat_body()))[1].WhichOneof("response") == "request_body"


async def test_token_rate_limit_reserves_before_and_settles_after():
    now = [1000.0]
    gov = Governor(parse_policy(policy_text(rate_limits="  - team: search\n    tokens_per_minute: 600\n")),
                   LocalLedger(lambda: now[0]), clock=lambda: now[0])
    service, _ = service_with(gov)
    await request(service, KEY_SEARCH, chat_body(max_tokens=400), usage=(5, 5))  # used 10 of the 400+ reserved
    bucket = gov.ledger.buckets["r:team=search:tokens"][0]
    assert 585 <= bucket <= 590  # refunded: 600 - 10 - (prompt estimate vs upstream difference)
    out = await request(service, KEY_SEARCH, chat_body(max_tokens=599))
    status, hdrs, _ = immediate(out[1])
    assert status == 429 and hdrs["x-ratelimit-limit-tokens"] == "600"
    now[0] += 30  # half a minute refills half the bucket
    assert (await request(service, KEY_SEARCH, chat_body(max_tokens=500)))[1].WhichOneof("response") == "request_body"


async def test_soft_budget_alerts_once_per_threshold_and_never_refuses():
    alerts = []
    gov = governor(policy_text("  - team: search\n    limit_tokens: 100\n    webhook: http://hook\n"),
                   alert=alerts.append)
    service, _ = service_with(gov)
    for _ in range(12):  # 12 tokens each: 48%, 60, ... 144%
        out = await request(service, KEY_SEARCH, chat_body(max_tokens=10), usage=(5, 7))
        assert out[1].WhichOneof("response") == "request_body"
    assert [a["threshold_pct"] for a in alerts] == [50, 80, 100]
    assert alerts[0]["scope"] == "team=search" and alerts[0]["webhook"] == "http://hook" and not alerts[0]["hard"]


async def test_50_concurrent_requests_on_a_nearly_spent_budget_overshoot_at_most_one_reservation():
    """Remote-ledger latency is simulated: every reservation awaits before the (atomic) charge,
    so all 50 are in flight at once."""
    class SlowLedger(LocalLedger):
        is_async = True

        async def reserve(self, counters, buckets):  # noqa: ANN001, ANN201
            await asyncio.sleep(0)
            return LocalLedger.reserve(self, counters, buckets)

        async def adjust(self, counters, buckets):  # noqa: ANN001, ANN201
            return LocalLedger.adjust(self, counters, buckets)

        async def claim_alert(self, key, expires_at):  # noqa: ANN001, ANN201
            return LocalLedger.claim_alert(self, key, expires_at)

    limit = 1000
    gov = governor(policy_text(f"  - team: search\n    limit_tokens: {limit}\n    hard: true\n"), SlowLedger())
    service, rec = service_with(gov)
    key = gov.budget_keys()[0][2]
    gov.ledger.seed(key, limit - 150, 2**40)  # nearly spent: 150 left
    results = await asyncio.gather(*(request(service, KEY_SEARCH, chat_body(max_tokens=50), usage=(10, 50))
                                     for _ in range(50)))
    await gov.drain()
    admitted = [r for r in results if r[1].WhichOneof("response") == "request_body"]
    reservation = max(e.total_tokens for e in rec.events) + 2  # prompt estimate differs by a little
    assert 1 <= len(admitted) <= 3
    assert gov.ledger.value(key) <= limit + reservation
    assert gov.stats.refused["budget_exceeded"] == 50 - len(admitted)


async def test_observe_mode_attributes_by_key_but_refuses_nothing_and_says_so():
    gov = governor(policy_text("  - team: search\n    limit_tokens: 1\n    hard: true\n", require_key=True))
    service, rec = service_with(gov)
    for key in (KEY_SEARCH, "sk-unknown", None):
        session = service.open_stream()
        msgs = [m.request_headers(**({"authorization": f"Bearer {key}"} if key else {}), x_team="ads"),
                m.body(chat_body(), eos=True),
                m.body(b'{"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,'
                       b'"total_tokens":12}}', response=True, eos=True, code=200)]
        for msg in msgs:
            msg.observability_mode = True
            assert session.on_message(msg) is None  # Envoy ignores answers: none are given
        session.close()
    assert [e.labels["team"] for e in rec.events] == ["search", "ads", "ads"]
    assert all(e.total_tokens == 12 and not e.error for e in rec.events)  # metered, not refused
    assert not gov.stats.refused and service.stats.errors["policy_not_enforced_observe_mode"] == 3


async def test_worst_case_uses_the_output_cap_the_request_sets_else_the_default():
    gov = governor(policy_text("  - team: search\n    limit_tokens: 100000\n    hard: true\n"),
                   default_max_tokens=300)
    service, _ = service_with(gov)
    key = gov.budget_keys()[0][2]

    async def reserved(body: bytes, path: str = "/v1/chat/completions") -> int:
        session = service.open_stream()
        session.on_message(m.request_headers(path, authorization=f"Bearer {KEY_SEARCH}"))
        before = gov.ledger.value(key)
        session.on_message(m.body(body, eos=True))
        amount = gov.ledger.value(key) - before
        session.close()
        return amount

    import orjson
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    prompt = await reserved(orjson.dumps({**chat, "max_tokens": 0})) - 300  # no cap given: default
    assert await reserved(orjson.dumps(chat)) == prompt + 300
    assert await reserved(orjson.dumps({**chat, "max_completion_tokens": 20, "max_tokens": 99})) == prompt + 20
    assert await reserved(orjson.dumps({**chat, "max_tokens": 20, "n": 3})) == prompt + 60
    emb = await reserved(orjson.dumps({"model": "m", "input": "hi there"}), "/v1/embeddings")
    assert 0 < emb < 10  # input only: nothing reserved for output


def _sse_delta(text: str) -> bytes:
    import orjson
    return m.sse(orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}))


@pytest.mark.parametrize("stop", [True, False])
async def test_a_stream_past_its_reservation_and_a_hard_budget_is_ended_when_configured(stop):
    gov = governor(policy_text("  - team: search\n    limit_tokens: 60\n    hard: true\n"),
                   default_max_tokens=5, stop_streams=stop)
    service, rec = service_with(gov)
    session = service.open_stream()
    session.on_message(m.request_headers(authorization=f"Bearer {KEY_SEARCH}"))
    body = chat_body(max_tokens=None, stream=True)
    assert session.on_message(m.body(body, eos=True)).WhichOneof("response") == "request_body"
    reserved = gov.budget_keys()[0]
    answers = [session.on_message(m.body(_sse_delta(" word"), response=True, code=200 if i == 0 else None))
               for i in range(80)]
    cut = [i for i, a in enumerate(answers) if b'data: {"error"' in a.response_body.response.body_mutation.body]
    if not stop:
        assert not cut and not any(a.WhichOneof("response") == "immediate_response" for a in answers)
        session.close()
        assert rec.events[0].error == "" and rec.events[0].completion_tokens >= 80
        return
    assert len(cut) == 1
    first = cut[0]
    # reserved: prompt + 5; cut once 5 + excess passes what the budget has left
    assert 40 < first + 1 < 60, first
    served = answers[first].response_body.response.body_mutation.body
    assert served.startswith(_sse_delta(" word"))  # the chunk's complete event still goes out
    assert answers[first + 1].WhichOneof("response") == "immediate_response"
    assert session.finished
    session.close()
    ev = rec.events[0]
    assert ev.error == "budget_exceeded_mid_stream" and ev.http_status == 200
    assert first <= ev.completion_tokens <= first + 2  # what was served is billed
    assert gov.ledger.value(reserved[2]) == ev.total_tokens
