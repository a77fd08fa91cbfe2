"""Through the real Envoy in hybrid mode: a sidecar frozen past message_timeout makes Envoy fail
the request filter open before our correlation header is applied; the response filter's stream
still observes the response. The request is stored once, with its upstream usage."""

from __future__ import annotations

import asyncio
import signal

import openai

from extproc.storage import open_storage
from tests.stack import serve_process, sidecar_settings, start_envoy, start_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def test_hybrid_request_filter_failed_open_is_stored_once(tmp_path):
    sim, sim_url = start_sim(tmp_path)
    sidecar, grpc_port, _ = serve_process(tmp_path)
    sidecar.start()
    envoy, url, _ = start_envoy(tmp_path, sim_url, grpc_port, mode="hybrid")  # message_timeout 1 s

    def ask(team: str):  # noqa: ANN202
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30,
                          default_headers={"x-team": team})
        return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=10)

    try:
        ask("warm")
        sidecar.proc.send_signal(signal.SIGSTOP)
        try:
            frozen = ask("frozen")  # Envoy waits out one message_timeout, then fails open
        finally:
            sidecar.proc.send_signal(signal.SIGCONT)
        after = ask("after")
        # SIGTERM: the sidecar sweeps every request stream still waiting, then flushes
        assert sidecar.stop(timeout=60, sig=signal.SIGTERM) == 0
    finally:
        sidecar.stop()
        envoy.stop()
        sim.stop()

    async def rows() -> dict[str, tuple[int, int, int]]:
        storage = await open_storage(sidecar_settings(tmp_path, spool={"dir": str(tmp_path / "spool")}))
        sink = storage.sink()
        await sink.start()
        await sink.shutdown(30)
        got = await storage.run(lambda c: c.query(
            "SELECT labels['team'], count(), sum(prompt_tokens), sum(completion_tokens) FROM usage_events "
            "GROUP BY 1").result_rows)
        await storage.close()
        return {team: (n, p, c) for team, n, p, c in got}

    stored = asyncio.run(rows())
    assert stored["frozen"] == (1, frozen.usage.prompt_tokens, frozen.usage.completion_tokens)
    assert stored["after"] == (1, after.usage.prompt_tokens, after.usage.completion_tokens)
