"""Chargeback in money end to end: the openai client -> real Envoy -> sidecar (with a pricing
file) -> simulator, stored in real embedded ClickHouse. Each team's list-price cost and
allocated GPU cost, read from the admin API like a user would, equal an independent Decimal
computation from the usage the simulator itself reported; the idle line is large under sparse
traffic and shrinks under heavy traffic; a price correction through `extproc reprice`
re-prices history and the reports agree with the per-event sums."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import openai
import pytest

from tests.stack import ThreadedSidecar, sidecar_settings, start_envoy, start_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PRICES = {"input": Decimal("0.20"), "cached": Decimal("0.02"), "output": Decimal("0.80")}
POOL_HOUR_USD = Decimal("2.00")  # 1 GPU rented at 2 USD/h
CAPACITY = 6_000  # work units per hour: the heavy phase uses most of it
PREFILL_W, DECODE_W = 1, 5
PRICING = """
models:
  "meta-llama/*":
    input_per_mtok: {input}
    cached_input_per_mtok: {cached}
    output_per_mtok: {output}
    pool: sim-gpu
gpu_pools:
  sim-gpu:
    gpus: 1
    rent_per_gpu_hour: 2.00
    prefill_weight: 1
    decode_weight: 5
    capacity_work_per_hour: 6000
