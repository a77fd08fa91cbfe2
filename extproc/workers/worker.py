"""A worker process of `grpc.workers` > 1 (`python -m extproc.workers`): the ext_proc service
with one sink, the relay to the main process; connections arrive from the main process (h2)
or on the shared port (grpcio). It stops when told to, or when the main process is gone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from extproc.config import Settings, load_settings
from extproc.events import UsageEvent
from extproc.stats import SidecarStats
from extproc.workers import relay
from extproc.workers.counted import CountedErrors

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5
# Events a worker could not hand to a stalled parent, past which new ones are dropped (counted).
MAX_UNSENT = 256 << 20


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

    def __init__(self, channel: _WorkerChannel, stats: SidecarStats | None = None) -> None:
        self.channel = channel
        self.stats = stats if stats is not None else SidecarStats()  # the worker's: they reach the parent
        self._count = CountedErrors(self.stats, log)

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


class _Adopter:
    """Hand-off mode: connections the parent accepted arrive as file descriptors."""

    def __init__(self, sock: socket.socket, server: Any) -> None:
        self.sock = sock
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 64, 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            log.exception("receiving connections from the parent failed")
            self.close()
            return
        if not data and not fds:
            self.close()  # the parent is gone; the relay channel stops this worker
            return
        for fd in fds:
            task = self.loop.create_task(self._adopt(socket.socket(fileno=fd)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self.server.adopt(conn)
        except Exception:
            log.exception("serving a connection from the parent failed")
            conn.close()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def _serve(settings: Settings, sock: socket.socket, reader: relay.FrameReader,
                 conn_sock: socket.socket | None) -> int:
    from extproc.app import Sidecar

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    _, channel = await loop.create_unix_connection(lambda: _WorkerChannel(reader), sock=sock)
    stats = SidecarStats()
    sidecar = Sidecar(settings, relay=RelaySink(channel, stats), stats=stats)

    def snapshot() -> dict[str, Any]:
        return {**sidecar.stats.snapshot(),
                "connections_closed": getattr(sidecar.grpc_server, "connections_closed", 0)}

    channel.snapshot = snapshot
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    channel.lost.add_done_callback(lambda _: stop.set())
    await sidecar.start()
    adopter = _Adopter(conn_sock, sidecar.grpc_server) if conn_sock is not None else None
    channel.send(relay.frame(relay.READY, orjson.dumps({"pid": os.getpid(), "port": sidecar.grpc_port})))

    async def push_stats() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            channel.send(relay.frame(relay.STATS, orjson.dumps(snapshot())))

    pusher = asyncio.create_task(push_stats())
    await stop.wait()
    if channel.lost.done():
        log.error("the parent process is gone: stopping (events of the streams still open cannot be stored)")
    pusher.cancel()
    if adopter is not None:
        adopter.close()
    await sidecar.stop()
    channel.send(relay.frame(relay.STATS, orjson.dumps(snapshot())))
    await channel.drain(10.0)
    channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extproc.workers",
                                description="Internal: one worker process of `extproc serve` with grpc.workers > 1.")
    p.add_argument("--fd", type=int, required=True, help="the socket to the parent")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--conn-fd", type=int, help="the socket connections arrive on (h2 transport)")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    conn_sock = socket.socket(fileno=args.conn_fd) if args.conn_fd is not None else None
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
        return runner.run(_serve(settings, sock, reader, conn_sock))
