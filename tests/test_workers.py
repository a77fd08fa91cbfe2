"""grpc.workers > 1: worker processes on one port behind a real Envoy, their events stored by the
parent in chDB; connections spread by the kernel; a crashed worker replaced; workers that lose
their parent stop by themselves; settings that cannot work refused."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from extproc import wire
from extproc.config import ConfigError
from tests import ext_proc_msgs as m
from tests.stack import (
    RecordingSink,
    ThreadedSidecar,
    serve_process,
    sidecar_settings,
    start_envoy,
    start_sim,
    wait_events,
)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _workers(admin_port: int) -> dict:
    return _get(f"http://127.0.0.1:{admin_port}/v1/stats")["workers"]


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _traffic(url: str, user: str, n: int) -> None:
    for i in range(n):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": f"team{i % 3}", "x-user": user})
        if i % 2:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=6)
        else:
            for _ in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                                    max_tokens=6, stream=True):
                pass


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_workers_behind_envoy_store_every_event(tmp_path: Path, transport: str):
    rec = RecordingSink()
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": transport, "workers": 2}),
                         extra_sinks=[rec]).start()
    sim, sim_url = start_sim(tmp_path)
    envoy, url, _ = start_envoy(tmp_path, sim_url, sc.sidecar.grpc_port, concurrency=2)
    try:
        assert sc.sidecar.service is None  # the parent serves no stream itself
        view = _workers(sc.sidecar.admin_port)
        assert view["configured"] == 2 and view["running"] == 2 and os.getpid() not in view["pids"]
        _traffic(url, "w", 12)
        events = wait_events(rec, "w", 12)
        assert {e.labels["team"] for e in events} == {"team0", "team1", "team2"}
        assert all(e.prompt_tokens > 0 and e.completion_tokens == 6 and not e.error for e in events)
        # through the admin API: the flush barrier reaches the workers, then the store
        rows = _get(f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/usage?by=team")["rows"]
        assert sum(int(r["requests"]) for r in rows) == 12
        assert sum(int(r["completion_tokens"]) for r in rows) == 72
        stats = _get(f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/stats")
        assert stats["streams_opened"] == stats["streams_closed"] == 12  # the workers' counters
        assert stats["events_emitted"] == 12 and stats["errors"] == {}
        assert sum(stats["workers"]["streams_opened"]) == 12
    finally:
        envoy.stop()
        sim.stop()
        sc.stop()


async def _streams(target: str, connections: int) -> None:
    """One stream on each of `connections` connections of their own (no shared subchannel), as
    each Envoy worker thread has one; all stay open until every stream is done."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    try:
        for ch in channels:
            out = [r async for r in wire.client_stub(ch)(iter([m.request_headers("/v1/models", "GET")]))]
            assert [r.WhichOneof("response") for r in out] == ["request_headers"]
    finally:
        for ch in channels:
            await ch.close()


def test_h2_hands_connections_to_the_worker_with_fewest(tmp_path: Path):
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2})).start()
    try:
        async def hold_six() -> list[int]:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{sc.sidecar.grpc_port}",
                                                  options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(6)]
            try:
                for ch in channels:
                    [_ async for _ in wire.client_stub(ch)(iter([m.request_headers("/v1/models", "GET")]))]
                await asyncio.to_thread(lambda: sc.call(sc.sidecar.force_flush()))
                return _workers(sc.sidecar.admin_port)["connections"]
            finally:
                for ch in channels:
                    await ch.close()

        assert asyncio.run(hold_six()) == [3, 3]
        per_worker = _workers(sc.sidecar.admin_port)["streams_opened"]
        assert per_worker == [3, 3]
    finally:
        sc.stop()


def test_grpcio_workers_share_the_port_and_the_kernel_spreads_connections(tmp_path: Path):
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "grpcio", "workers": 2})).start()
    try:
        asyncio.run(_streams(f"127.0.0.1:{sc.sidecar.grpc_port}", 16))
        assert sc.call(sc.sidecar.force_flush())
        per_worker = _workers(sc.sidecar.admin_port)["streams_opened"]
        # 16 connections hashed over 2 listeners: all on one would be a 1 in 32768 chance
        assert sum(per_worker) == 16 and min(per_worker) > 0, per_worker
    finally:
        sc.stop()


def test_h2_workers_behind_a_unix_socket(tmp_path: Path):
    path = tmp_path / "grpc.sock"
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2,
                                                          "listen": f"unix:{path}"})).start()
    try:
        asyncio.run(_streams(f"unix:{path}", 4))
        assert sc.call(sc.sidecar.force_flush())
        assert _workers(sc.sidecar.admin_port)["streams_opened"] == [2, 2]
    finally:
        sc.stop()
    assert not path.exists()  # removed at stop


