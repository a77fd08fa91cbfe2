"""End to end with the official openai SDK -> real Envoy -> sidecar with a policy file ->
simulator that refuses any request not carrying the upstream key (so no virtual key may reach
it): attribution by key over spoofed headers, 401 for unknown keys, 429 RateLimitError for a team
past its hard budget and for a rate limit, soft-budget webhooks once per threshold, and the
budget report (admin API and `extproc budgets show`)."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import openai
import pytest

from extproc.cli import main
from extproc.governance.policy import hash_key
from extproc.tokenizers import TokenizerRegistry
from tests.stack import metered_stack, sidecar_settings, start_envoy, start_sim, wait_events

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM_KEY = "sk-vllm-upstream"
KEYS = {"search": "sk-e2e-search", "ads": "sk-e2e-ads", "web": "sk-e2e-web", "bot": "sk-e2e-bot",
        "stream": "sk-e2e-stream"}


class Hooks:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.arrived = threading.Event()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                hooks.posts.append(json.loads(body))
                hooks.arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None: ...

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 10) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            self.arrived.wait(0.1)
            self.arrived.clear()
        return self.posts


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-gov")
    hooks = Hooks()
    policy = work / "policy.yaml"
    policy.write_text(
        "keys:\n"
        f'  - sha256: "{hash_key(KEYS["search"])}"\n    team: search\n    feature: ranking\n'
        f'  - sha256: "{hash_key(KEYS["ads"])}"\n    team: ads\n'
        f'  - sha256: "{hash_key(KEYS["web"])}"\n    team: web\n'
        f'  - sha256: "{hash_key(KEYS["bot"])}"\n    team: bots\n    name: bot\n'
        f'  - sha256: "{hash_key(KEYS["stream"])}"\n    team: streamers\n'
        "budgets:\n"
        "  - team: streamers\n    period: month\n    limit_tokens: 50\n    hard: true\n"
        "  - team: ads\n    period: month\n    limit_tokens: 200\n    hard: true\n"
        f"  - team: web\n    period: day\n    limit_tokens: 100\n    webhook: {hooks.url}\n"
        "rate_limits:\n"
        "  - key: bot\n    requests_per_minute: 2\n"
        "require_key: false\n")
    sim, sim_url = start_sim(work, "--api-key", UPSTREAM_KEY)
    settings = sidecar_settings(work, policy={"file": str(policy), "upstream_key": UPSTREAM_KEY,
                                              "default_max_tokens": 16, "stop_streams_over_budget": True})

    class Stack:
        pass

    with metered_stack(work, sim_url, settings) as (url, rec, sc):
        s = Stack()
        s.url, s.sim_url, s.rec, s.sidecar, s.hooks, s.policy = url, sim_url, rec, sc, hooks, policy
        yield s
    sim.stop()
    hooks.server.shutdown()


def _client(stack, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, default_headers=headers)


def _chat(client: openai.OpenAI, max_tokens: int = 8, stream: bool = False):  # noqa: ANN202
    msgs = [{"role": "user", "content": "Say something short."}]
    if stream:
        return list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, stream=True))
    return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens)


def test_the_simulator_refuses_a_request_carrying_a_client_key(stack):
    req = urllib.request.Request(f"{stack.sim_url}/v1/models", headers={"Authorization": f"Bearer {KEYS['search']}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 401


def test_spoofed_team_header_is_attributed_to_the_keys_team(stack):
    client = _client(stack, KEYS["search"], **{"x-team": "ads", "x-user": "spoofer"})
    resp = _chat(client)
    assert resp.usage.total_tokens > 0  # served: the simulator saw the upstream key, not ours
    _chat(client, stream=True)
    events = wait_events(stack.rec, "spoofer", 2)
    assert {e.labels["team"] for e in events} == {"search"} and {e.labels["feature"] for e in events} == {"ranking"}
    assert all(e.http_status == 200 and not e.error for e in events)
    gov = stack.sidecar.sidecar.governance.governor
    assert gov.stats.labels_overridden["team"] >= 2


def test_unknown_key_gets_401_authentication_error(stack):
    client = _client(stack, "sk-not-a-key", **{"x-user": "stranger"})
    with pytest.raises(openai.AuthenticationError) as info:
        _chat(client)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert wait_events(stack.rec, "stranger", 1)[0].error == "unknown_key"


def test_a_team_past_its_hard_budget_gets_429_rate_limit_error(stack):
    client = _client(stack, KEYS["ads"], **{"x-user": "ads-user"})
    served = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            _chat(client, max_tokens=30)
            served += 1
    assert 1 <= served < 20
    err = info.value
    assert err.status_code == 429 and err.code == "budget_exceeded"
    assert int(err.response.headers["retry-after"]) > 0
    events = wait_events(stack.rec, "ads-user", served + 1)
    assert sum(e.total_tokens for e in events) <= 200 and events[-1].error == "budget_exceeded"


def test_a_rate_limited_key_gets_429_with_x_ratelimit_headers(stack):
    client = _client(stack, KEYS["bot"], **{"x-user": "bot-user"})
    _chat(client)
    _chat(client)
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    h = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded"
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] and int(h["retry-after"]) >= 1


def test_a_soft_budget_webhook_fires_once_per_threshold(stack):
    client = _client(stack, KEYS["web"], **{"x-user": "web-user"})
    for _ in range(12):  # far past 100 % of 100 tokens: never refused
        _chat(client, max_tokens=8)
    posts = stack.hooks.wait(3)
    assert [p["threshold_pct"] for p in posts] == [50, 80, 100]
    assert {p["scope"] for p in posts} == {"team=web"} and all(p["period"] == "day" for p in posts)
    _chat(client, max_tokens=8)
    assert len(stack.hooks.wait(4, timeout=1)) == 3  # nothing more this period


@pytest.fixture
def slow_url(stack, tmp_path):
    """The same sidecar behind a second Envoy, in front of a simulator streaming 200 tokens/s
    (a fast one's whole answer can reach Envoy in one piece)."""
    sim, sim_url = start_sim(tmp_path, "--api-key", UPSTREAM_KEY, "--tokens-per-second", "200")
    envoy, url, _ = start_envoy(tmp_path, sim_url, stack.sidecar.sidecar.grpc_port)
    yield url
    envoy.stop()
    sim.stop()


def test_a_stream_that_passes_a_hard_budget_mid_way_is_ended_and_billed_for_what_was_served(stack, slow_url):
    """No max_tokens: 16 output tokens are reserved, the simulator generates 64; the stream is
    ended with an SSE error event once the team's 50-token budget is passed."""
    client = openai.OpenAI(base_url=f"{slow_url}/v1", api_key=KEYS["stream"], max_retries=0,
                           default_headers={"x-user": "streamer"})
    chunks = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], stream=True):
            chunks.append(chunk)
    assert "Budget exceeded for team=streamers while streaming" in str(info.value)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    served = TokenizerRegistry(models={MODEL: "llama3"}).for_model(MODEL).count(text)
    assert 5 <= served < 64
    ev = wait_events(stack.rec, "streamer", 1)[0]
    assert ev.error == "budget_exceeded_mid_stream" and ev.http_status == 200
    assert ev.completion_tokens == served  # what the client was served, counted
    gov = stack.sidecar.sidecar.governance.governor
    key = next(k for b, _u, k, *_ in gov.budget_keys() if b.scope.team == "streamers")
    assert gov.ledger.value(key) == ev.total_tokens  # settled to it
    # the budget is now past its limit: the next request is refused before the upstream
    with pytest.raises(openai.RateLimitError):
        _chat(client)


