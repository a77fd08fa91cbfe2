"""Processes under test: simulator, fixed upstream, sidecar (`extproc serve`), Envoy; their CPU
time from /proc and their admin APIs. Each is its own process, started and stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.devtools.devstack import ManagedProcess, envoy_process, free_port, python_cli
from extproc.devtools.envoy_config import EnvoyOptions, render

_TICK = os.sysconf("SC_CLK_TCK")
# Envoy ext_proc counters that mean a stream or message failed (with failure_mode_allow, each
# failure is also counted in failure_mode_allowed: not added again).
EXT_PROC_ERRORS = ("streams_failed", "message_timeouts", "spurious_msgs_received", "rejected_header_mutations")


def _stat_times(path: str) -> tuple[float, float]:
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    # after "(comm)": state is field 3, utime 14, stime 15 (1-based) -> indexes 11, 12
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _stat_cpu(path: str) -> float:
    return sum(_stat_times(path))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) and its live children (the sidecar's
    embedded-ClickHouse child process is part of its cost)."""
    total = _stat_cpu(f"/proc/{pid}/stat")
    for child in _children(pid):
        with contextlib.suppress(OSError):  # exited between listing and reading
            total += cpu_seconds(child)
    return total


def sys_seconds(pid: int) -> float:
    """stime (kernel: syscalls, loopback TCP) of the whole process."""
    return _stat_times(f"/proc/{pid}/stat")[1]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (summed over threads of the same name); the main thread is
    reported as 'main'."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "main" if int(tid) == pid else f.read().strip()
            out[name] = out.get(name, 0.0) + _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # thread ended between listdir and open
    return out


def http_json(url: str, method: str = "GET", timeout: float = 60.0) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def envoy_stats(admin_port: int) -> dict[str, int]:
    data = http_json(f"http://127.0.0.1:{admin_port}/stats?format=json", timeout=5)
    return {s["name"]: s["value"] for s in data["stats"] if "value" in s}


def ext_proc_stats(stats: dict[str, int]) -> dict[str, int]:
    return {k.rpartition(".")[2]: v for k, v in stats.items() if ".ext_proc." in k}


def extproc_cluster_problems(stats: dict[str, int]) -> dict[str, int]:
    """Non-zero failure counters of Envoy's `extproc` cluster (resets, overflows, timeouts)."""
    words = ("reset", "overflow", "timeout", "fail", "destroy_with_active_rq", "protocol_error")
    return {k[len("cluster.extproc."):]: v for k, v in stats.items()
            if k.startswith("cluster.extproc.") and v and any(w in k for w in words)}


