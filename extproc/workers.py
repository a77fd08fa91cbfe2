"""Worker processes (`grpc.workers` > 1): the parent's pool and the worker's side of the relay.

Why processes: one Python process serves ext_proc on at most one core (the GIL). Why the parent
keeps every sink: embedded ClickHouse (chDB) lets one process open a data directory, the spool
is one sequence on disk, and the admin API and Prometheus endpoint are one each. Workers bind
the same port with SO_REUSEPORT and the kernel spreads Envoy's connections between them.

A worker is `python -m extproc.workers --fd N --index I`, spawned (not forked: the parent runs
threads and ClickHouse) with one end of a socketpair; its settings arrive over that socket.
Events and counter snapshots go up (extproc/relay.py), flush barriers go both ways. A worker
that dies is started again (its open streams fail open in Envoy); a worker whose parent dies
stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import orjson

from extproc import relay
from extproc.config import ConfigError, Settings, load_settings
from extproc.events import EventSink, UsageEvent
from extproc.stats import SidecarStats

log = logging.getLogger(__name__)

# a worker loads its tokenizers before it listens
READY_TIMEOUT_S = 120.0
STATS_INTERVAL_S = 0.5
# Events a worker could not hand to a stalled parent, past which new ones are dropped (counted).
MAX_UNSENT = 256 << 20
# what a stopping worker gets on top of the streams' grace: its last events to the parent
STOP_MARGIN_S = 20.0
# a worker that lived shorter than this failed "fast": its restart waits twice as long as before
HEALTHY_AFTER_S = 10.0
BACKOFF_S = (0.5, 30.0)


# ---- parent ------------------------------------------------------------------------------


class _Worker:
    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: _ParentChannel | None = None
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.last_stats: dict[str, Any] = {}
        self.started = 0.0
        self.fast_failures = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _ParentChannel(asyncio.Protocol):
    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.reader = relay.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.flushes: dict[int, asyncio.Future[bool]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for kind, payload in self.reader.feed(data):
                self.pool._on_frame(self.worker, kind, payload)
        except (relay.RelayError, ValueError) as exc:
            self.pool.stats.errors["relay_protocol"] += 1
            log.error("worker %d sent a bad frame (%s): closing its channel", self.worker.index, exc)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader.pending:
            self.pool.stats.errors["relay_protocol"] += 1
            log.error("worker %d: channel ended inside a frame (%d bytes)", self.worker.index, self.reader.pending)
        for fut in self.flushes.values():
            if not fut.done():
                fut.set_result(False)
        self.flushes.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(data)
        return True


class WorkerPool:
    """Starts `grpc.workers` worker processes on one port and feeds their events to `sinks`;
    their counters are added to `stats`, so the admin API and metrics show the whole sidecar."""

    def __init__(self, settings: Settings, sinks: list[EventSink], stats: SidecarStats) -> None:
        self.settings = settings
        self.sinks = sinks
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.workers = [_Worker(i, self.loop) for i in range(settings.grpc.workers)]
        self.restarts = 0
        self.stopping = False
        self._reserved: socket.socket | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._config = b""
        self._token = 0

    async def start(self) -> int:
        """Spawn the workers and wait until each listens; returns the port. Raises (with every
        worker stopped) when one cannot start."""
        self._reserved, listen, port = _reserve(self.settings.grpc.listen)
        data = asdict(self.settings)
        data["grpc"]["listen"] = listen  # port 0: the one reserved here
        self._config = orjson.dumps(data)
        try:
            for w in self.workers:
                await self._spawn(w)
                self._watchers.append(asyncio.create_task(self._watch(w), name=f"extproc-worker-{w.index}"))
            try:
                await asyncio.wait_for(asyncio.gather(*(w.ready for w in self.workers)), READY_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"ext_proc workers did not listen within {READY_TIMEOUT_S:.0f} s") from None
        except BaseException:
            await self.stop(0)
            raise
        return port

    async def _spawn(self, w: _Worker) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            parent_sock.sendall(relay.frame(relay.CONFIG, self._config))
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "extproc.workers", "--fd", str(child_sock.fileno()),
                "--index", str(w.index), pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        w.started = time.monotonic()
        parent_sock.setblocking(False)
        _, w.channel = await self.loop.create_unix_connection(lambda: _ParentChannel(self, w), sock=parent_sock)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def _watch(self, w: _Worker) -> None:
        while True:
            assert w.proc is not None and w.channel is not None
            code = await w.proc.wait()
            with contextlib.suppress(TimeoutError):  # what it wrote before it died is still read
                await asyncio.wait_for(asyncio.shield(w.channel.closed), 5.0)
            lost_streams = self._forget(w)
            if not w.ready.done():
                w.ready.set_exception(RuntimeError(
                    f"ext_proc worker {w.index} exited with code {code} before it listened (see its log above)"))
                return
            if self.stopping:
                return
            self.restarts += 1
            lived = time.monotonic() - w.started
            w.fast_failures = w.fast_failures + 1 if lived < HEALTHY_AFTER_S else 0
            delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** w.fast_failures)
            log.error("ext_proc worker %d (pid %d) exited with code %s after %.1f s (%d streams open: "
                      "Envoy failed them open, their events are lost); starting it again in %.1f s",
                      w.index, w.proc.pid, code, lived, lost_streams, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            w.ready = self.loop.create_future()
            w.ready.add_done_callback(_retrieve)
            w.last_stats = {}
            await self._spawn(w)
            if self.stopping:  # stop() began while this one was starting: it missed it
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)

    def _forget(self, w: _Worker) -> int:
        """A worker is gone: the streams its last snapshot had open are closed, cancelled."""
        last = w.last_stats
        open_streams = max(0, int(last.get("streams_opened", 0)) - int(last.get("streams_closed", 0)))
        self.stats.streams_closed += open_streams
        self.stats.streams_cancelled += open_streams
        w.last_stats = {}
        return open_streams

    def _on_frame(self, w: _Worker, kind: int, payload: bytes) -> None:
        if kind == relay.EVENT:
            try:
                event = UsageEvent.FromString(payload)
            except Exception:
                self.stats.errors["relay_decode"] += 1
                log.exception("worker %d sent an undecodable event (%d bytes): dropped (counted)", w.index, len(payload))
                return
            for sink in self.sinks:
                try:
                    sink.emit(event)
                except Exception:
                    self.stats.errors["sink_emit"] += 1
                    log.exception("sink %r failed to take event %s", sink, event.event_id)
        elif kind == relay.STATS:
            snapshot = orjson.loads(payload)
            if isinstance(snapshot, dict):
                self.stats.add_delta(snapshot, w.last_stats)
                w.last_stats = snapshot
        elif kind == relay.READY:
            if not w.ready.done():
                w.ready.set_result(orjson.loads(payload))
        elif kind == relay.FLUSHED:
            assert w.channel is not None
            fut = w.channel.flushes.pop(relay.token(payload), None)
            if fut is not None and not fut.done():
                fut.set_result(True)
        else:
            raise relay.RelayError(f"frame kind {kind} is not for the parent")

    async def force_flush(self, timeout: float = 30.0) -> bool:
        """Returns once every running worker's events emitted so far were handed to the sinks."""
        waits = []
        for w in self.workers:
            ch = w.channel
            if ch is None or ch.closed.done() or not w.ready.done():
                continue
            self._token += 1
            fut = self.loop.create_future()
            ch.flushes[self._token] = fut
            if ch.send(relay.token_frame(relay.FLUSH, self._token)):
                waits.append(fut)
        if not waits:
            return True
        try:
            return all(await asyncio.wait_for(asyncio.gather(*waits), timeout))
        except TimeoutError:
            return False

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker: each drains its streams (up to `grace`) and sends its last
        events; then the channels are read to their end."""
        self.stopping = True
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = self.loop.time() + grace + STOP_MARGIN_S
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), max(0.1, deadline - self.loop.time()))
            except TimeoutError:
                log.error("worker %d (pid %d) did not stop in time: killed", w.index, w.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            if w.channel is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(w.channel.closed), 5.0)
                if w.channel.transport is not None:
                    w.channel.transport.close()
        for t in self._watchers:
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for w in self.workers:
            if not w.ready.done():
                w.ready.cancel()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def stats_view(self) -> dict[str, Any]:
        return {
            "configured": len(self.workers),
            "running": sum(1 for w in self.workers if w.alive and w.ready.done()),
            "restarts": self.restarts,
            "pids": [w.proc.pid if w.alive else None for w in self.workers],  # type: ignore[union-attr]
            # since each worker's last start: how the kernel spread Envoy's connections
            "streams_opened": [int(w.last_stats.get("streams_opened", 0)) for w in self.workers],
        }


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a restart that failed is logged by the watcher, not by asyncio


def _reserve(listen: str) -> tuple[socket.socket, str, int]:
    """Bind (without listening) the port the workers will share: an early, clear error when it
    is taken, and a fixed port for `host:0`. A socket that does not listen gets no connections."""
    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"grpc.listen {listen!r}: the port is not a number") from None
    family, kind, proto, _, addr = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    return sock, f"{host}:{bound}", bound


# ---- worker ------------------------------------------------------------------------------


class _WorkerChannel(asyncio.Protocol):
    """The worker's end: frames queued in one loop iteration go out in one write."""

    def __init__(self, reader: relay.FrameReader) -> None:
        self.reader = reader
        # the worker's counters, sent with every flush barrier so the parent's are current
        self.snapshot: Callable[[], dict[str, Any]] = dict
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.scheduled = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for kind, payload in self.reader.feed(data):
                if kind != relay.FLUSH:
                    raise relay.RelayError(f"frame kind {kind} is not for a worker")
                self._flush()  # the events before the barrier, then the barrier
                self.send(relay.frame(relay.STATS, orjson.dumps(self.snapshot())))
                self.send(relay.token_frame(relay.FLUSHED, relay.token(payload)))
        except relay.RelayError as exc:
            log.error("bad frame from the parent (%s): closing the channel", exc)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, data: bytes) -> bool:
        if self.lost.done():
            return False
        self.out.append(data)
        self.out_bytes += len(data)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def unsent(self) -> int:
        t = self.transport
        return self.out_bytes + (t.get_write_buffer_size() if t is not None else 0)

    def _flush(self) -> None:
        self.scheduled = False
        if self.out and not self.lost.done() and self.transport is not None:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out.clear()
            self.out_bytes = 0
            self.transport.write(data)

    async def drain(self, timeout: float) -> bool:
        self._flush()
        deadline = time.monotonic() + timeout
        while self.unsent() and not self.lost.done() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return not self.unsent()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RelaySink:
    """A worker's only sink: each event goes to the parent, which stores and meters it."""

    def __init__(self, channel: _WorkerChannel) -> None:
        self.channel = channel
        self.stats = SidecarStats()  # replaced by the worker's own (Sidecar.stats)
        self._logged: dict[str, float] = {}

    def emit(self, event: UsageEvent) -> None:
        try:
            payload = event.SerializeToString()
        except Exception:
            self._count("relay_serialize", "usage event could not be serialized: dropped (counted)")
            return
        if self.channel.unsent() > MAX_UNSENT:
            self._count("relay_overflow", "the parent process is not reading events: dropped (counted)")
        elif not self.channel.send(relay.frame(relay.EVENT, payload)):
            self._count("relay_closed", "the parent process is gone: event not stored (counted)")

    def _count(self, kind: str, message: str) -> None:
        self.stats.errors[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -1e9) >= 10.0:  # emit runs for every request
            self._logged[kind] = now
            log.error("%s (%d so far)", message, self.stats.errors[kind])

    async def start(self) -> None:
        return None

    async def force_flush(self, timeout: float = 30.0) -> bool:
        return await self.channel.drain(timeout)

    async def shutdown(self, timeout: float = 30.0) -> None:
        await self.channel.drain(timeout)


