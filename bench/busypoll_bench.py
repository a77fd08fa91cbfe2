"""CPU cost of the busy-polling selector when nothing arrives: what tests/test_busypoll.py
checks by its calls to epoll, measured here in CPU seconds (a target a shared machine's load
would make flaky in a test).

    python -m bench.busypoll_bench [--repeat 5]

idle          select(0.2) with no activity yet: it must block (CPU ~0)
after_window  select(0.3) right after activity, window 20 ms: it polls ~20 ms, then blocks

Targets (the median of --repeat runs): idle below 0.02 s of CPU, after_window below 0.15 s.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import sys
import time

from extproc.transport.busypoll import BusyPollSelector

TARGETS = {"idle": 0.02, "after_window": 0.15}


def _cpu_of_select(window: float, timeout: float, active: bool) -> float:
    sel = BusyPollSelector(window=window)
    a, b = socket.socketpair()
    b.setblocking(False)
    sel.register(b, selectors.EVENT_READ)
    try:
        if active:
            a.send(b"x")
            sel.select(1.0)
            b.recv(1)
        c0 = time.process_time()
        sel.select(timeout)
        return time.process_time() - c0
    finally:
        a.close()
        b.close()
        sel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    runs = {"idle": lambda: _cpu_of_select(1.0, 0.2, active=False),
            "after_window": lambda: _cpu_of_select(0.02, 0.3, active=True)}
    ok = True
    for name, run in runs.items():
        cpu = statistics.median(run() for _ in range(args.repeat))
        met = cpu < TARGETS[name]
        ok &= met
        print(f"{name:13} cpu {cpu * 1000:7.2f} ms  target < {TARGETS[name] * 1000:.0f} ms  "
              f"{'ok' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
