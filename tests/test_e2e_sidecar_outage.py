"""The sidecar down or restarting: inference keeps flowing through Envoy untouched (fail open), Envoy
counts every request it could not meter, and metering resumes, into the same store, as soon as a
sidecar listens again."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from extproc.devtools.devstack import free_port
from extproc.events import TokenSource
from tests.stack import (
    RecordingSink,
    ThreadedSidecar,
    envoy_stats,
    sidecar_settings,
    start_envoy,
    wait_events,
)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MSG = [{"role": "user", "content": "Say something about GPUs."}]


def _traffic(url: str, user: str, usage_chunk_shown: bool = False) -> list[tuple[int, int]]:
    """A non-streaming and a streaming request (no usage asked for); returns the usage the upstream
    reported for each (the stream's: the same prompt, and max_tokens, which the simulator fills)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                           default_headers={"x-team": f"outage-{user}", "x-user": user})
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12)
    assert out.choices[0].message.content and out.usage.completion_tokens == 12
    usages = [(out.usage.prompt_tokens, out.usage.completion_tokens)]
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=9, stream=True))
    # The client sees what vLLM sends it: no usage chunk it did not ask for (except hybrid mode's
    # injected one, documented: its response filter only observes).
    shown = [c for c in chunks if c.usage is not None]
    assert len(shown) == (1 if usage_chunk_shown else 0)
    content = [c for c in chunks if c.choices]
    assert any(c.choices[0].delta.content for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    usages.append((usages[0][0], 9))  # same prompt, so the same prompt tokens
    return usages


def _failed_open(admin_port: int) -> int:
    return sum(v for k, v in envoy_stats(admin_port).items() if k.endswith("failure_mode_allowed"))


@pytest.mark.parametrize("mode", ["sync", "hybrid", "observe"])
def test_no_sidecar_fails_open_and_metering_resumes_when_one_listens(tmp_path, sim, mode):
    port = free_port()
    envoy, url, admin = start_envoy(tmp_path, sim, port, mode=mode)  # nothing listens on port yet
    try:
        _traffic(url, "before")
        _traffic(url, "before")
        # Every request went through unmetered, and Envoy counted each (hybrid: both filters).
        assert _failed_open(admin) >= 4 * (2 if mode == "hybrid" else 1)

        rec = RecordingSink()
        settings = sidecar_settings(tmp_path, grpc={"listen": f"127.0.0.1:{port}"})
        sc = ThreadedSidecar(settings, extra_sinks=[rec]).start()
        try:
            expected = _traffic(url, "after", usage_chunk_shown=mode == "hybrid")
            plain, stream = sorted(wait_events(rec, "after", 2), key=lambda e: e.stream)
            assert (plain.prompt_tokens, plain.completion_tokens) == expected[0]
            if mode == "observe":  # nothing injected: the stream is counted with the tokenizer
                assert stream.token_source == TokenSource.TOKENIZER and stream.completion_tokens > 0
            else:
                assert (stream.prompt_tokens, stream.completion_tokens) == expected[1]
            assert all(e.http_status == 200 and not e.error and not e.client_aborted for e in (plain, stream))
            assert not [e for e in rec.events if e.labels.get("user") == "before"]
        finally:
            sc.stop()
    finally:
        envoy.stop()


def test_sidecar_restart_keeps_inference_up_and_loses_no_stored_event(tmp_path, sim):
    port = free_port()
    settings = sidecar_settings(tmp_path, grpc={"listen": f"127.0.0.1:{port}"})
    envoy, url, admin = start_envoy(tmp_path, sim, port)
    try:
        first = ThreadedSidecar(settings).start()
        try:
            _traffic(url, "first")
        finally:
            first.stop()  # drains: its events are stored before it returns
        _traffic(url, "gap")  # no sidecar: served, not metered
        assert _failed_open(admin) >= 2

        second = ThreadedSidecar(settings).start()  # same port, same store
        try:
            _traffic(url, "second")
            with urllib.request.urlopen(f"http://127.0.0.1:{second.sidecar.admin_port}/v1/usage?by=team",
                                        timeout=30) as r:
                rows = {row["team"].removeprefix("outage-"): row for row in json.loads(r.read())["rows"]}
        finally:
            second.stop()
        assert set(rows) == {"first", "second"}
        assert [rows[u]["requests"] for u in ("first", "second")] == [2, 2]
        assert rows["first"]["completion_tokens"] == rows["second"]["completion_tokens"] == 12 + 9
    finally:
        envoy.stop()