"""
TEAMS = ("search", "support")


def _write_pricing(path: Path, prices: dict[str, Decimal]) -> None:
    path.write_text(PRICING.format(**prices))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-pricing")
    pricing = work / "pricing.yaml"
    _write_pricing(pricing, PRICES)
    sim, sim_url = start_sim(work, "--enable-prompt-tokens-details", "--tokens-per-second", "0")
    sc = ThreadedSidecar(sidecar_settings(work, pricing={"file": str(pricing)})).start()
    envoy, url, _ = start_envoy(work, sim_url, sc.sidecar.grpc_port)

    class Stack:
        pass

    s = Stack()
    s.url, s.sidecar, s.pricing = url, sc, pricing
    s.admin = f"http://127.0.0.1:{sc.sidecar.admin_port}"
    s.usage: list[tuple[str, int, int, int]] = []  # (team, prompt, cached, completion) as the simulator said
    yield s
    envoy.stop()
    sc.stop()
    sim.stop()


def _wait_clear_of_the_hour() -> datetime:
    """Costs are per pool-hour: the phases of this test must not straddle one."""
    now = datetime.now(UTC)
    if now.minute == 59 and now.second >= 30:
        time.sleep(61 - now.second)
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def _send(url: str, team: str, i: int) -> tuple[str, int, int, int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                           default_headers={"x-team": team, "x-feature": "f", "x-user": f"{team}-{i}"})
    messages = [{"role": "user", "content": f"Team {team} asks question {i % 3} about GPU chargeback."}]
    if i % 2:
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8 + i % 17,
                                                     stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8 + i % 17).usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return team, usage.prompt_tokens, cached or 0, usage.completion_tokens


def _traffic(stack, per_team: int, offset: int) -> None:
    jobs = [(team, offset + i) for team in TEAMS for i in range(per_team)]
    with ThreadPoolExecutor(4) as pool:
        stack.usage += list(pool.map(lambda j: _send(stack.url, *j), jobs))


def _admin(stack, path: str, **params: str) -> dict:
    url = f"{stack.admin}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _list_cost(prompt: int, cached: int, completion: int, prices: dict[str, Decimal]) -> Decimal:
    """Per request, rounded half up to the micro-dollar (the documented rule)."""
    usd = ((prompt - cached) * prices["input"] + cached * prices["cached"] + completion * prices["output"]) / 10**6
    return usd.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _expected(stack, prices: dict[str, Decimal]) -> tuple[dict[str, Decimal], dict[str, Decimal], Decimal]:
    lists: dict[str, Decimal] = defaultdict(Decimal)
    work: dict[str, int] = defaultdict(int)
    for team, prompt, cached, completion in stack.usage:
        lists[team] += _list_cost(prompt, cached, completion, prices)
        work[team] += PREFILL_W * (prompt - cached) + DECODE_W * completion
    total = sum(work.values())
    gpu = {t: (POOL_HOUR_USD * w / max(CAPACITY, total)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
           for t, w in work.items()}
    idle = POOL_HOUR_USD * max(0, CAPACITY - total) / CAPACITY
    return dict(lists), gpu, idle.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _reports(stack, hour: datetime) -> tuple[dict[str, dict], dict]:
    window = {"since": hour.isoformat(), "until": (hour + timedelta(hours=1)).isoformat()}
    rows = _admin(stack, "/v1/usage", report="chargeback", by="team", **window)["rows"]
    (pool,) = _admin(stack, "/v1/usage", report="gpu_pools", by="pool", **window)["rows"]
    return {r["team"]: r for r in rows}, pool


def test_team_costs_equal_an_independent_decimal_computation_at_two_load_levels(stack):
    hour = _wait_clear_of_the_hour()
    _traffic(stack, per_team=2, offset=0)  # sparse
    lists, gpu, idle = _expected(stack, PRICES)
    teams, sparse = _reports(stack, hour)
    assert set(teams) == set(TEAMS)
    for team in TEAMS:
        assert Decimal(teams[team]["cost_usd"]) == lists[team], team
        assert Decimal(teams[team]["gpu_cost_usd"]) == gpu[team], team
        assert teams[team]["unpriced_requests"] == 0
    assert Decimal(sparse["idle_usd"]) == idle and idle > POOL_HOUR_USD * Decimal("0.8")
    assert Decimal(sparse["pool_cost_usd"]) == POOL_HOUR_USD
    assert Decimal(sparse["allocated_usd"]) + Decimal(sparse["idle_usd"]) == POOL_HOUR_USD

    _traffic(stack, per_team=24, offset=2)  # heavy: 12x the requests
    lists, gpu, idle = _expected(stack, PRICES)
    teams, heavy = _reports(stack, hour)
    for team in TEAMS:
        assert Decimal(teams[team]["cost_usd"]) == lists[team], team
        assert Decimal(teams[team]["gpu_cost_usd"]) == gpu[team], team
    assert Decimal(heavy["idle_usd"]) == idle
    assert Decimal(heavy["idle_usd"]) < Decimal(sparse["idle_usd"]) / 2
    assert Decimal(heavy["allocated_usd"]) + Decimal(heavy["idle_usd"]) == POOL_HOUR_USD

    # the extproc.cost.usd counter (float in Prometheus; exact sums are ClickHouse's)
    with urllib.request.urlopen(f"{stack.admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    # one value per series (the last: /metrics repeats series after each flush, see the report)
    series = dict(re.findall(r"^extproc_cost_usd_total(\{[^}]*\}) (\S+)$", text, re.M))
    counted = sum(float(v) for v in series.values())
    assert counted == pytest.approx(float(sum(lists.values())), rel=1e-9)


def test_a_price_correction_reprices_history_through_the_cli(stack):
    if not stack.usage:
        pytest.skip("needs the traffic of the test above")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    corrected = dict(PRICES, output=Decimal("0.60"))
    _write_pricing(stack.pricing, corrected)
    done = subprocess.run([sys.executable, "-m", "extproc", "reprice", "--since", hour.isoformat(),
                           "--admin-url", stack.admin], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "repriced through the running sidecar" in done.stdout
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["events"] == len(stack.usage)
    lists, _, _ = _expected(stack, corrected)
    rollup = {r["team"]: Decimal(r["cost_usd"]) for r in
              _admin(stack, "/v1/usage", report="chargeback", by="team", since=hour.isoformat())["rows"]}
    raw = {r["team"]: Decimal(r["cost_usd"]) for r in
           _admin(stack, "/v1/usage", report="top_spenders", by="team", since=hour.isoformat())["rows"]}
    assert rollup == raw == lists
    assert Decimal(result["list_cost_usd_after"]) == sum(lists.values())
    # and a new request is priced with the corrected book too
    stack.usage.append(_send(stack.url, "search", 1000))
    lists, _, _ = _expected(stack, corrected)
    rollup = {r["team"]: Decimal(r["cost_usd"]) for r in
              _admin(stack, "/v1/usage", report="chargeback", by="team", since=hour.isoformat())["rows"]}
    assert rollup == lists


def test_a_broken_correction_is_refused_naming_the_line_and_changes_nothing(stack):
    before = _admin(stack, "/v1/usage", report="chargeback", by="team")["rows"]
    good = stack.pricing.read_text()
    stack.pricing.write_text(good.replace("output_per_mtok: ", "output_per_mtok: -", 1))
    try:
        req = urllib.request.Request(f"{stack.admin}/v1/reprice?since=2026-01-01", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
        assert f"{stack.pricing}:6: output_per_mtok must not be negative" in err.value.read().decode()
    finally:
        stack.pricing.write_text(good)
    assert _admin(stack, "/v1/usage", report="chargeback", by="team")["rows"] == before

