"""The asyncio side of the h2 transport: sockets in, bytes to the connection core, bytes out.

Each accepted socket gets one `_Protocol`, which reads into a buffer of its own
(`get_buffer` / `buffer_updated`), hands the bytes to its `H2Connection` (h2conn.py: all of
HTTP/2 and gRPC, and the sessions' answers, happen inside that call) and writes what the core
queued in one `transport.write`. The only other thing it does for the core is run timers
(grpc-timeout). `H2GrpcServer` binds listeners, adopts sockets handed over by the worker pool,
and drains like grpc.aio.Server.stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import cast

from extproc.transport.address import parse_listen
from extproc.transport.h2conn import MAX_CONCURRENT_STREAMS, H2Connection
from extproc.transport.session import SessionFactory
from extproc.transport.timers import Timer

# Socket reads go into one reusable buffer per connection. With a plain Protocol, asyncio
# allocates 256 KiB per recv(), which glibc serves by mmap, then mremap to size, then munmap:
# three syscalls and fresh pages per read. Below glibc's mmap threshold, so the copy we take
# of each read comes from the heap.
READ_BUFFER = 64 << 10


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.conn = H2Connection(server.sessions, max_concurrent_streams=server.max_concurrent_streams,
                                 schedule=self._call_later, on_output=self.flush)
        self.lost: asyncio.Future[None] = server.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though not always an asyncio.Transport subclass (uvloop's is not)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.conn.peer = f"ipv4:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix:{peer or ''}"
        self.server.connections.add(self)
        self.conn.initiate()
        if self.server.stopping:
            self.conn.start_drain()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # a copy: the core keeps slices of it (payloads, partial frames) past this call
        self.conn.receive(self.read_buffer[:nbytes].tobytes())
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.conn.connection_lost()
        server = self.server
        server.connections.discard(self)
        server.connections_closed += 1
        if not self.lost.done():
            self.lost.set_result(None)
        if server.stopping:
            server.check_idle()

    def flush(self) -> None:
        """Write what the core queued; close the socket when the core is done with it."""
        conn = self.conn
        if conn.out and not self.closing:
            assert self.transport is not None
            self.transport.write(conn.data_to_send())
        if conn.closed:
            self.close()
        if self.server.stopping:
            self.server.check_idle()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.conn.close()
        if self.conn.out:
            assert self.transport is not None
            self.transport.write(self.conn.data_to_send())
        if self.transport is not None:
            self.transport.close()

    def _call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.server.loop.call_later(delay, self._fire, callback)

    def _fire(self, callback: Callable[[], None]) -> None:
        callback()
        self.flush()


class H2GrpcServer:
    """Serves /envoy.service.ext_proc.v3.ExternalProcessor/Process, each stream by a session
    from `sessions`; `stop(grace)` drains like grpc.aio.Server.stop."""

    def __init__(self, sessions: SessionFactory, *, max_concurrent_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.sessions = sessions
        self.max_concurrent_streams = max_concurrent_streams
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Protocol] = set()
        self.connections_closed = 0
        self.stopping = False
        self._idle: asyncio.Event | None = None  # set by stop() once no stream is open
        self._server: asyncio.Server | None = None

    async def listen(self, listen: str) -> int:
        addr = parse_listen(listen)
        if addr.path:
            self._server = await self.loop.create_unix_server(lambda: _Protocol(self), addr.path)
            return 0
        self._server = await self.loop.create_server(
            lambda: _Protocol(self), addr.host or None, addr.port, reuse_address=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted (worker processes: extproc/workers/)."""
        if self.stopping:
            sock.close()
            return
        await self.loop.connect_accepted_socket(lambda: _Protocol(self), sock)

    def open_streams(self) -> int:
        return sum(len(c.conn.streams) for c in self.connections)

    def check_idle(self) -> None:
        if self._idle is not None and not self.open_streams():
            self._idle.set()

    async def stop(self, grace: float | None) -> None:
        """GOAWAY every connection, let in-flight streams finish for up to `grace` seconds, then
        reset the rest (their sessions close, so their events are emitted) and close."""
        self.stopping = True
        self._idle = asyncio.Event()
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.conn.start_drain()  # streams accepted while this GOAWAY is in flight count too
            c.flush()
        self.check_idle()
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for c in list(self.connections):
            c.conn.final_goaway()
            c.conn.cancel_streams()
            c.flush()
        lost = [c.lost for c in self.connections]
        for c in list(self.connections):
            c.close()
        if lost:
            await asyncio.wait(lost, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


async def start_h2_server(sessions: SessionFactory, listen: str | None, *,
                          max_concurrent_streams: int = MAX_CONCURRENT_STREAMS) -> tuple[H2GrpcServer, int]:
    """Bind `listen` (host:port, port 0 = ephemeral, or unix:/path) and serve each stream with a
    session from `sessions` (ExtProcService.open_stream). `listen` None: no listener,
    connections come through `adopt` (worker processes). Returns the server and the bound port
    (0 for unix sockets and no listener)."""
    server = H2GrpcServer(sessions, max_concurrent_streams=max_concurrent_streams)
    port = await server.listen(listen) if listen is not None else 0
    return server, port
