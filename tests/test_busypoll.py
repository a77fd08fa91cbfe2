"""The busy-polling selector: events are still delivered, timeouts still hold, and it only
polls right after activity (an idle loop blocks). What it does is read off the calls it makes to
epoll (a zero timeout is a poll, anything else blocks), so no assertion depends on how busy
the machine is; its CPU cost lives in bench/busypoll_bench.py."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from extproc.config import ConfigError
from extproc.transport import busypoll
from extproc.transport.busypoll import BusyPollSelector
from tests.stack import sidecar_settings


@pytest.fixture
def epoll_calls(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The timeout of every epoll_wait the selector makes, in order."""
    calls: list[float | None] = []
    real = selectors.EpollSelector.select

    def recording(self: selectors.EpollSelector, timeout: float | None = None):  # noqa: ANN202
        calls.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", recording)
    return calls


def _pair(sel: BusyPollSelector) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    sel.register(b, selectors.EVENT_READ)
    return a, b


def _activity(sel: BusyPollSelector, a: socket.socket, b: socket.socket, calls: list) -> None:
    a.send(b"x")
    assert len(sel.select(1.0)) == 1  # activity: the window opens
    b.recv(1)
    calls.clear()


def test_idle_selector_blocks_and_honours_the_timeout(epoll_calls):
    sel = BusyPollSelector(window=1.0)
    a, b = _pair(sel)
    t0 = time.monotonic()
    assert sel.select(0.05) == []
    assert time.monotonic() - t0 >= 0.04
    assert epoll_calls == [0.05]  # one blocking wait: no activity yet, so no polling
    a.close(), b.close(), sel.close()


def test_after_activity_it_polls_within_the_timeout_and_delivers_events(epoll_calls):
    sel = BusyPollSelector(window=60.0)
    a, b = _pair(sel)
    _activity(sel, a, b, epoll_calls)
    t0 = time.monotonic()
    assert sel.select(0.05) == []  # the timeout (a timer) is shorter than the window: it wins
    assert time.monotonic() - t0 >= 0.04
    *polls, last = epoll_calls
    assert polls and set(polls) == {0}  # it polled, without blocking
    assert last is not None and 0 <= last <= 0.05  # what is left of the timeout, not more
    epoll_calls.clear()

    threading.Timer(0.02, a.send, (b"y",)).start()
    assert len(sel.select(None)) == 1  # arrives while polling
    assert set(epoll_calls) == {0}  # caught by a poll: it never blocked
    assert b.recv(1) == b"y"
    epoll_calls.clear()

    assert sel.select(0) == []  # a zero timeout neither polls nor blocks, window or not
    assert epoll_calls == [0]
    a.close(), b.close(), sel.close()


def test_polling_stops_after_the_window(epoll_calls, monkeypatch: pytest.MonkeyPatch):
    # A clock that moves 1 ms per reading: the window is measured in the selector's own steps.
    clock = iter(range(10**9))
    monkeypatch.setattr(busypoll, "time", SimpleNamespace(monotonic=lambda: next(clock) / 1000))
    sel = BusyPollSelector(window=0.02)
    a, b = _pair(sel)
    _activity(sel, a, b, epoll_calls)
    assert sel.select(0.3) == []
    *polls, last = epoll_calls
    assert 10 <= len(polls) <= 20 and set(polls) == {0}  # polled for the 20 ms window
    assert last is not None and 0.27 <= last <= 0.29  # then blocked for the rest of the timeout
    a.close(), b.close(), sel.close()


@pytest.mark.parametrize("grpc, message", [
    ({"busy_poll_us": -1}, "between 0 and 100000"),
    ({"busy_poll_us": 100, "event_loop": "uvloop"}, "needs grpc.event_loop asyncio"),
])
def test_bad_busy_poll_settings_are_refused(tmp_path, grpc, message):
    with pytest.raises(ConfigError, match=message):
        sidecar_settings(tmp_path, grpc=grpc)
