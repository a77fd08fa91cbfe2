"""What is measured: configurations (the path a request takes) x workloads, and one measured run.

Every request carries `x-team: <config>.<workload>`, so the events the sidecar stored can be
counted per run through its admin API and compared with the requests Envoy received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, procs, wrk
from bench.procs import Proc, Sidecar

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # direct | envoy | sidecar
    mode: str = "sync"  # sidecar: sync | observe (observability mode) | hybrid (sync request, observed response)
    transport: str = ""  # sidecar: grpcio | h2
    uds: bool = False  # Envoy -> sidecar over a Unix socket
    json_upstream: str = "fixed"  # fixed | sim
    # overrides of Envoy's ext_proc processing_mode (lever experiments, not full metering)
    processing_mode: tuple[tuple[str, str], ...] = ()
    # sidecar settings ((section, key, value), ...) over the defaults (lever experiments)
    settings: tuple[tuple[str, str, Any], ...] = ()
    workloads: tuple[str, ...] = ("json-c1", "json-c10", "sse")
    # Envoy worker threads (--concurrency); each opens its own connection to the sidecar
    envoy_concurrency: int = 1
    about: str = ""
    # lever experiments beyond the default run (make bench stays under 10 minutes): --levers
    lever: bool = False
    # a policy file (keys, budgets, rate limits) enforced on every request: "local" state in the
    # sidecar, or "redis" (a redis-server started for the run)
    policy: str = ""


# sse-x4 (4x the streams) only where it says most (time budget): Envoy alone and the two h2 modes
# that keep the request synchronous
ALL = ("json-c1", "json-c10", "sse", "sse-x4")
CONFIGS: dict[str, Config] = {c.name: c for c in (
    Config("direct-sim", "direct", json_upstream="sim", workloads=("json-c10",),
           about="client -> simulator (tps 0): can the simulator serve the JSON workload?"),
    Config("direct", "direct", about="client -> upstream"),
    Config("envoy", "envoy", workloads=ALL, about="Envoy alone (no ext_proc): the baseline"),
    Config("sync-grpcio", "sidecar", "sync", "grpcio", about="ext_proc synchronous, grpcio server"),
    Config("sync-h2", "sidecar", "sync", "h2", workloads=ALL, about="ext_proc synchronous, lean h2 server"),
    Config("sync-h2-arrow", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10", "sse"),
           settings=(("storage", "insert_format", "arrow"), ("batch", "flush_interval_ms", 1000),
                     ("batch", "max_batch_size", 5000)),
           about="lever: as sync-h2 with the storage path before it was changed (events decoded "
                 "and converted to Arrow in the sidecar, a flush every 1 s / 5000 events)", lever=True),
    Config("sync-h2-uvloop", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10", "sse"),
           settings=(("grpc", "event_loop", "uvloop"),), about="lever: as sync-h2 on uvloop", lever=True),
    Config("sync-h2-resphdrs", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10", "sse"),
           processing_mode=(("response_header_mode", "SEND"),),
           about="lever: as sync-h2 with response headers sent to the sidecar (before: status and "
                 "content type from them, one more message per request)", lever=True),
    Config("sync-h2-busypoll", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10", "sse"),
           settings=(("grpc", "busy_poll_us", 500),),
           about="lever: as sync-h2, polling epoll without blocking for 500 us after each activity",
           lever=True),
    Config("sync-h2-uds", "sidecar", "sync", "h2", uds=True, workloads=("json-c1", "json-c10"),
           about="as sync-h2, over a Unix socket", lever=True),
    Config("sync-h2-hdrs", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10"),
           processing_mode=(("response_header_mode", "SKIP"), ("request_body_mode", "NONE"),
                            ("response_body_mode", "NONE")),
           about="lever: request headers only, 1 message/request (what a synchronous budget check "
                 "costs; NOT full metering: no tokens, events flagged client_aborted)"),
    Config("sync-h2-envoy2", "sidecar", "sync", "h2", workloads=("json-c10", "sse"), envoy_concurrency=2,
           about="lever baseline: as sync-h2 with Envoy on 2 worker threads (2 connections to the "
                 "sidecar); its ratio is against Envoy alone on 2 threads", lever=True),
    Config("sync-h2-workers2", "sidecar", "sync", "h2", workloads=("json-c10", "sse"), envoy_concurrency=2,
           settings=(("grpc", "workers", 2),),
           about="lever: as sync-h2-envoy2 with 2 sidecar worker processes on the port (SO_REUSEPORT)",
           lever=True),
    Config("observe-h2", "sidecar", "observe", "h2", about="observability mode, lean h2 server"),
    Config("observe-h2-resphdrs", "sidecar", "observe", "h2", workloads=("json-c1", "json-c10", "sse"),
           processing_mode=(("response_header_mode", "SEND"),),
           about="lever: as observe-h2 with response headers sent to the sidecar", lever=True),
    Config("observe-grpcio", "sidecar", "observe", "grpcio", workloads=("json-c10", "sse"),
           about="observability mode, grpcio server"),
    Config("hybrid-h2", "sidecar", "hybrid", "h2", workloads=ALL,
           about="hybrid: request synchronous (headers + body), response observed; lean h2 server"),
    Config("hybrid-grpcio", "sidecar", "hybrid", "grpcio", workloads=("json-c10", "sse"),
           about="hybrid, grpcio server"),
    Config("sync-h2-policy", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10"), policy="local",
           about="as sync-h2 with budgets and rate limits enforced on every request (prompt counted, "
                 "worst case reserved, settled at the end), state in the sidecar"),
    Config("sync-h2-policy-redis", "sidecar", "sync", "h2", workloads=("json-c1", "json-c10"), policy="redis",
           about="as sync-h2-policy with the state in Redis (one Lua script to reserve, one to settle)"),
    Config("envoy-end", "envoy", about="Envoy alone again, last: drift over the run"),
)}
DEFAULT_CONFIGS = tuple(name for name, c in CONFIGS.items() if not c.lever)
LEVER_CONFIGS = tuple(name for name, c in CONFIGS.items() if c.lever)
BASELINES = ("envoy", "envoy-end")
PAIRED_KEYS = ("rps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "loadavg")


@dataclass(frozen=True)
class Workload:
    name: str
    stream: bool
    concurrency: int
    seconds: float
    max_requests: int


def workloads(seconds: float, sse_seconds: float, streams: int) -> dict[str, Workload]:
    return {w.name: w for w in (
        Workload("json-c1", False, 1, seconds, 200_000),
        Workload("json-c10", False, 10, seconds, 500_000),
        Workload("sse", True, streams, sse_seconds, 20_000),
        # 4x the streams, towards the sidecar's saturation (per-event cost falls as messages batch)
        Workload("sse-x4", True, 4 * streams, sse_seconds, 80_000),
    )}


@dataclass
class Bench:
    """Shared across configurations: upstream processes, request bodies, the load generator."""

    workdir: Path
    loadgen: str  # wrk | python
    fixed_port: int
    sim_json_port: int
    sim_stream_port: int
    json_body: bytes
    sse_body: bytes
    warmup_s: float = 1.0
    # run Envoy alone right before each sidecar run and compare with that (drift on a shared box)
    paired: bool = True
    procs: list[Proc] = field(default_factory=list)


@dataclass
class Mark:
    t: float
    sidecar_cpu: float = 0.0
    sidecar_sys: float = 0.0
    sidecar_threads: dict[str, float] = field(default_factory=dict)
    sidecar_stats: dict[str, Any] = field(default_factory=dict)
    envoy_cpu: float = 0.0


def _mark(sidecar: Sidecar | None, envoy: Proc | None) -> Mark:
    m = Mark(time.monotonic())
    if sidecar is not None:
        m.sidecar_stats = sidecar.settle()
        m.sidecar_cpu = procs.cpu_seconds(sidecar.pid)
        m.sidecar_sys = procs.sys_seconds(sidecar.pid)
        m.sidecar_threads = procs.thread_cpu(sidecar.pid)
    if envoy is not None:
        m.envoy_cpu = envoy.cpu()
    return m


# What the openai Python SDK (3.57) sends besides host, content-type and content-length: real
# clients carry a dozen headers the sidecar never reads, and Envoy forwards them all by default.
SDK_HEADERS = {
    "accept-encoding": "gzip, deflate, zstd", "authorization": "Bearer sk-bench-0123456789abcdef",
    "accept": "application/json", "user-agent": "OpenAI/Python 3.57.0", "x-stainless-lang": "python",
    "x-stainless-package-version": "3.57.0", "x-stainless-os": "Linux", "x-stainless-arch": "x64",
    "x-stainless-runtime": "CPython", "x-stainless-runtime-version": "3.11.7", "x-stainless-async": "false",
    "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
}


def _json_load(b: Bench, port: int, team: str, wl: Workload, seconds: float) -> loadgen.LoadResult:
    headers = {**SDK_HEADERS, "x-team": team, "x-feature": "bench"}
    if b.loadgen == "wrk":
        return wrk.run(port, CHAT, b.json_body, headers, wl.concurrency, seconds, str(b.workdir / "wrk.lua"))
    data = loadgen.post_request(port, CHAT, b.json_body, headers)
    return asyncio.run(loadgen.http_load(port, data, wl.max_requests, wl.concurrency, seconds))


def _sse_load(b: Bench, port: int, team: str, wl: Workload, seconds: float) -> loadgen.StreamResult:
    data = loadgen.post_request(port, CHAT, b.sse_body, {**SDK_HEADERS, "x-team": team, "x-feature": "bench"})
    return asyncio.run(loadgen.sse_load(port, data, wl.max_requests, wl.concurrency, seconds))


def run_workload(b: Bench, cfg: Config, wl: Workload, sidecar: Sidecar | None) -> dict[str, Any]:
    team = f"{cfg.name}.{wl.name}"
    if wl.stream:
        up_port = b.sim_stream_port
    else:
        up_port = b.sim_json_port if cfg.json_upstream == "sim" else b.fixed_port
    envoy: Proc | None = None
    port = up_port
    if cfg.kind != "direct":
        envoy, port, admin = procs.start_envoy(
            b.workdir, up_port, extproc_address=sidecar.address if sidecar else "", mode=cfg.mode,
            processing_mode=dict(cfg.processing_mode), concurrency=cfg.envoy_concurrency)
    load = _sse_load if wl.stream else _json_load
    try:
        first = sidecar.stats() if sidecar is not None else {}
        load(b, port, team, wl, b.warmup_s)
        before = _mark(sidecar, envoy)
        res = load(b, port, team, wl, wl.seconds)
        after = _mark(sidecar, envoy)
        out: dict[str, Any] = {"config": cfg.name, "workload": wl.name, "team": team,
                               "concurrency": wl.concurrency, "loadavg": _loadavg()}
        if envoy is not None:
            st = procs.envoy_stats(admin)
            ext = procs.ext_proc_stats(st)
            out.update(envoy_rq=st.get("http.ingress.downstream_rq_total", 0),
                       # requests the client gave up on (wrk closing its connections at the end)
                       client_abandoned=st.get("http.ingress.downstream_rq_total", 0)
                       - st.get("http.ingress.downstream_rq_completed", 0),
                       ext_proc=ext,
                       ext_proc_errors=sum(ext.get(k, 0) for k in procs.EXT_PROC_ERRORS),
                       extproc_cluster=procs.extproc_cluster_problems(st),
                       envoy_cpu_s=after.envoy_cpu - before.envoy_cpu)
    finally:
        if envoy is not None:
            envoy.stop()
    if sidecar is not None:
        s0, s1 = before.sidecar_stats, after.sidecar_stats
        msgs = sum(s1["messages"].values()) - sum(s0["messages"].values())
        out.update(
            sidecar_cpu_s=after.sidecar_cpu - before.sidecar_cpu,
            sidecar_sys_s=after.sidecar_sys - before.sidecar_sys,
            sidecar_loop_cpu_s=after.sidecar_threads.get("main", 0) - before.sidecar_threads.get("main", 0),
            sidecar_messages=msgs,
            # over the whole run, warm-up included, like Envoy's request count
            run_streams_opened=s1["streams_opened"] - first["streams_opened"],
            run_events_emitted=s1["events_emitted"] - first["events_emitted"],
            streams_cancelled=s1["streams_cancelled"] - s0["streams_cancelled"],
            sidecar_errors=sum(s1["errors"].values()) - sum(s0["errors"].values()),
            events_emitted=s1["events_emitted"] - s0["events_emitted"],
        )
        if "workers" in s1:  # how the kernel spread Envoy's connections, in streams per worker
            out["worker_streams"] = [a - b for a, b in zip(s1["workers"]["streams_opened"],
                                                           s0["workers"]["streams_opened"], strict=False)]
    out.update(_stream_fields(res, cfg) if isinstance(res, loadgen.StreamResult) else _json_fields(res))
    _per_unit(out)
    return out


def _json_fields(r: loadgen.LoadResult) -> dict[str, Any]:
    return {"loadgen": r.tool, "ok": r.ok, "failed": r.failed, "wall_s": r.wall_s, "rps": r.rps,
            "p50_ms": r.pct(50) * 1e3, "p99_ms": r.pct(99) * 1e3,
            "client_cpu_pct": 100 * r.client_cpu_s / r.wall_s if r.wall_s else 0.0}


def _stream_fields(r: loadgen.StreamResult, cfg: Config) -> dict[str, Any]:
    # SSE events the sidecar parsed: what the client got, plus the usage chunk per stream that
    # the sidecar made vLLM send and removed again (sync mode rewrites; observe mode cannot).
    sidecar_events = r.events + (r.ok if cfg.kind == "sidecar" and cfg.mode == "sync" else 0)
    return {"loadgen": "python-sse", "ok": r.ok, "failed": r.failed, "wall_s": r.wall_s,
            "rps": r.ok / r.wall_s if r.wall_s else 0.0, "events": r.events, "tokens": r.tokens,
            "sidecar_events": sidecar_events,
            "events_per_s": r.events / r.wall_s if r.wall_s else 0.0,
            "ttft_p50_ms": loadgen.percentile(r.ttft_s, 50) * 1e3,
            "ttft_p99_ms": loadgen.percentile(r.ttft_s, 99) * 1e3,
            "gap_p50_ms": loadgen.percentile(r.gaps_s, 50) * 1e3,
            "gap_p99_ms": loadgen.percentile(r.gaps_s, 99) * 1e3,
            "client_cpu_pct": 100 * r.client_cpu_s / r.wall_s if r.wall_s else 0.0}


def _per_unit(out: dict[str, Any]) -> None:
    ok = max(out["ok"], 1)
    if "envoy_cpu_s" in out:
        out["envoy_us_per_req"] = out["envoy_cpu_s"] / ok * 1e6
    if "sidecar_cpu_s" not in out:
        return
    cpu = out["sidecar_cpu_s"]
    out["sidecar_us_per_req"] = cpu / ok * 1e6
    out["sidecar_loop_us_per_req"] = out["sidecar_loop_cpu_s"] / ok * 1e6
    out["sidecar_loop_pct"] = 100 * out["sidecar_loop_cpu_s"] / cpu if cpu else float("nan")
    out["sidecar_sys_pct"] = 100 * out["sidecar_sys_s"] / cpu if cpu else float("nan")
    out["sidecar_s_per_1k_req"] = cpu / ok * 1e3
    out["sidecar_cpu_pct"] = 100 * cpu / out["wall_s"] if out["wall_s"] else 0.0
    out["msgs_per_req"] = out["sidecar_messages"] / ok
    if "sidecar_events" in out:
        ev = max(out["sidecar_events"], 1)
        out["sidecar_us_per_event"] = cpu / ev * 1e6
        out["sidecar_s_per_100k_tokens"] = cpu / max(out["tokens"], 1) * 1e5
        out["events_per_core_s"] = out["sidecar_events"] / cpu if cpu > 0 else float("inf")


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_config(b: Bench, cfg: Config, wls: dict[str, Workload], log: Any = print,
               round_: int = 0) -> list[dict[str, Any]]:
    """`round_` (--repeat): each round's sidecar stores into a directory of its own, so the events
    counted for a run are that run's alone."""
    sidecar = None
    if cfg.kind == "sidecar":
        workdir = b.workdir / (f"{cfg.name}.r{round_ + 1}" if round_ else cfg.name)
        settings = cfg.settings
        if cfg.policy:
            settings, redis = _policy_settings(workdir, cfg.policy)
        sidecar = Sidecar(workdir, cfg.transport, uds=cfg.uds, settings=settings).start()
    results: list[dict[str, Any]] = []
    try:
        for name in cfg.workloads:
            if name not in wls:
                continue
            alone = dataclasses.replace(CONFIGS["envoy"], envoy_concurrency=cfg.envoy_concurrency)
            paired = run_workload(b, alone, wls[name], None) if b.paired and sidecar else None
            r = run_workload(b, cfg, wls[name], sidecar)
            if paired is not None:
                r["paired"] = {k: paired[k] for k in PAIRED_KEYS if k in paired}
            results.append(r)
            log(_one_line(r))
        if sidecar is not None:
            _count_stored(sidecar, results)
    finally:
        if sidecar is not None:
            sidecar.stop()
        if cfg.policy == "redis":
            redis.stop()
    return results