def test_budgets_report_admin_api_and_cli(stack, capsys):
    admin = f"http://127.0.0.1:{stack.sidecar.sidecar.admin_port}"
    with urllib.request.urlopen(f"{admin}/v1/budgets", timeout=5) as r:
        data = json.loads(r.read())
    rows = {b["scope"]: b for b in data["budgets"]}
    assert set(rows) == {"team=ads", "team=web", "team=streamers"} and rows["team=ads"]["limit"] == 200
    assert rows["team=ads"]["spent"] + rows["team=ads"]["remaining"] == 200
    assert main(["budgets", "show", "--admin-url", admin]) == 0
    out = capsys.readouterr().out
    assert "team=ads" in out and "hard" in out and "%" in out and "#" in out


def test_policy_reload_without_restart_and_a_broken_file_keeps_the_last_good_one(stack):
    import time

    original = stack.policy.read_text()
    admin = f"http://127.0.0.1:{stack.sidecar.sidecar.admin_port}"
    try:
        stack.policy.write_text(original.replace(
            "budgets:\n", f'  - sha256: "{hash_key("sk-e2e-new")}"\n    team: newteam\nbudgets:\n'))
        deadline = time.monotonic() + 15
        while True:  # the watcher checks every policy.reload_interval_ms
            try:
                _chat(_client(stack, "sk-e2e-new", **{"x-user": "new-user"}))
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "new key not picked up"
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not (served := [e for e in stack.rec.events if e.labels.get("user") == "new-user" and not e.error]):
            assert time.monotonic() < deadline, "no event for the served request"
            time.sleep(0.02)
        assert [e.labels["team"] for e in served] == ["newteam"]  # the tries before: 401, unknown_key
        stack.policy.write_text(original + "budgets: [oops\n")
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"{admin}/v1/budgets", timeout=5) as r:
                data = json.loads(r.read())
            if data["last_reload_error"]:
                break
            assert time.monotonic() < deadline, "broken reload not reported"
            time.sleep(0.2)
        assert "policy.yaml" in data["last_reload_error"]
        # the last good policy (with the new key) still serves
        assert _chat(_client(stack, "sk-e2e-new", **{"x-user": "new-user-2"})).usage.total_tokens > 0
    finally:
        stack.policy.write_text(original)
