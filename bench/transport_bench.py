"""Sidecar CPU per request: grpcio vs the h2 transport, under the same load.

    python -m bench.transport_bench [--requests 3000] [--concurrency 10] [--mode sync]

For each transport: the sidecar (ExtProcService, or a no-op handler) runs in its own process and
reads its own CPU time (time.process_time: all threads, so grpcio's too) before and after the
measured run. Load comes through a real Envoy (--concurrency 1) from a lean HTTP/1.1 load
generator, to a lean upstream that answers an SSE chat stream with usage; or, with --load grpc,
straight from grpcio's client. Bounded in count (--requests) and time (--max-seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen
from bench.procs import envoy_stats
from bench.upstream import Upstream
from extproc import wire
from extproc.devtools.devstack import envoy_process, free_port
from extproc.devtools.envoy_config import EnvoyOptions

TRANSPORTS = ("grpcio", "h2")


# --- the sidecar process ------------------------------------------------------------------------


class CountSink:
    def __init__(self) -> None:
        self.count = 0

    def emit(self, event: Any) -> None:
        self.count += 1


class NoopSession:
    """NOTES' "ceiling" server: every message answered at once, nothing else."""

    finished = False

    def on_message(self, req: wire.ProcessingRequest) -> wire.ProcessingResponse | None:
        if req.observability_mode:
            return None
        return wire.continue_response(req.WhichOneof("request"))

    def close(self) -> None:
        pass


async def serve(transport: str, handler: str, listen: str) -> None:
    from extproc.config import AttributionSettings
    from extproc.labels import Attribution
    from extproc.processors import ProcessorContext
    from extproc.server import ExtProcService
    from extproc.stats import SidecarStats
    from extproc.tokenizers import TokenizerRegistry
    from extproc.transport import SessionFactory, start_h2_server
    from extproc.transport.grpcio_server import start_grpc_server

    stats, sink = SidecarStats(), CountSink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             [sink], stats)
    sessions: SessionFactory = service.open_stream  # as extproc.app serves it
    if handler == "noop":
        sessions = lambda metadata: NoopSession()  # noqa: E731
    server: Any
    if transport == "grpcio":
        server, port = await start_grpc_server(sessions, listen)
    else:
        server, port = await start_h2_server(sessions, listen)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def control() -> None:
        # One line in, one JSON line out; stdin closed = stop.
        print(json.dumps({"port": port}), flush=True)
        for _ in sys.stdin:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({"cpu": time.process_time(), "user": ru.ru_utime, "sys": ru.ru_stime,
                              "events": sink.count,
                              "streams": stats.streams_opened, "cancelled": stats.streams_cancelled,
                              "messages": sum(stats.messages.values())}), flush=True)
        loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=control, daemon=True).start()
    await done
    await server.stop(1)


class Sidecar:
    def __init__(self, transport: str, handler: str, listen: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.transport_bench", "--serve", transport, "--handler", handler,
             "--listen", listen], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = self._read()["port"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("sidecar exited")
        return json.loads(line)

    def mark(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- lean HTTP/1.1 upstream and load generator ---------------------------------------------------


def _sse_response(chunks: int) -> bytes:
    events = [b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}) + b"\n\n" for i in range(chunks)]
    events.append(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [],
                                            "usage": {"prompt_tokens": 9, "completion_tokens": chunks,
                                                      "total_tokens": 9 + chunks}}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body


def _chat_request(port: int) -> bytes:
    body = orjson.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": "hello there"}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"x-team: bench\r\ncontent-length: %d\r\n\r\n%s" % (port, len(body), body))


async def http_load(port: int, requests: int, concurrency: int, max_seconds: float) -> tuple[int, int, float]:
    r = await loadgen.http_load(port, _chat_request(port), requests, concurrency, max_seconds)
    return r.ok, r.failed, r.wall_s


async def grpc_load(port: int, requests: int, concurrency: int, max_seconds: float) -> tuple[int, int, float]:
    import grpc

    pb = wire.pb
    hdrs = pb.HeaderMap(headers=[pb.HeaderValue(key=k, raw_value=v) for k, v in (
        (":method", b"POST"), (":path", b"/v1/chat/completions"), ("x-team", b"bench"))])
    msgs = [pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hdrs)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model":"m","messages":[]}', end_of_stream=True)),
            pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=pb.HeaderMap(headers=[
                pb.HeaderValue(key=":status", raw_value=b"200"),
                pb.HeaderValue(key="content-type", raw_value=b"application/json")])))]
    left = requests
    ok = failed = 0
    deadline = time.monotonic() + max_seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        from extproc.transport.grpcio_server import client_stub

        stub = client_stub(ch)

        async def worker() -> None:
            nonlocal left, ok, failed
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                try:
                    [r async for r in stub(iter(msgs), timeout=30)]
                    ok += 1
                except grpc.aio.AioRpcError:
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok, failed, time.perf_counter() - t0