# Budgets and rate limits that every bench request falls under (scoped by the x-feature the
# load sends) and never reaches: the cost of enforcing, not of refusing.
BENCH_POLICY = """\
budgets:
  - feature: bench
    period: month
    limit_tokens: 1000000000000
    hard: true
rate_limits:
  - feature: bench
    requests_per_minute: 1000000000
    tokens_per_minute: 1000000000000
"""


def _policy_settings(workdir: Path, kind: str) -> tuple[tuple[tuple[str, str, Any], ...], Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.yaml"
    policy.write_text(BENCH_POLICY)
    settings: tuple[tuple[str, str, Any], ...] = (("policy", "file", str(policy)),)
    redis = None
    if kind == "redis":
        redis = procs.start_redis(workdir)
        settings += (("policy", "redis_url", redis.url),)
    return settings, redis


def _count_stored(sidecar: Sidecar, results: list[dict[str, Any]]) -> None:
    """Events lost = requests Envoy received (warm-up included) - events stored in ClickHouse -
    requests the client abandoned unanswered at the end of a run (at most one per connection:
    Envoy may not have reached the sidecar for those), floored at 0."""
    flushed = sidecar.flush()
    stored = sidecar.stored_by_team()
    storage = sidecar.stats().get("storage", {})
    for r in results:
        row = stored.get(r["team"], {})
        r["stored_requests"] = row.get("requests", 0)
        r["stored_completion_tokens"] = row.get("completion_tokens", 0)
        r["stored_client_aborted"] = row.get("client_aborted", 0)
        r["events_gap"] = r.get("envoy_rq", 0) - r["stored_requests"]
        r["events_lost"] = max(0, r["events_gap"] - r.get("client_abandoned", 0))
        r["flushed"] = flushed
        r["storage_dropped"] = storage.get("events_dropped", 0)


def _one_line(r: dict[str, Any]) -> str:
    s = f"  {r['config']:<15} {r['workload']:<9} {r['rps']:>8.0f}/s"
    if "p50_ms" in r:
        s += f"  p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms"
    else:
        s += f"  ttft {r['ttft_p50_ms']:.2f} gap p99 {r['gap_p99_ms']:.2f} ms {r['events_per_s']:.0f} ev/s"
    if "sidecar_us_per_req" in r:
        s += f"  sidecar {r['sidecar_us_per_req']:.0f} us/req"
    if "worker_streams" in r:
        s += f"  streams per worker {r['worker_streams']}"
    if r.get("failed"):
        s += f"  FAILED {r['failed']}"
    if "paired" in r:
        s += f"  [Envoy alone just before: {r['paired']['rps']:.0f}/s]"
    return s + f"  (load {r['loadavg']})"
