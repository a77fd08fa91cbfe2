"""The busy-polling selector: events are still delivered, timeouts still hold, and it only
polls right after activity (an idle loop blocks)."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from extproc.config import ConfigError
from extproc.transport.busypoll import BusyPollSelector
from tests.stack import sidecar_settings


def _pair(sel: BusyPollSelector) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    sel.register(b, selectors.EVENT_READ)
    return a, b


def test_idle_selector_blocks_and_honours_the_timeout():
    sel = BusyPollSelector(window=1.0)
    a, b = _pair(sel)
    t0, c0 = time.monotonic(), time.process_time()
    assert sel.select(0.05) == []
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    assert 0.04 <= wall < 0.5
    assert cpu < 0.02  # blocked in epoll: no activity yet, so no polling
    a.close(), b.close(), sel.close()


def test_after_activity_it_polls_within_the_timeout_and_delivers_events():
    sel = BusyPollSelector(window=5.0)
    a, b = _pair(sel)
    a.send(b"x")
    assert len(sel.select(1.0)) == 1  # activity: the window opens
    b.recv(1)
    t0 = time.monotonic()
    assert sel.select(0.05) == []  # the timeout (a timer) is shorter than the window: it wins
    assert 0.04 <= time.monotonic() - t0 < 0.5
    threading.Timer(0.02, a.send, (b"y",)).start()
    t0 = time.monotonic()
    assert len(sel.select(None)) == 1  # arrives while polling
    assert time.monotonic() - t0 < 1.0
    b.recv(1)
    t0 = time.monotonic()
    assert sel.select(0) == []  # a zero timeout neither polls nor blocks, window or not
    assert time.monotonic() - t0 < 0.01
    a.close(), b.close(), sel.close()


def test_polling_stops_after_the_window():
    sel = BusyPollSelector(window=0.02)
    a, b = _pair(sel)
    a.send(b"x")
    sel.select(1.0)
    b.recv(1)
    c0 = time.process_time()
    assert sel.select(0.3) == []
    assert time.process_time() - c0 < 0.15  # polled ~20 ms, then blocked for the rest
    a.close(), b.close(), sel.close()


@pytest.mark.parametrize("grpc, message", [
    ({"busy_poll_us": -1}, "between 0 and 100000"),
    ({"busy_poll_us": 100, "event_loop": "uvloop"}, "needs grpc.event_loop asyncio"),
])
def test_bad_busy_poll_settings_are_refused(tmp_path, grpc, message):
    with pytest.raises(ConfigError, match=message):
        sidecar_settings(tmp_path, grpc=grpc)
