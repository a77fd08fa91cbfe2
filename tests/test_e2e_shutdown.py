"""SIGTERM in the middle of real traffic: the sidecar process drains its streams and flushes,
and every event it emitted is in ClickHouse afterwards (read back from the same data dir)."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from extproc.storage import open_storage
from tests.stack import serve_process, sidecar_settings, start_envoy, start_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_mid_load_loses_no_event(tmp_path, workers):
    """workers=2: the parent signals its workers, which drain their streams and relay their
    last events before the parent flushes and stops."""
    sim, sim_url = start_sim(tmp_path, "--tokens-per-second", "400")
    sidecar, grpc_port, _ = serve_process(tmp_path, "--workers", str(workers))
    log = tmp_path / "sidecar.log"
    sidecar.start()
    envoy, url, _ = start_envoy(tmp_path, sim_url, grpc_port, concurrency=workers)
    done, sixty = threading.Event(), threading.Event()
    completed = []

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": f"team{i % 3}"})
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            try:
                stream = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"load {i}"}], max_tokens=20, stream=True)
                for _ in stream:
                    pass
                completed.append(i)
                if len(completed) >= 60:
                    sixty.set()
            except openai.APIError:
                pass

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client_loop, i) for i in range(6)]
            # the clients give up after 20 s: by then the load is either there or not coming
            assert sixty.wait(60), f"only {len(completed)} streams completed before SIGTERM"
            rc = sidecar.stop(timeout=60, sig=signal.SIGTERM)  # mid-load
            done.set()
            for f in futures:
                f.result()
    finally:
        envoy.stop()
        sim.stop()
    assert rc == 0
    text = log.read_text()
    assert "h2 transport" in text  # the default, as the startup line tells operators
    m = re.search(r"stopped: (\d+) events emitted, (\d+) inserted, (\d+) left in the spool.*, (\d+) dropped", text)
    assert m, text[-3000:]
    emitted, inserted, backlog, dropped = map(int, m.groups())
    assert emitted >= 60 and dropped == 0

    async def count() -> int:
        settings = sidecar_settings(tmp_path, spool={"dir": str(tmp_path / "spool")})
        storage = await open_storage(settings)
        sink = storage.sink()
        await sink.start()  # replays anything the shutdown left in the spool
        await sink.shutdown(30)
        rows = await storage.run(lambda c: c.query("SELECT count() FROM usage_events").result_rows[0][0])
        await storage.close()
        return rows

    assert asyncio.run(count()) == emitted
