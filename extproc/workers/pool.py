"""The main process's side of `grpc.workers` > 1: spawn the workers, hand them connections
(h2) or a shared port (grpcio), take their events and counters, restart the ones that die, and
stop them all first at shutdown. See extproc/workers/__init__.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import orjson

from extproc.config import Settings
from extproc.events import EventSink, UsageEvent
from extproc.stats import SidecarStats
from extproc.transport.address import parse_listen
from extproc.workers import relay
from extproc.workers.counted import CountedErrors

log = logging.getLogger(__name__)

# a worker loads its tokenizers before it listens
READY_TIMEOUT_S = 120.0
# what a stopping worker gets on top of the streams' grace: its last events to the parent
STOP_MARGIN_S = 20.0
# a worker that lived shorter than this failed "fast": its restart waits twice as long as before
HEALTHY_AFTER_S = 10.0
BACKOFF_S = (0.5, 30.0)
# A running worker sends its counters every 0.5 s from its event loop: silence this long means
# the loop is stuck (and so are its streams, which Envoy times out and fails open): killed, restarted.
HEARTBEAT_TIMEOUT_S = 30.0
# After this long with connections, idle workers while another serves two or more mean Envoy
# runs fewer worker threads than we have workers: said once, in the log.
SPREAD_CHECK_AFTER_S = 60.0


class _Worker:
    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: _ParentChannel | None = None
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.last_stats: dict[str, Any] = {}
        self.last_heard = 0.0  # monotonic time of its last frame
        self.started = 0.0
        self.fast_failures = 0
        self.conn_sock: socket.socket | None = None  # hand-off: the parent's end
        self.assigned = 0  # connections handed to this process

    @property
    def open_connections(self) -> int:
        # closes are reported with the counters, so this never undercounts
        return self.assigned - int(self.last_stats.get("connections_closed", 0))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def running(self) -> bool:
        """Alive and listening (its ready message came)."""
        r = self.ready
        return self.alive and r.done() and not r.cancelled() and r.exception() is None


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
        # h2: the parent accepts and hands connections over; grpcio: workers share the port
        self.handoff = settings.grpc.transport == "h2"
        self._listener: socket.socket | None = None
        self._reserved: socket.socket | None = None
        self._count = CountedErrors(stats, log)
        self._watchers: list[asyncio.Task[None]] = []
        self.heartbeat_timeout = HEARTBEAT_TIMEOUT_S
        self.spread_check_after = SPREAD_CHECK_AFTER_S
        self._started_at = 0.0
        self._spread_warned = False
        self._config = b""
        self._token = 0

    async def start(self) -> int:
        """Spawn the workers and wait until each listens; returns the port. Raises (with every
        worker stopped) when one cannot start."""
        if self.handoff:
            self._listener, listen, port = _listen(self.settings.grpc.listen)
        else:
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
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._accept)
        self._started_at = time.monotonic()
        self._watchers.append(asyncio.create_task(self._check_heartbeats(), name="extproc-worker-heartbeats"))
        return port

    async def _spawn(self, w: _Worker) -> None:
        parent_sock, child_sock = socket.socketpair()
        conn_parent, conn_child = socket.socketpair() if self.handoff else (None, None)
        argv = ["--fd", str(child_sock.fileno()), "--index", str(w.index)]
        fds = [child_sock.fileno()]
        if conn_child is not None:
            argv += ["--conn-fd", str(conn_child.fileno())]
            fds.append(conn_child.fileno())
        try:
            parent_sock.sendall(relay.frame(relay.CONFIG, self._config))
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "extproc.workers", *argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            if conn_parent is not None:
                conn_parent.close()
            raise
        finally:
            child_sock.close()
            if conn_child is not None:
                conn_child.close()
        if conn_parent is not None:
            conn_parent.setblocking(False)
        w.conn_sock, w.assigned = conn_parent, 0
        w.started = w.last_heard = time.monotonic()
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
            self.stats.errors["worker_exited"] += 1  # extproc.ext_proc.errors{kind=worker_exited}
            lived = time.monotonic() - w.started
            w.fast_failures = w.fast_failures + 1 if lived < HEALTHY_AFTER_S else 0
            delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** w.fast_failures)
            log.error("ext_proc worker %d (pid %d) exited with code %s after %.1f s (%d streams open at its "
                      "last report, 0.5 s before at most: Envoy failed them open, their events are lost); "
                      "starting it again in %.1f s",
                      w.index, w.proc.pid, code, lived, lost_streams, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            w.ready = self.loop.create_future()
            w.ready.add_done_callback(_retrieve)
            self._spread_warned, self._started_at = False, time.monotonic()  # look again later
            w.last_stats = {}
            await self._spawn(w)
            if self.stopping:  # stop() began while this one was starting: it missed it
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)

    def _accept(self) -> None:
        """Hand each new connection to the running worker with the fewest open."""
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, ...: the next accept may work
                self._count("accept", f"accepting an ext_proc connection failed: {exc}")
                return
            with conn:
                ready = [w for w in self.workers if w.running and w.conn_sock is not None]
                if not ready:
                    self._count("no_worker", "an ext_proc connection arrived while no worker runs: closed")
                    continue
                w = min(ready, key=lambda x: x.open_connections)
                try:
                    socket.send_fds(w.conn_sock, [b"c"], [conn.fileno()])  # type: ignore[arg-type]
                except OSError as exc:
                    self._count("handoff", f"handing a connection to worker {w.index} failed: {exc}")
                    continue
                w.assigned += 1

    def _forget(self, w: _Worker) -> int:
        """A worker is gone: the streams its last snapshot had open are closed, cancelled."""
        if w.conn_sock is not None:
            w.conn_sock.close()
            w.conn_sock = None
        last = w.last_stats
        open_streams = max(0, int(last.get("streams_opened", 0)) - int(last.get("streams_closed", 0)))
        self.stats.streams_closed += open_streams
        self.stats.streams_cancelled += open_streams
        w.last_stats = {}
        return open_streams

    async def _check_heartbeats(self) -> None:
        while not self.stopping:
            await asyncio.sleep(min(5.0, self.heartbeat_timeout / 4))
            now = time.monotonic()
            for w in self.workers:
                if w.running and now - w.last_heard > self.heartbeat_timeout:
                    self._count("worker_stuck", f"ext_proc worker {w.index} (pid {w.proc.pid}) sent nothing for "
                                f"{now - w.last_heard:.0f} s: its event loop is stuck; killed, to be started again")
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()  # type: ignore[union-attr]
                    w.last_heard = now  # one kill per silence
            self._check_spread(now)

    def _check_spread(self, now: float) -> None:
        if not self.handoff or self._spread_warned or now - self._started_at < self.spread_check_after:
            return
        conns = [w.open_connections for w in self.workers if w.running]
        if conns and max(conns) > 0 and min(conns) == 0:
            self._spread_warned = True
            log.warning("%d of %d ext_proc workers have no connection (connections per worker: %s): Envoy "
                        "opens one per worker thread once that thread carries traffic and keeps it, also "
                        "when a worker restarts (a restart of Envoy spreads them again); with --concurrency "
                        "below %d some workers never get one", conns.count(0), len(conns), conns,
                        len(self.workers))

    def _on_frame(self, w: _Worker, kind: int, payload: bytes) -> None:
        w.last_heard = time.monotonic()
        if kind == relay.EVENT:
            # counted here, not from the workers' counters: exact even for a worker that dies
            # between two reports
            self.stats.events_emitted += 1
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
                snapshot.pop("events_emitted", None)  # counted as events arrive
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
        if self._listener is not None:  # no new connections; the workers drain theirs
            self.loop.remove_reader(self._listener.fileno())
            _close_listener(self._listener)
            self._listener = None
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
            "running": sum(1 for w in self.workers if w.running),
            "restarts": self.restarts,
            "pids": [w.proc.pid if w.alive else None for w in self.workers],  # type: ignore[union-attr]
            # since each worker's last start: how Envoy's connections were spread
            "streams_opened": [int(w.last_stats.get("streams_opened", 0)) for w in self.workers],
            "connections": [w.open_connections if w.alive else 0 for w in self.workers] if self.handoff else None,
        }


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a restart that failed is logged by the watcher, not by asyncio


def _listen(listen: str) -> tuple[socket.socket, str, int]:
    """The parent's listener (hand-off mode): host:port or unix:/path, non-blocking."""
    addr = parse_listen(listen)
    if addr.path:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                os.unlink(addr.path)  # left by a previous run, as asyncio's unix servers do
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
        except OSError:
            sock.close()
            raise
        bound, port = listen, 0
    else:
        sock, bound, port = _bind_tcp(listen, reuse_port=False)
    sock.listen(1024)
    sock.setblocking(False)
    return sock, bound, port


def _close_listener(sock: socket.socket) -> None:
    path = sock.getsockname() if sock.family == socket.AF_UNIX else None
    sock.close()
    if isinstance(path, str) and path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _reserve(listen: str) -> tuple[socket.socket, str, int]:
    """Bind (without listening) the port the workers will share: an early, clear error when it
    is taken, and a fixed port for `host:0`. A socket that does not listen gets no connections."""
    return _bind_tcp(listen, reuse_port=True)


def _bind_tcp(listen: str, *, reuse_port: bool) -> tuple[socket.socket, str, int]:
    where = parse_listen(listen)
    family, kind, proto, _, addr = socket.getaddrinfo(
        where.host or None, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    return sock, f"{listen.rpartition(':')[0]}:{bound}", bound  # as given, brackets kept
