"""A sidecar that stops answering for longer than Envoy's message_timeout (a stuck loop, a host
that froze it): Envoy fails open, the client is served in full, Envoy counts the timeout, and the
request is still recorded, flagged as not seen to its end. Then metering carries on."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import openai

from tests.stack import envoy_stats, serve_process, start_envoy, start_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _usage(admin_port: int) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/v1/usage?by=team", timeout=30) as r:
        return {row["team"]: row for row in json.loads(r.read())["rows"]}


def test_a_frozen_sidecar_fails_open_and_the_request_is_still_recorded(tmp_path):
    sim, sim_url = start_sim(tmp_path)
    sidecar, grpc_port, admin_port = serve_process(tmp_path)
    sidecar.start()
    envoy, url, envoy_admin = start_envoy(tmp_path, sim_url, grpc_port)  # message_timeout 1 s

    def client(team: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30,
                             default_headers={"x-team": team})

    def ask(team: str) -> openai.types.chat.ChatCompletion:
        return client(team).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                    max_tokens=10)

    try:
        ask("warm")  # the connection to the sidecar exists before it freezes
        sidecar.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            frozen = ask("frozen")
            waited = time.monotonic() - t0
        finally:
            sidecar.proc.send_signal(signal.SIGCONT)
        # Served in full, after Envoy waited out one message_timeout for the request headers.
        assert frozen.usage.completion_tokens == 10 and frozen.choices[0].message.content
        assert waited >= 0.9
        stats = envoy_stats(envoy_admin)
        assert stats["http.ingress.ext_proc.message_timeouts"] >= 1
        assert stats["http.ingress.ext_proc.failure_mode_allowed"] >= 1

        after = ask("after")  # metering carries on, on a fresh ext_proc stream
        rows = _usage(admin_port)  # flushes first
        # The frozen request: one event, flagged (its response was never seen), no tokens guessed.
        assert rows["frozen"]["requests"] == 1 and rows["frozen"]["client_aborted"] == 1
        assert rows["frozen"]["completion_tokens"] == 0
        assert (rows["after"]["requests"], rows["after"]["client_aborted"], rows["after"]["errors"]) == (1, 0, 0)
        assert rows["after"]["prompt_tokens"] == after.usage.prompt_tokens
        assert rows["after"]["completion_tokens"] == after.usage.completion_tokens == 10
    finally:
        envoy.stop()
        assert sidecar.stop() == 0
        sim.stop()