def test_a_crashed_worker_is_replaced_and_traffic_goes_on(tmp_path: Path):
    rec = RecordingSink()
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2}),
                         extra_sinks=[rec]).start()
    sim, sim_url = start_sim(tmp_path)
    envoy, url, _ = start_envoy(tmp_path, sim_url, sc.sidecar.grpc_port, concurrency=2)
    try:
        _traffic(url, "before", 4)
        wait_events(rec, "before", 4)
        victim = _workers(sc.sidecar.admin_port)["pids"][0]
        os.kill(victim, signal.SIGKILL)
        view = _until(lambda: (v := _workers(sc.sidecar.admin_port))["restarts"] == 1 and v["running"] == 2 and v,
                      30, "the worker to be replaced")
        assert victim not in view["pids"] and None not in view["pids"]
        stats = _get(f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/stats")
        assert stats["errors"] == {"worker_exited": 1}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{sc.sidecar.admin_port}/metrics", timeout=10).read()
        assert b'kind="worker_exited"' in metrics
        _traffic(url, "after", 8)  # Envoy reconnects; the kernel picks a live listener
        events = wait_events(rec, "after", 8)
        assert all(e.completion_tokens == 6 and not e.error for e in events)
        assert sc.call(sc.sidecar.force_flush())
        # the main process counts events as they arrive: exact across the crash
        assert _get(f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/stats")["events_emitted"] == len(rec.events) == 12
    finally:
        envoy.stop()
        sim.stop()
        sc.stop()


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path):
    parent, _, admin = serve_process(tmp_path, "--workers", "2", "--transport", "h2")
    parent.start(timeout=120)
    pids = _workers(admin)["pids"]
    try:
        assert len(pids) == 2 and all(pids)
        parent.stop(sig=signal.SIGKILL)
        _until(lambda: all(_exited(p) for p in pids), 30, "orphaned workers to exit")
    finally:
        parent.stop(sig=signal.SIGKILL)
        for p in pids:
            if p and not _exited(p):
                os.kill(p, signal.SIGKILL)
    assert "the parent process is gone" in (tmp_path / "sidecar.log").read_text()


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path):
    settings = sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2},
                                tokenizer={"default_encoding": "no_such_encoding"})
    with pytest.raises(RuntimeError, match="exited with code 1 before it listened"):
        ThreadedSidecar(settings).start()


@pytest.mark.parametrize("grpc_settings, message", [
    ({"workers": 0}, "at least 1"),
    ({"workers": 2, "transport": "grpcio", "listen": "unix:/tmp/x.sock"}, "host:port"),
])
def test_settings_that_cannot_work_are_refused(tmp_path: Path, grpc_settings, message):
    with pytest.raises(ConfigError, match=message):
        sidecar_settings(tmp_path, grpc=grpc_settings)


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_a_taken_port_is_a_clear_error(tmp_path: Path, transport: str):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        settings = sidecar_settings(tmp_path, grpc={"transport": transport, "workers": 2,
                                                    "listen": f"127.0.0.1:{port}"})
        with pytest.raises(OSError, match="[Aa]ddress already in use"):
            ThreadedSidecar(settings).start()
    finally:
        taken.close()


def test_hybrid_mode_pairs_both_streams_of_a_request_in_one_worker(tmp_path: Path):
    """The request and the response filter reach the sidecar over the same connection of an
    Envoy worker thread (one cluster, one pool), so the same worker process pairs them."""
    rec = RecordingSink()
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2}),
                         extra_sinks=[rec]).start()
    sim, sim_url = start_sim(tmp_path)
    envoy, url, _ = start_envoy(tmp_path, sim_url, sc.sidecar.grpc_port, concurrency=2, mode="hybrid")
    try:
        _traffic(url, "hy", 12)
        events = wait_events(rec, "hy", 12)
        assert all(e.request_model == MODEL and not e.error and e.token_source == 1 for e in events)
        assert sum(e.usage_injected for e in events) == 6  # the streaming half
        assert sc.call(sc.sidecar.force_flush())  # the workers' counters, current
        assert sum(_workers(sc.sidecar.admin_port)["streams_opened"]) == 24  # two streams per request
    finally:
        envoy.stop()
        sim.stop()
        sc.stop()


def test_a_stuck_worker_is_killed_and_replaced(tmp_path: Path):
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2})).start()
    try:
        sc.sidecar.workers.heartbeat_timeout = 1.0
        victim = _workers(sc.sidecar.admin_port)["pids"][1]
        os.kill(victim, signal.SIGSTOP)  # alive, but its event loop no longer runs
        view = _until(lambda: (v := _workers(sc.sidecar.admin_port))["restarts"] == 1 and v["running"] == 2 and v,
                      30, "the stuck worker to be replaced")
        assert victim not in view["pids"]
        errors = _get(f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/stats")["errors"]
        assert errors == {"worker_stuck": 1, "worker_exited": 1}
        asyncio.run(_streams(f"127.0.0.1:{sc.sidecar.grpc_port}", 4))  # both workers serve again
        assert sc.call(sc.sidecar.force_flush())
        assert _workers(sc.sidecar.admin_port)["streams_opened"] == [2, 2]
    finally:
        sc.stop()


class _LogSeen(logging.Handler):
    """Records the messages containing `text` as they are logged, and says so at once."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text, self.messages, self.seen = text, [], threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in (msg := record.getMessage()):
            self.messages.append(msg)
            self.seen.set()


def test_fewer_connections_than_workers_is_said_in_the_log(tmp_path: Path):
    """Envoy with one worker thread opens one connection: the second sidecar worker idles."""
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2})).start()
    seen = _LogSeen("have no connection")
    logging.getLogger("extproc.workers.pool").addHandler(seen)
    try:
        sc.sidecar.workers.spread_check_after = 0.0
        sc.sidecar.workers.heartbeat_timeout = 1.0  # checks every 0.25 s

        async def hold_one() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.sidecar.grpc_port}") as ch:
                [_ async for _ in wire.client_stub(ch)(iter([m.request_headers("/v1/models", "GET")]))]
                assert await asyncio.to_thread(seen.seen.wait, 15), "the warning was not logged"

        asyncio.run(hold_one())
        [warning] = seen.messages
        assert "1 of 2" in warning and "--concurrency below 2" in warning
    finally:
        logging.getLogger("extproc.workers.pool").removeHandler(seen)
        sc.stop()