def _read_config(sock: socket.socket, timeout: float = 30.0) -> tuple[dict[str, Any], relay.FrameReader]:
    sock.settimeout(timeout)
    reader = relay.FrameReader()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise relay.RelayError("the parent closed the channel before sending settings")
        for kind, payload in reader.feed(data):
            if kind != relay.CONFIG:
                raise relay.RelayError(f"expected settings, got frame kind {kind}")
            config = orjson.loads(payload)
            if not isinstance(config, dict):
                raise relay.RelayError("settings are not a mapping")
            return config, reader


async def _serve(settings: Settings, sock: socket.socket, reader: relay.FrameReader) -> int:
    from extproc.app import Sidecar

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    _, channel = await loop.create_unix_connection(lambda: _WorkerChannel(reader), sock=sock)
    sink = RelaySink(channel)
    sidecar = Sidecar(settings, relay=sink)
    sink.stats = sidecar.stats
    channel.snapshot = sidecar.stats.snapshot
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    channel.lost.add_done_callback(lambda _: stop.set())
    await sidecar.start()
    channel.send(relay.frame(relay.READY, orjson.dumps({"pid": os.getpid(), "port": sidecar.grpc_port})))

    async def push_stats() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            channel.send(relay.frame(relay.STATS, orjson.dumps(sidecar.stats.snapshot())))

    pusher = asyncio.create_task(push_stats())
    await stop.wait()
    if channel.lost.done():
        log.error("the parent process is gone: stopping (events of the streams still open cannot be stored)")
    pusher.cancel()
    await sidecar.stop()
    channel.send(relay.frame(relay.STATS, orjson.dumps(sidecar.stats.snapshot())))
    await channel.drain(10.0)
    channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extproc.workers",
                                description="Internal: one worker process of `extproc serve` with grpc.workers > 1.")
    p.add_argument("--fd", type=int, required=True, help="the socket to the parent")
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        config, reader = _read_config(sock)
        settings = load_settings(None, config, environ={})
    except (OSError, ValueError, relay.RelayError) as exc:
        print(f"extproc worker {args.index}: no usable settings from the parent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s")
    from extproc.app import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        return runner.run(_serve(settings, sock, reader))


if __name__ == "__main__":
    sys.exit(main())
