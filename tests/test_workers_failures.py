"""Failure paths of the worker relay, in-process: nothing raises into the loop, every event that
does not make it is counted (and logged), and a channel speaking nonsense is closed."""

from __future__ import annotations

import asyncio
import select
import socket
from pathlib import Path

import orjson

from extproc.stats import SidecarStats
from extproc.workers import relay
from extproc.workers.pool import WorkerPool, _ParentChannel, _Worker
from extproc.workers.worker import RelaySink, _WorkerChannel
from tests.stack import RecordingSink, sidecar_settings
from tests.storage_helpers import make_event


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.wrote.set()

    def kinds(self) -> list[int]:
        return [k for data in self.written for k, _ in relay.FrameReader().feed(data)]

    async def wait_for_kind(self, kind: int, timeout: float = 5.0) -> list[int]:
        """The kinds of the frames written so far, once one of `kind` is among them."""
        while kind not in self.kinds():
            self.wrote.clear()
            await asyncio.wait_for(self.wrote.wait(), timeout)
        return self.kinds()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


class _Boom:
    def emit(self, event) -> None:
        raise RuntimeError("sink bug")


async def _pool(tmp_path: Path, sinks: list) -> tuple[WorkerPool, _Worker, _ParentChannel]:
    pool = WorkerPool(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2}), sinks, SidecarStats())
    w = pool.workers[0]
    w.channel = ch = _ParentChannel(pool, w)
    ch.connection_made(_Transport())  # type: ignore[arg-type]
    return pool, w, ch


async def test_parent_counts_undecodable_events_and_sink_failures(tmp_path: Path):
    rec = RecordingSink()
    pool, _, ch = await _pool(tmp_path, [_Boom(), rec])
    ch.data_received(relay.frame(relay.EVENT, b"\xff\xff\xff")  # not a UsageEvent
                     + relay.frame(relay.EVENT, make_event(1).SerializeToString()))
    assert pool.stats.errors == {"relay_decode": 1, "sink_emit": 1}
    assert pool.stats.events_emitted == 2  # counted as they arrive, the bad one too
    assert len(rec.events) == 1  # the broken sink did not cost the other its copy
    assert not ch.transport.is_closing()


async def test_parent_closes_a_channel_that_sends_nonsense(tmp_path: Path):
    pool, _, ch = await _pool(tmp_path, [])
    ch.data_received(bytes([42]) + b"\x00\x00\x00\x00")
    assert pool.stats.errors["relay_protocol"] == 1 and ch.transport.is_closing()
    pool2, _, ch2 = await _pool(tmp_path, [])
    ch2.data_received(relay.frame(relay.STATS, b"{not json"))
    assert pool2.stats.errors["relay_protocol"] == 1 and ch2.transport.is_closing()
    pool3, _, ch3 = await _pool(tmp_path, [])
    ch3.data_received(relay.token_frame(relay.FLUSH, 1))  # a parent-to-worker kind
    assert pool3.stats.errors["relay_protocol"] == 1 and ch3.transport.is_closing()


async def test_a_channel_cut_inside_a_frame_is_counted_and_flushes_fail(tmp_path: Path):
    pool, w, ch = await _pool(tmp_path, [])
    w.ready.set_result({})
    pool.workers = [w]
    flushing = asyncio.ensure_future(pool.force_flush(5))
    assert await ch.transport.wait_for_kind(relay.FLUSH) == [relay.FLUSH]  # the worker is asked
    assert not flushing.done()
    ch.data_received(relay.frame(relay.EVENT, b"x" * 10)[:8])
    ch.connection_lost(None)
    assert await flushing is False
    assert pool.stats.errors["relay_protocol"] == 1


async def test_a_worker_that_dies_leaves_no_streams_open(tmp_path: Path):
    pool, w, ch = await _pool(tmp_path, [])
    ch.data_received(relay.frame(relay.STATS, orjson.dumps({"streams_opened": 5, "streams_closed": 2})))
    assert pool._forget(w) == 3
    assert (pool.stats.streams_opened, pool.stats.streams_closed, pool.stats.streams_cancelled) == (5, 5, 3)


async def test_no_running_worker_closes_the_connection_counted(tmp_path: Path):
    pool = WorkerPool(sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2}), [], SidecarStats())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    pool._listener = listener
    client = socket.create_connection(listener.getsockname())
    try:
        # the connection is in the listener's backlog once it is readable (poll: the suite's
        # file descriptors can be past select()'s 1024)
        waiter = select.poll()
        waiter.register(listener, select.POLLIN)
        assert waiter.poll(5000) == [(listener.fileno(), select.POLLIN)]
        pool._accept()  # no worker process runs
        assert pool.stats.errors["no_worker"] == 1
        client.settimeout(5)
        assert client.recv(1) == b""  # closed, not left hanging
    finally:
        client.close()
        listener.close()


async def test_worker_side_counts_what_it_cannot_relay(tmp_path: Path):
    ch = _WorkerChannel(relay.FrameReader())
    ch.connection_made(_Transport())  # type: ignore[arg-type]
    sink = RelaySink(ch)
    event = make_event(1)
    sink.emit(event)
    await ch.transport.wait_for_kind(relay.EVENT)
    assert len(ch.transport.written) == 1  # queued frames go out in one write
    [(kind, payload)] = relay.FrameReader().feed(ch.transport.written[0])
    assert kind == relay.EVENT and payload == event.SerializeToString()

    ch.out_bytes = 1 << 30  # the parent stopped reading
    sink.emit(make_event(2))
    assert sink.stats.errors["relay_overflow"] == 1
    ch.out_bytes = 0
    ch.connection_lost(None)  # the parent is gone
    sink.emit(make_event(3))
    assert sink.stats.errors["relay_closed"] == 1


async def test_worker_answers_a_flush_after_what_it_emitted_and_rejects_other_frames():
    ch = _WorkerChannel(relay.FrameReader())
    ch.connection_made(_Transport())  # type: ignore[arg-type]
    ch.snapshot = lambda: {"events_emitted": 1}
    ch.send(relay.frame(relay.EVENT, b"e"))
    ch.data_received(relay.token_frame(relay.FLUSH, 9))
    assert await ch.transport.wait_for_kind(relay.FLUSHED) == [relay.EVENT, relay.STATS, relay.FLUSHED]
    ch.data_received(relay.frame(relay.EVENT, b"?"))  # only the parent's kinds are accepted
    assert ch.transport.is_closing()