class Proc:
    """A ManagedProcess with its PID exposed and a log in the work dir."""

    def __init__(self, mp: ManagedProcess) -> None:
        self.mp = mp

    @property
    def pid(self) -> int:
        assert self.mp.proc is not None
        return self.mp.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def start(self, timeout: float = 60.0) -> Proc:
        self.mp.start(timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(Exception):
            self.mp.stop(sig=sig)


def start_sim(workdir: Path, tokens_per_second: float) -> tuple[Proc, int]:
    port = free_port()
    mp = ManagedProcess(f"sim-{port}", python_cli("sim", "--port", str(port), "--tokens-per-second",
                                                  str(tokens_per_second), "--log-level", "WARNING"),
                        ready_url=f"http://127.0.0.1:{port}/health", log_path=workdir / f"sim-{port}.log")
    return Proc(mp).start(), port


def start_upstream(workdir: Path, body: bytes, content_type: str = "application/json") -> tuple[Proc, int]:
    port = free_port()
    body_file = workdir / f"upstream-{port}.body"
    body_file.write_bytes(body)
    mp = ManagedProcess(f"upstream-{port}", [sys.executable, "-m", "bench.upstream", "--port", str(port),
                                            "--body", str(body_file), "--content-type", content_type],
                        ready_url=f"http://127.0.0.1:{port}/health", log_path=workdir / f"upstream-{port}.log")
    return Proc(mp).start(), port


def start_envoy(workdir: Path, upstream_port: int, *, extproc_address: str = "", mode: str = "sync",
                processing_mode: dict[str, str] | None = None, concurrency: int = 1) -> tuple[Proc, int, int]:
    """Envoy --concurrency 1 (unless told); with_extproc when an address is given; `processing_mode` overrides
    fields of the ext_proc filter's processing_mode (lever experiments). Returns (proc, listener,
    admin port)."""
    listen, admin = free_port(), free_port()
    opts = EnvoyOptions(upstream=f"http://127.0.0.1:{upstream_port}", listen_port=listen, admin_port=admin,
                        extproc_address=extproc_address or "127.0.0.1:1", mode=mode,
                        with_extproc=bool(extproc_address))
    mp = envoy_process(opts, workdir, concurrency=concurrency)
    if processing_mode:
        bootstrap = render(opts)
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        ext["typed_config"]["processing_mode"].update(processing_mode)
        (workdir / f"envoy-{listen}.yaml").write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return Proc(mp).start(), listen, admin


@dataclass
class Sidecar:
    """A real `extproc serve`: its own chDB dir and spool dir under `workdir`."""

    workdir: Path
    transport: str
    uds: bool = False
    settings: tuple[tuple[str, str, Any], ...] = ()  # (section, key, value) over the defaults
    # interpreter options before `-m extproc`, e.g. ("-m", "cProfile", "-o", path)
    python_args: tuple[str, ...] = ()
    proc: Proc | None = None
    admin_port: int = 0
    address: str = ""

    def start(self) -> Sidecar:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_port = free_port()
        self.address = (f"unix:{self.workdir / 'grpc.sock'}" if self.uds
                        else f"127.0.0.1:{free_port()}")
        config = self.workdir / "extproc.yaml"
        # spool.dir defaults to ./.extproc/spool (not under --data-dir): keep it private.
        doc: dict[str, Any] = {"grpc": {"transport": self.transport},
                               "spool": {"dir": str(self.workdir / "spool")}, "log_level": "WARNING"}
        for section, key, value in self.settings:
            doc.setdefault(section, {})[key] = value
        config.write_text(yaml.safe_dump(doc))
        argv = python_cli("serve", "--config", str(config), "--listen", self.address,
                          "--admin-port", str(self.admin_port), "--data-dir", str(self.workdir / "data"))
        argv[1:1] = self.python_args
        mp = ManagedProcess("sidecar", argv, ready_url=f"{self.admin_url}/readyz",
                            log_path=self.workdir / "sidecar.log")
        self.proc = Proc(mp).start(90)
        return self

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        return http_json(f"{self.admin_url}/v1/stats", timeout=10)

    def settle(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until every stream the sidecar opened is closed and the event count is still,
        then flush: the CPU measured between two marks includes storing the window's events
        in ClickHouse, whatever the batcher's flush interval."""
        deadline = time.monotonic() + timeout
        last = self.stats()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            self.flush()  # with worker processes, their counters reach the parent with a flush
            now = self.stats()
            if now["streams_opened"] == now["streams_closed"] and now["events_emitted"] == last["events_emitted"]:
                break
            last = now
        self.flush()
        return self.stats()

    def flush(self) -> bool:
        return bool(http_json(f"{self.admin_url}/v1/flush", "POST")["flushed"])

    def stored_by_team(self) -> dict[str, dict[str, int]]:
        """Requests and tokens stored in ClickHouse (chDB), per x-team label, via the admin API
        (the report's money columns, exact decimals, are left out)."""
        rows = http_json(f"{self.admin_url}/v1/usage?report=chargeback&by=team&fresh=true")["rows"]
        return {r["team"]: {k: int(v) for k, v in r.items() if k != "team" and not k.endswith("_usd")}
                for r in rows}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.stop(sig)


class Redis:
    """A redis-server for a bench run (loopback, free port, no persistence), stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (make system-packages)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_redis(workdir: Path) -> Redis:
    return Redis(workdir)
