"""Budgets and rate limits shared through a real redis-server: two sidecars enforce one budget,
50 concurrent requests over real transports overshoot at most one reservation, and a Redis that
stops mid-test leaves the stated policy in force (fail open on local state, or fail closed with
503), nothing crashing and every request still metered."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from extproc import wire
from extproc.governance.redis_ledger import RedisLedger
from extproc.server import start_grpc_server
from extproc.transport import start_h2_server
from tests import ext_proc_msgs as m
from tests.governance_helpers import (
    KEY_SEARCH,
    chat_body,
    governor,
    immediate,
    json_answer,
    policy_text,
    request,
    service_with,
)
from tests.redis_server import RedisProcess

HARD = "  - team: search\n    limit_tokens: {limit}\n    hard: true\n"


@pytest.fixture
def redis_proc(tmp_path):
    proc = RedisProcess(tmp_path).start()
    yield proc
    proc.stop()


def _ledger(url: str, timeout_s: float = 2.0, **kw) -> RedisLedger:
    # generous: on a loaded machine a slow answer must not turn into the failure policy
    return RedisLedger(url, prefix="t:", timeout_s=timeout_s, **kw)


async def test_two_sidecars_sharing_one_redis_enforce_one_budget(redis_proc):
    text = policy_text(HARD.format(limit=200))
    a, b = governor(text, _ledger(redis_proc.url)), governor(text, _ledger(redis_proc.url))
    (svc_a, _), (svc_b, rec_b) = service_with(a), service_with(b)
    served = 0
    for i in range(10):  # alternate replicas; each request reserves ~52, uses 12
        svc = svc_a if i % 2 == 0 else svc_b
        out = await request(svc, KEY_SEARCH, chat_body(max_tokens=50), usage=(5, 7))
        served += out[1].WhichOneof("response") == "request_body"
        await a.drain()
        await b.drain()
    key = a.budget_keys()[0][2]
    total = (await a.ledger.values([key]))[0]
    # 200 tokens shared: admitted while used + 52 <= 200, i.e. 13 x 12 would fit; ten requests all fit
    assert served == 10 and total == 120
    # the other replica sees the same spend
    assert (await b.ledger.values([key]))[0] == 120
    # now push it to the edge from replica A; replica B must refuse what no longer fits
    big = await request(svc_a, KEY_SEARCH, chat_body(max_tokens=60), usage=(5, 60))
    assert big[1].WhichOneof("response") == "request_body"
    await a.drain()
    out = await request(svc_b, KEY_SEARCH, chat_body(max_tokens=50))
    assert immediate(out[1])[0] == 429 and rec_b.events[-1].error == "budget_exceeded"
    for g in (a, b):
        await g.ledger.close()


@pytest.fixture(params=["grpcio", "h2-inline"])
async def transport(request, redis_proc):
    gov = governor(policy_text(HARD.format(limit=1000)), _ledger(redis_proc.url))
    service, rec = service_with(gov)
    if request.param == "grpcio":
        server, port = await start_grpc_server(service, "127.0.0.1:0")
    else:
        server, port = await start_h2_server(service.open_stream, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield gov, rec, wire.client_stub(channel)
    await channel.close()
    await server.stop(0)
    await gov.ledger.close()


async def _over_grpc(stub, max_tokens: int) -> list:
    """Envoy's order: request headers, then (after their answer) the buffered body, then the
    response, each sent once the previous answer arrived."""
    call = stub()
    out = []
    await call.write(m.request_headers(authorization=f"Bearer {KEY_SEARCH}"))
    out.append(await call.read())
    await call.write(m.body(chat_body(max_tokens=max_tokens), eos=True))
    out.append(await call.read())
    if out[-1].WhichOneof("response") == "request_body":
        await call.write(m.body(json_answer(10, 50), response=True, eos=True, code=200))
        out.append(await call.read())
    await call.done_writing()
    while (extra := await call.read()) is not grpc.aio.EOF:
        out.append(extra)
    return out


async def test_50_concurrent_requests_through_the_transports_overshoot_at_most_one_reservation(transport):
    gov, rec, stub = transport
    key = gov.budget_keys()[0][2]
    await gov.ledger.seed(key, 850, 2**40)  # 150 of 1000 left
    results = await asyncio.gather(*(_over_grpc(stub, 50) for _ in range(50)))
    for _ in range(100):
        if len(rec.events) == 50:
            break
        await asyncio.sleep(0.02)
    await gov.drain()
    admitted = [r for r in results if r[1].WhichOneof("response") == "request_body"]
    refused = [r for r in results if r[1].WhichOneof("response") == "immediate_response"]
    assert len(admitted) + len(refused) == 50 and 1 <= len(admitted) <= 3
    assert all(immediate(r[1])[0] == 429 for r in refused)
    spent = (await gov.ledger.values([key]))[0]
    one_reservation = 50 + 10  # max_tokens plus about the prompt
    assert spent <= 1000 + one_reservation, spent
    assert spent == 850 + sum(e.total_tokens for e in rec.events)  # settled: exactly what was used
    assert len(rec.events) == 50


async def test_redis_stopped_mid_test_fail_open_keeps_serving_on_local_state(redis_proc):
    gov = governor(policy_text(HARD.format(limit=100)), _ledger(redis_proc.url, on_failure="open"))
    service, rec = service_with(gov)
    assert (await request(service, KEY_SEARCH, chat_body(max_tokens=20)))[1].WhichOneof("response") == "request_body"
    redis_proc.stop()
    for _ in range(3):  # local state: 100 tokens in this process alone
        out = await request(service, KEY_SEARCH, chat_body(max_tokens=20), usage=(5, 7))
        assert out[1].WhichOneof("response") == "request_body"
    await gov.drain()
    out = await request(service, KEY_SEARCH, chat_body(max_tokens=90))  # local budget still enforced
    assert immediate(out[1])[0] == 429
    assert gov.ledger.errors >= 4 and gov.ledger.fallbacks >= 4 and not gov.ledger.available
    assert len(rec.events) == 5 and all(e.total_tokens == 12 for e in rec.events[:4])  # metering continues
    await gov.ledger.close()


async def test_redis_stopped_mid_test_fail_closed_answers_503(redis_proc):
    gov = governor(policy_text(HARD.format(limit=100)), _ledger(redis_proc.url, on_failure="closed"))
    service, rec = service_with(gov)
    redis_proc.stop()
    status, hdrs, body = immediate((await request(service, KEY_SEARCH, chat_body()))[1])
    assert status == 503 and hdrs["retry-after"] == "1" and body["error"]["code"] == "budget_store_unavailable"
    assert rec.events[0].error == "policy_unavailable" and gov.stats.refused["policy_unavailable"] == 1
    # a request no budget covers is not held up by the outage
    out = await request(service, None, chat_body(), x_team="web")
    assert out[1].WhichOneof("response") == "request_body"
    await gov.ledger.close()


async def test_soft_alerts_fire_once_per_threshold_across_replicas(redis_proc):
    text = policy_text("  - team: search\n    limit_tokens: 100\n")
    alerts_a, alerts_b = [], []
    a = governor(text, _ledger(redis_proc.url), alert=alerts_a.append)
    b = governor(text, _ledger(redis_proc.url), alert=alerts_b.append)
    (svc_a, _), (svc_b, _) = service_with(a), service_with(b)
    for i in range(12):
        await request(svc_a if i % 2 else svc_b, KEY_SEARCH, chat_body(max_tokens=10), usage=(5, 7))
        await a.drain()
        await b.drain()
    assert sorted(x["threshold_pct"] for x in alerts_a + alerts_b) == [50, 80, 100]
    for g in (a, b):
        await g.ledger.close()


async def test_a_hung_redis_times_out_into_the_failure_policy(redis_proc):
    """SIGSTOP: the socket stays open and nothing answers; the call times out (policy
    redis_timeout_ms) and the request is decided on local state instead of hanging."""
    import os
    import signal
    import time

    gov = governor(policy_text(HARD.format(limit=1000)), _ledger(redis_proc.url, 0.3, on_failure="open"))
    service, rec = service_with(gov)
    await request(service, KEY_SEARCH, chat_body())  # connected
    os.kill(redis_proc.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        out = await request(service, KEY_SEARCH, chat_body(), usage=(5, 7))
        took = time.monotonic() - t
    finally:
        os.kill(redis_proc.proc.pid, signal.SIGCONT)
    assert out[1].WhichOneof("response") == "request_body" and took < 3.0  # 0.3 s timeout, loaded box
    assert gov.ledger.fallbacks >= 1 and rec.events[-1].total_tokens == 12
    await gov.drain()
    await gov.ledger.close()


async def test_settlements_close_together_share_one_redis_call(redis_proc):
    from extproc.governance.ledger import Counter

    ledger = _ledger(redis_proc.url)
    calls = []
    script = ledger._adjust

    async def counted(**kw):  # noqa: ANN003, ANN202
        calls.append(kw)
        return await script(**kw)

    ledger._adjust = counted
    c = [Counter("c1", 100, 3, True, 2**40)]
    results = await asyncio.gather(*(ledger.adjust([*c, Counter(f"own{i}", 100, i, True, 2**40)], [])
                                     for i in range(20)))
    assert len(calls) == 1 and calls[0]["args"][2] == 60  # c1's twenty amounts summed into one
    assert all(r[0] == 60 for r in results) and [r[1] for r in results] == list(range(20))
    assert await ledger.values(["c1", "own7"]) == [60, 7]
    await ledger.close()
