"""Test harness: the sidecar in-process (in its own thread and event loop, so tests can read its
state and in-memory metrics) between a real Envoy and the simulator, each a real process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from extproc.app import Sidecar, loop_factory
from extproc.config import Settings, load_settings
from extproc.devtools.devstack import ManagedProcess, envoy_process, free_port, python_cli
from extproc.devtools.envoy_config import EnvoyOptions

T = TypeVar("T")


class RecordingSink:
    """Keeps a copy of every event the stream loop emits, to find them by label in tests."""

    def __init__(self) -> None:
        self.events = []
        # emit() runs on the sidecar's loop thread; tests wait on this instead of polling
        self.changed = threading.Condition()

    def emit(self, event) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until predicate() holds (checked at each emit), or timeout; its last value."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    async def start(self) -> None: ...

    async def force_flush(self, timeout: float = 30.0) -> bool:
        return True

    async def shutdown(self, timeout: float = 30.0) -> None: ...


def wait_events(rec: RecordingSink, user: str, count: int, timeout: float = 10.0) -> list:
    """Events are emitted as Envoy closes the ext_proc stream, a moment after the client is done.
    Once `count` are in, a duplicate would follow at once: a short bounded wait for one more
    (a missing event is waited for, an extra one can only be watched for)."""
    def found() -> list:
        return [e for e in rec.events if e.labels.get("user") == user]

    if not rec.wait_for(lambda: len(found()) >= count, timeout):
        raise AssertionError(f"expected {count} events for user {user}, got {len(found())}")
    rec.wait_for(lambda: len(found()) > count, 0.05)
    events = found()
    assert len(events) == count, f"{len(events)} events, expected {count}"
    return events


class ThreadedSidecar:
    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.sidecar = Sidecar(settings, **kwargs)
        self.loop = loop_factory(settings)()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sidecar", daemon=True)

    def start(self) -> ThreadedSidecar:
        self._thread.start()
        try:
            self.call(self.sidecar.start(), timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            raise
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.sidecar.stop(grace=2), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def sidecar_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"host": "127.0.0.1", "port": 0},
        "storage": {"dsn": f"chdb://{data_dir / 'data'}"},
        "spool": {"dir": str(data_dir / "spool")},
        "batch": {"flush_interval_ms": 200},
        "tokenizer": {"models": {"meta-llama/Llama-3.1-8B-Instruct": "llama3"}},
    }
    for key, value in overrides.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.__setitem__(key, value)
    return load_settings(None, base, environ={})


def serve_process(workdir: Path, *args: str, env: dict[str, str] | None = None,
                  data_dir: Path | None = None) -> tuple[ManagedProcess, int, int]:
    """`extproc serve` as a process of its own (for signals and exit codes), on free loopback
    ports, storing under workdir. Returns it not yet started, with its gRPC and admin ports."""
    grpc_port, admin_port = free_port(), free_port()
    argv = python_cli("serve", "--listen", f"127.0.0.1:{grpc_port}", "--admin-port", str(admin_port),
                      "--data-dir", str(data_dir or workdir / "data"), "--spool-dir", str(workdir / "spool"), *args)
    proc = ManagedProcess("sidecar", argv, ready_url=f"http://127.0.0.1:{admin_port}/readyz",
                          log_path=workdir / "sidecar.log", env=env)
    return proc, grpc_port, admin_port


def start_sim(workdir: Path, *args: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess("sim", python_cli("sim", "--port", str(port), *args), ready_url=f"{url}/health",
                          log_path=workdir / f"sim-{port}.log")
    proc.start()
    return proc, url


def start_envoy(workdir: Path, upstream: str, grpc_port: int | None, *, concurrency: int = 1,
                **opts: Any) -> tuple[ManagedProcess, str, int]:
    listen, admin = free_port(), free_port()
    proc = envoy_process(EnvoyOptions(upstream=upstream, listen_port=listen, admin_port=admin,
                                      extproc_address=f"127.0.0.1:{grpc_port or 1}",
                                      with_extproc=grpc_port is not None, **opts), workdir, concurrency)
    proc.start()
    return proc, f"http://127.0.0.1:{listen}", admin


@contextmanager
def metered_stack(workdir: Path, upstream: str, settings: Settings | None = None, *,
                  metric_readers: Sequence[Any] = (),
                  **envoy_opts: Any) -> Iterator[tuple[str, RecordingSink, ThreadedSidecar]]:
    """The in-process sidecar (recording its events) behind one Envoy in front of upstream:
    yields Envoy's URL, the recording sink and the sidecar; stops both on the way out."""
    rec = RecordingSink()
    sc = ThreadedSidecar(settings or sidecar_settings(workdir), extra_sinks=[rec],
                         metric_readers=metric_readers).start()
    try:
        envoy, url, _ = start_envoy(workdir, upstream, sc.sidecar.grpc_port, **envoy_opts)
        try:
            yield url, rec, sc
        finally:
            envoy.stop()
    finally:
        sc.stop()


def envoy_stats(admin_port: int, prefixes: Sequence[str] = ("http.ingress.ext_proc",)) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?format=json", timeout=5) as r:
        import json

        stats = json.loads(r.read())["stats"]
    return {s["name"]: s.get("value", 0) for s in stats
            if "value" in s and any(s["name"].startswith(p) for p in prefixes)}


def admin_json(admin_port: int, path: str, method: str = "GET") -> Any:
    """One call to a sidecar's admin API (/v1/stats, POST /v1/flush, ...), decoded."""
    import json
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_stats(admin_port: int, predicate: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = 30.0) -> dict[str, Any]:
    """Read /v1/stats of a sidecar process until predicate(stats) holds. Another process's
    counters offer nothing to wait on but reading them again; the deadline bounds that."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats = admin_json(admin_port, "/v1/stats")
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stats}")
        time.sleep(0.02)
