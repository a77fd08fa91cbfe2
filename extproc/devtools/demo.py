"""`extproc demo`: the whole stack on one machine, real traffic from several teams, a chargeback
table at the end. Uses the official `openai` client (chat, completions, embeddings and the
Responses API) and the `anthropic` client (the Messages API), exactly as a team's code would."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from extproc.devtools.devstack import DevStack

TEAMS = {
    "search": ["ranking", "query-rewrite"],
    "support": ["chatbot"],
    "ads": ["copywriter", "embeddings-index"],
    # coding agents: the Responses API (openai SDK) and the Messages API (anthropic SDK)
    "agents": ["responses-agent", "messages-agent"],
}
PROMPTS = [
    "Summarise the quarterly GPU usage report in three bullet points.",
    "Write a polite reply to a customer asking about a refund.",
    "Explain prefix caching to a new engineer.",
    "Translate 'good morning' into Japanese and French.",
]


def _traffic(base_url: str, team: str, feature: str, n: int, model: str) -> int:
    """One client per (team, feature), as separate services would have."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="demo-key",
                    default_headers={"x-team": team, "x-feature": feature, "x-user": f"{team}-bot"})
    if feature == "messages-agent":
        return _messages_traffic(base_url, team, feature, n, model)
    sent = 0
    for i in range(n):
        prompt = PROMPTS[(i + len(feature)) % len(PROMPTS)]
        if feature == "responses-agent":
            if i % 2:
                for _ in client.responses.create(model=model, input=prompt, instructions="Be concise.",
                                                 max_output_tokens=40, stream=True):
                    pass
            else:
                client.responses.create(model=model, input=[{"role": "user", "content": prompt}], max_output_tokens=32)
        elif feature.startswith("embeddings"):
            client.embeddings.create(model=model, input=[prompt, prompt[::-1]])
        elif i % 3 == 2:
            client.completions.create(model=model, prompt=prompt, max_tokens=24)
        elif i % 2 == 0:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=48, stream=True)
            for _ in stream:
                pass
        else:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=32, n=2 if i % 4 == 1 else 1)
        sent += 1
    return sent


def _messages_traffic(base_url: str, team: str, feature: str, n: int, model: str) -> int:
    from anthropic import Anthropic

    client = Anthropic(base_url=base_url, api_key="demo-key",
                       default_headers={"x-team": team, "x-feature": feature, "x-user": f"{team}-bot"})
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        if i % 2:
            with client.messages.stream(model=model, max_tokens=40, system="Be concise.", messages=messages) as s:
                for _ in s.text_stream:
                    pass
        else:
            client.messages.create(model=model, max_tokens=32, messages=messages)
    return n


def _report(admin_url: str, report: str = "chargeback", by: str = "team,feature,model") -> list[dict]:
    url = f"{admin_url}/v1/usage?report={report}&by={by}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        rows = json.loads(resp.read())["rows"]
    # money comes as exact decimal strings
    return [{k: Decimal(v) if k.endswith("_usd") and isinstance(v, str) else v for k, v in r.items()} for r in rows]


def gpu_summary(chargeback: list[dict], pools: list[dict]) -> str:
    """The one line: what our GPUs cost (used and idle) against what list prices would charge."""
    listed = sum((Decimal(str(r.get("cost_usd") or 0)) for r in chargeback), Decimal(0))
    unpriced = sum(int(r.get("unpriced_requests") or 0) for r in chargeback)
    note = f" ({unpriced} requests without a list price not included)" if unpriced else ""
    if not pools:
        return f"Own GPUs vs list price: no GPU pools in the pricing file; list price {listed} USD{note}"
    cost = sum((Decimal(str(p["pool_cost_usd"])) for p in pools), Decimal(0))
    used = sum((Decimal(str(p["allocated_usd"])) for p in pools), Decimal(0))
    idle = sum((Decimal(str(p["idle_usd"])) for p in pools), Decimal(0))
    hours = sum(int(p["pool_hours"]) for p in pools)
    return (f"Own GPUs vs list price: our GPUs cost {cost} USD over {hours} pool-hour(s) ({used} USD used by "
            f"requests, {idle} USD idle); the same requests at list prices: {listed} USD{note}")


def run_demo(stack: DevStack, requests_per_team: int = 6) -> int:
    from extproc.storage.reports import format_rows

    print("starting simulator, sidecar and Envoy ...", flush=True)
    t0 = time.monotonic()
    with stack:
        print(f"stack up in {time.monotonic() - t0:.1f}s; Envoy on {stack.url}", flush=True)
        models = urllib.request.Request(f"{stack.url}/v1/models", headers={"x-team": "platform"})
        with urllib.request.urlopen(models, timeout=10) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        jobs = [(team, feature) for team, features in TEAMS.items() for feature in features]
        t1 = time.monotonic()
        with ThreadPoolExecutor(len(jobs)) as pool:
            sent = sum(pool.map(lambda j: _traffic(stack.url, j[0], j[1], requests_per_team, model), jobs))
        print(f"sent {sent} requests from {len(TEAMS)} teams in {time.monotonic() - t1:.1f}s "
              "(streaming and not; chat, completions, embeddings, Responses and Messages APIs)", flush=True)
        rows = _report(stack.admin_url)
        pools = _report(stack.admin_url, "gpu_pools", "pool")
    print("\nChargeback by team / feature / model (everything in the store, earlier runs included):\n")
    format_rows(rows, "table")
    if pools:
        print("\nGPU pools: cost, what requests used, and idle capacity:\n")
        format_rows(pools, "table")
    print("\n" + gpu_summary(rows, pools))
    print(f"\nEvents are stored in {stack.data_dir}; query again with: extproc report --data-dir {stack.data_dir}")
    return 0
