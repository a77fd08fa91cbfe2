"""Soak: mixed traffic for a bounded time through the real stack (simulator <- Envoy <- sidecar
storing to chDB), then every request accounted for.

    make soak                        # 10 minutes
    SOAK_SECONDS=180 make soak       # or: python -m bench.soak --seconds 180

Traffic (each client thread picks per request, seeded): streaming chat (with and without the
client asking for usage), non-streaming chat, streaming and plain completions, embeddings, a
stream the client abandons after a few chunks, and GET /v1/models (not metered). Prints
requests, events stored, lost (requests answered minus events stored: must be 0), and the
sidecar's RSS, open file descriptors and spool size at the start, every minute and at the end;
exits 1 if anything was lost or a request failed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

from bench.procs import Sidecar, start_envoy, start_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TEAMS = ("soak-search", "soak-ads", "soak-chat", "soak-batch")
KINDS = ("chat-stream", "chat-stream-usage", "chat", "completion-stream", "completion", "embedding",
         "chat-stream-abort", "models")
WEIGHTS = (30, 10, 20, 8, 8, 10, 6, 8)


def _proc_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += _proc_tree(int(child))
    except OSError:
        pass
    return out


def rss_bytes(pid: int) -> int:
    total = 0
    for p in _proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in _proc_tree(pid) if os.path.isdir(f"/proc/{p}/fd"))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: Counter = field(default_factory=Counter)  # kind -> requests answered
    # team -> requests answered: each must be one stored event (GET /v1/models too, flagged
    # metered=false)
    metered: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def add(self, kind: str, team: str) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.metered[team] += 1


def client_loop(url: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    clients = {t: openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60,
                                default_headers={"x-team": t, "x-feature": f"f{seed % 3}"}) for t in TEAMS}
    while not stop.is_set():
        team = rng.choice(TEAMS)
        kind = rng.choices(KINDS, WEIGHTS)[0]
        c = clients[team]
        msgs = [{"role": "user", "content": f"soak {seed} {rng.random():.6f} " * rng.randint(1, 20)}]
        max_tokens = rng.randint(4, 48)
        try:
            if kind == "chat-stream":
                for _ in c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, stream=True):
                    pass
            elif kind == "chat-stream-usage":
                for _ in c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, stream=True,
                                                   stream_options={"include_usage": True}):
                    pass
            elif kind == "chat":
                c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens)
            elif kind == "completion-stream":
                for _ in c.completions.create(model=MODEL, prompt=msgs[0]["content"], max_tokens=max_tokens,
                                              stream=True):
                    pass
            elif kind == "completion":
                c.completions.create(model=MODEL, prompt=msgs[0]["content"], max_tokens=max_tokens)
            elif kind == "embedding":
                c.embeddings.create(model=MODEL, input=[msgs[0]["content"], "second input"])
            elif kind == "chat-stream-abort":
                stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, stream=True)
                for i, _ in enumerate(stream):
                    if i >= 2:
                        break
                stream.close()  # the client goes away mid-stream: still one event, flagged
            else:
                c.models.list()
            tally.add(kind, team)
        except Exception as exc:  # noqa: BLE001 (a soak counts every failure, whatever it is)
            with tally.lock:
                tally.errors.append(f"{kind}: {exc!r}")


def snapshot(sidecar: Sidecar) -> dict[str, int]:
    return {"rss": rss_bytes(sidecar.pid), "fds": open_fds(sidecar.pid),
            "spool": dir_bytes(sidecar.workdir / "spool")}


def _fmt(s: dict[str, int]) -> str:
    return f"RSS {s['rss'] / 2**20:.1f} MiB, fds {s['fds']}, spool {s['spool'] / 2**20:.2f} MiB"


def run(seconds: float, clients: int, tokens_per_second: float, workdir: Path) -> int:
    sim, sim_port = start_sim(workdir, tokens_per_second)
    sidecar = Sidecar(workdir / "sidecar", "h2", settings=(("batch", "flush_interval_ms", 1000),)).start()
    envoy, listen, _admin = start_envoy(workdir, sim_port, extproc_address=sidecar.address)
    url = f"http://127.0.0.1:{listen}"
    tally = Tally()
    stop = threading.Event()
    try:
        start = snapshot(sidecar)
        print(f"soak: {seconds:.0f} s, {clients} clients, simulator at {tokens_per_second:g} tok/s per stream")
        print(f"start: {_fmt(start)}", flush=True)
        threads = [threading.Thread(target=client_loop, args=(url, i, stop, tally), daemon=True)
                   for i in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        next_report = t0 + 60
        while (now := time.monotonic()) < t0 + seconds:
            time.sleep(min(1.0, t0 + seconds - now))
            if time.monotonic() >= next_report:
                next_report += 60
                with tally.lock:
                    n = sum(tally.sent.values())
                print(f"  {time.monotonic() - t0:5.0f} s: {n} requests, {len(tally.errors)} errors, "
                      f"{_fmt(snapshot(sidecar))}", flush=True)
        stop.set()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        stats = sidecar.settle(30)
        end = snapshot(sidecar)
        stored = sidecar.stored_by_team()
    finally:
        stop.set()
        envoy.stop()
        sidecar.stop()
        sim.stop()
    requests = sum(tally.sent.values())
    metered = sum(tally.metered.values())
    events = sum(stored.get(t, {}).get("requests", 0) for t in TEAMS)
    lost = metered - events
    per_team = {t: (tally.metered[t], stored.get(t, {}).get("requests", 0)) for t in TEAMS}
    print(f"end:   {_fmt(end)}")
    print(f"requests {requests} in {elapsed:.0f} s ({requests / elapsed:.0f}/s): "
          + ", ".join(f"{k} {v}" for k, v in sorted(tally.sent.items())))
    print(f"requests answered {metered}, events stored {events}, lost {lost}; "
          f"per team (sent, stored): {per_team}")
    print(f"sidecar: {stats.get('events_emitted')} events emitted, storage {stats.get('storage', {}).get('events_inserted')} "
          f"inserted, {stats.get('storage', {}).get('events_dropped')} dropped, "
          f"{stats.get('storage', {}).get('backlog')} backlog")
    print(f"errors {len(tally.errors)}" + (f": {tally.errors[:5]}" if tally.errors else ""))
    return 0 if lost == 0 and not tally.errors else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    p.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", "6")))
    p.add_argument("--tokens-per-second", type=float, default=200.0, help="simulator speed per stream")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.clients <= 0:
        p.error("--seconds and --clients must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="extproc-soak-"))
    try:
        return run(args.seconds, args.clients, args.tokens_per_second, workdir)
    finally:
        if args.keep_workdir:
            print(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
