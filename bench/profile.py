"""Where the sidecar's time goes: py-spy against a real `extproc serve` (sync mode, h2 transport)
behind Envoy, under the JSON (c=10) and the streaming workload.

    python -m bench.profile [--seconds 8] [--method auto|py-spy|cprofile] [--top 15]

py-spy samples the running process from outside (needs ptrace). Without py-spy, or when ptrace
is refused, the sidecar runs under cProfile instead (main thread only, and slower: compare
functions with each other, not with the py-spy figures).
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs, scenario
from bench.procs import Sidecar
from bench.scenario import Bench

PROFILED = ("json-c10", "sse")
RATE = 200


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


# Leaf frames of threads that wait (py-spy's own idle detection does not flag them here): the
# event loop in epoll, pool workers and the batcher blocked on a queue or condition.
IDLE_LEAVES = ("EpollSelector.select ", "Condition.wait ", "_worker (concurrent/futures/thread.py",
               "Event.wait ", "Queue.get ", "Thread._wait_for_tstate_lock ", "Thread.join ")


def parse_raw(text: str, top: int) -> tuple[int, list[dict[str, Any]]]:
    """py-spy raw output ('f1;f2;...;leaf count' per line) -> (busy samples, top functions by own
    time); samples whose leaf is a wait (IDLE_LEAVES) are left out."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        samples += n
        own[frames[-1]] += n
        for fr in set(frames):
            total[fr] += n
    return samples, [{"function": f, "own_pct": 100 * n / samples, "total_pct": 100 * total[f] / samples}
                     for f, n in own.most_common(top)] if samples else []


def parse_pstats(path: Path, top: int) -> tuple[int, list[dict[str, Any]]]:
    st = pstats.Stats(str(path))
    entries = {k: v for k, v in st.stats.items()  # type: ignore[attr-defined]
               if "of 'select.epoll' objects" not in k[2]}  # the loop waiting
    total_tt = sum(v[2] for v in entries.values()) or 1.0
    cum = {k: v[3] for k, v in entries.items()}
    rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return int(total_tt * 1e3), [
        {"function": f"{fn} ({Path(file).name}:{line})", "own_pct": 100 * v[2] / total_tt,
         "total_pct": 100 * cum[(file, line, fn)] / total_tt} for (file, line, fn), v in rows]


def _load_in_background(b: Bench, port: int, wl: scenario.Workload, seconds: float) -> threading.Thread:
    team = f"profile.{wl.name}"
    fn = scenario._sse_load if wl.stream else scenario._json_load
    t = threading.Thread(target=fn, args=(b, port, team, wl, seconds), daemon=True)
    t.start()
    return t


def profile_sync_h2(b: Bench, seconds: float, method: str = "auto", top: int = 15) -> dict[str, Any]:
    spy = py_spy() if method in ("auto", "py-spy") else None
    if method == "py-spy" and spy is None:
        raise SystemExit("py-spy not installed (pip install py-spy, or .[bench])")
    wls = scenario.workloads(seconds + 2, seconds + 2, 50)
    result: dict[str, Any] = {"what": "sidecar, sync mode, h2 transport, behind Envoy", "top": {}, "samples": {},
                              "unit": "busy samples"}
    if spy is not None:
        try:
            return _with_py_spy(b, spy, wls, seconds, top, result)
        except RuntimeError as exc:
            if method == "py-spy":
                raise
            print(f"profile: py-spy failed ({exc}); falling back to cProfile", flush=True)
    return _with_cprofile(b, wls, seconds, top, result)


def _with_py_spy(b: Bench, spy: str, wls: dict[str, scenario.Workload], seconds: float, top: int,
                 result: dict[str, Any]) -> dict[str, Any]:
    result["method"] = (f"py-spy record, {RATE} Hz, {seconds:g} s per workload, --function (by function), all "
                        "threads; samples waiting in epoll / a queue / a condition left out; % of busy samples.")
    sidecar = Sidecar(b.workdir / "profile-pyspy", "h2").start()
    try:
        for name in PROFILED:
            wl = wls[name]
            envoy, port, _ = procs.start_envoy(b.workdir, b.sim_stream_port if wl.stream else b.fixed_port,
                                               extproc_address=sidecar.address)
            try:
                load = _load_in_background(b, port, wl, seconds + 2)
                out = b.workdir / f"pyspy-{name}.txt"
                proc = subprocess.run([spy, "record", "--pid", str(sidecar.pid), "--duration", str(int(seconds)),
                                       "--format", "raw", "--function", "--rate", str(RATE), "-o", str(out)],
                                      capture_output=True, text=True, timeout=seconds + 60)
                load.join(seconds + 30)
            finally:
                envoy.stop()
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[0] if (proc.stderr or proc.stdout)
                                   else f"exit {proc.returncode}")
            result["samples"][name], result["top"][name] = parse_raw(out.read_text(), top)
    finally:
        sidecar.stop()
    return result


def _with_cprofile(b: Bench, wls: dict[str, scenario.Workload], seconds: float, top: int,
                   result: dict[str, Any]) -> dict[str, Any]:
    result["method"] = (f"cProfile in the sidecar process (py-spy unavailable), {seconds:g} s per workload; "
                        "own = tottime, total = cumtime, % of all tottime but epoll waits (main thread only).")
    result["unit"] = "ms of own time"
    for name in PROFILED:
        wl = wls[name]
        out = b.workdir / f"cprofile-{name}.prof"
        sidecar = Sidecar(b.workdir / f"profile-cprofile-{name}", "h2",
                          python_args=("-m", "cProfile", "-o", str(out))).start()
        try:
            envoy, port, _ = procs.start_envoy(b.workdir, b.sim_stream_port if wl.stream else b.fixed_port,
                                               extproc_address=sidecar.address)
            try:
                _load_in_background(b, port, wl, seconds).join(seconds + 30)
            finally:
                envoy.stop()
        finally:
            sidecar.stop(signal.SIGTERM)  # clean exit: cProfile writes its file
        result["samples"][name], result["top"][name] = parse_pstats(out, top)
    return result


def main() -> None:
    from bench import report, run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--method", choices=("auto", "py-spy", "cprofile"), default="auto")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    args = p.parse_args()
    from bench import wrk

    loadgen = args.loadgen if args.loadgen != "auto" else ("wrk" if wrk.available() else "python")
    workdir = Path(tempfile.mkdtemp(prefix="extproc-profile-"))
    b = run.setup(workdir, loadgen, 100.0)
    try:
        prof = profile_sync_h2(b, args.seconds, args.method, args.top)
    finally:
        for proc in b.procs:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(report.profile_lines(prof)))


if __name__ == "__main__":
    main()