# --- one measured run ---------------------------------------------------------------------------


async def run_one(transport: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    listen = f"unix:{workdir / (transport + '.sock')}" if args.uds else "127.0.0.1:0"
    sidecar = Sidecar(transport, args.handler, listen)
    address = listen if args.uds else f"127.0.0.1:{sidecar.port}"
    envoy = upstream = None
    try:
        if args.load == "grpc":
            load = lambda n: grpc_load(sidecar.port, n, args.concurrency, args.max_seconds)  # noqa: E731
        else:
            Upstream.response = _sse_response(args.chunks)
            upstream = await loop.create_server(Upstream, "127.0.0.1", 0)
            up_port = upstream.sockets[0].getsockname()[1]
            listen_port, admin_port = free_port(), free_port()
            envoy = envoy_process(EnvoyOptions(upstream=f"http://127.0.0.1:{up_port}", listen_port=listen_port,
                                               admin_port=admin_port, extproc_address=address, mode=args.mode),
                                  workdir)
            await asyncio.to_thread(envoy.start)
            load = lambda n: http_load(listen_port, n, args.concurrency, args.max_seconds)  # noqa: E731
        await load(args.warmup)
        await asyncio.sleep(1.5 if args.mode == "observe" else 0.2)  # observe: deferred closes settle
        before = sidecar.mark()
        ok, failed, wall = await load(args.requests)
        await asyncio.sleep(1.5 if args.mode == "observe" else 0.2)
        after = sidecar.mark()
        result = {
            "transport": transport, "requests": ok, "failed": failed, "wall_s": round(wall, 3),
            "rps": round(ok / wall, 1),
            "cpu_us_per_request": round((after["cpu"] - before["cpu"]) / max(ok, 1) * 1e6, 1),
            "user_us_per_request": round((after["user"] - before["user"]) / max(ok, 1) * 1e6, 1),
            "sys_us_per_request": round((after["sys"] - before["sys"]) / max(ok, 1) * 1e6, 1),
            "sidecar_cpu_pct": round((after["cpu"] - before["cpu"]) / wall * 100, 1),
            "msgs_per_request": round((after["messages"] - before["messages"]) / max(ok, 1), 2),
            "events_lost": ok - (after["events"] - before["events"]) if args.handler == "service" else None,
            "streams_cancelled": after["cancelled"] - before["cancelled"],
        }
        if envoy is not None:
            st = envoy_stats(admin_port)
            result["envoy_ext_proc_failures"] = sum(st.get(f"http.ingress.ext_proc.{k}", 0) for k in (
                "streams_failed", "failure_mode_allowed", "message_timeouts"))
        return result
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        if upstream is not None:
            upstream.close()
        sidecar.stop()


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    results = []
    for _ in range(args.rounds):  # alternate transports: drift on a shared machine hits both
        for transport in args.transports.split(","):
            results.append(await run_one(transport, args, workdir))
            print(json.dumps(results[-1]), flush=True)
    return results


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [f"{'transport':<8} {'runs':>4} {'rps':>8} {'cpu µs/req':>11} {'user':>6} {'sys':>6} {'cpu %':>6} "
             f"{'msgs/req':>8} "
             f"{'lost':>5} {'fail':>5}"]
    for t in dict.fromkeys(r["transport"] for r in results):
        rs = [r for r in results if r["transport"] == t]
        med = sorted(r["cpu_us_per_request"] for r in rs)[len(rs) // 2]
        user = sorted(r["user_us_per_request"] for r in rs)[len(rs) // 2]
        sys_ = sorted(r["sys_us_per_request"] for r in rs)[len(rs) // 2]
        lines.append(f"{t:<8} {len(rs):>4} {sum(r['rps'] for r in rs) / len(rs):>8.0f} {med:>11.1f} "
                     f"{user:>6.1f} {sys_:>6.1f} "
                     f"{sum(r['sidecar_cpu_pct'] for r in rs) / len(rs):>6.1f} {rs[0]['msgs_per_request']:>8} "
                     f"{sum(r['events_lost'] or 0 for r in rs):>5} "
                     f"{sum(r.get('envoy_ext_proc_failures', 0) + r['failed'] for r in rs):>5}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--load", choices=("envoy", "grpc"), default="envoy")
    p.add_argument("--mode", choices=("sync", "observe"), default="sync")
    p.add_argument("--handler", choices=("service", "noop"), default="service")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--chunks", type=int, default=5, help="SSE content chunks per response")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per measured run")
    p.add_argument("--uds", action="store_true", help="Envoy to sidecar over a Unix socket")
    p.add_argument("--json", type=Path, help="write results here")
    p.add_argument("--serve", choices=TRANSPORTS, help=argparse.SUPPRESS)
    p.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.handler, args.listen))
        return
    results = asyncio.run(main_async(args))
    print(summarize(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
