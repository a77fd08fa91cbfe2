"""Lean asyncio HTTP/1.1 load generators (keep-alive, one connection per client), bounded in
request count and time.

- `http_load`: closed loop, N clients each sending the same request back to back; latency per
  request (write to last byte of the response).
- `sse_load`: closed loop of streaming requests; per stream the time to the first token event
  and the arrival time of every SSE event (at the socket read that completed it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
    tool: str
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    # percentiles straight from a tool that reports them (wrk), seconds
    tool_percentiles: dict[int, float] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def pct(self, q: int) -> float:
        if q in self.tool_percentiles:
            return self.tool_percentiles[q]
        return percentile(self.latencies_s, q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def post_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    return (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), port, extra, len(body), body))


def _parse_head(head: bytes) -> tuple[bool, int | None]:
    """(status is 200, content-length or None for chunked)."""
    lower = head.lower()
    i = lower.find(b"content-length:")
    length = None
    if i >= 0:
        end = lower.find(b"\r\n", i)
        length = int(lower[i + 15:end if end > 0 else None])
    return head.startswith(b"HTTP/1.1 200"), length


class Client(asyncio.Protocol):
    """One keep-alive connection; a response ends with the chunked terminator or content-length."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(False)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        ok, length = _parse_head(self.buf[:end])
        if length is not None:
            complete = len(self.buf) >= end + 4 + length
        else:
            complete = self.buf.endswith(b"\r\n0\r\n\r\n")
        if complete and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(ok)
            self.buf = b""

    async def request(self, data: bytes) -> bool:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


async def http_load(port: int, data: bytes, requests: int, concurrency: int, max_seconds: float,
                    timeout: float = 30.0) -> LoadResult:
    loop = asyncio.get_running_loop()
    res = LoadResult("python")
    left = requests
    deadline = time.monotonic() + max_seconds
    clock = time.perf_counter
    lat = res.latencies_s

    async def worker() -> None:
        nonlocal left
        _, client = await loop.create_connection(Client, "127.0.0.1", port)
        try:
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                t = clock()
                try:
                    ok = await asyncio.wait_for(client.request(data), timeout)
                except TimeoutError:
                    ok = False
                if ok:
                    lat.append(clock() - t)
                    res.ok += 1
                else:
                    res.failed += 1
                    client.transport.close()
                    _, client = await loop.create_connection(Client, "127.0.0.1", port)
        finally:
            client.transport.close()

    cpu0, t0 = time.process_time(), clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall_s, res.client_cpu_s = clock() - t0, time.process_time() - cpu0
    return res


# --- streaming --------------------------------------------------------------------------------


class Dechunker:
    """Incremental HTTP/1.1 chunked transfer decoding (no trailers)."""

    def __init__(self) -> None:
        self.buf = b""
        self.need = -1  # -1: reading a size line; -2: reading the final CRLF; else bytes of data
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out: list[bytes] = []
        while not self.done:
            if self.need == -1:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(self.buf[:i].split(b";")[0], 16)
                self.buf = self.buf[i + 2:]
                self.need = size if size else -2
            elif self.need == -2:
                if len(self.buf) < 2:
                    break
                self.done = True
            else:
                if len(self.buf) < self.need + 2:
                    break
                out.append(self.buf[:self.need])
                self.buf = self.buf[self.need + 2:]
                self.need = -1
        return b"".join(out)


@dataclass
class StreamRecord:
    ok: bool = False
    ttft_s: float = float("nan")
    events: int = 0
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)


_TOKEN = b'"delta":{"content":"'


class StreamClient(asyncio.Protocol):
    """One keep-alive connection reading SSE responses; events are split on blank lines."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[StreamRecord] | None = None
        self.t0 = 0.0
        self._reset()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.rec)

    def _reset(self) -> None:
        self.head = b""
        self.status_ok = False
        self.body: Dechunker | None = None
        self.length: int | None = None
        self.got = 0
        self.pending = b""
        self.rec = StreamRecord()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.body is None and self.length is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status_ok, self.length = _parse_head(self.head[:end])
            data = self.head[end + 4:]
            if self.length is None:
                self.body = Dechunker()
        if self.body is not None:
            payload = self.body.feed(data)
            done = self.body.done
        else:
            payload = data
            self.got += len(data)
            done = self.got >= (self.length or 0)
        if payload:
            self._events(self.pending + payload if self.pending else payload, now)
        if done and self.waiter is not None and not self.waiter.done():
            self.rec.ok = self.status_ok and self.pending == b"" and self.rec.events > 0
            self.waiter.set_result(self.rec)

    def _events(self, buf: bytes, now: float) -> None:
        rec = self.rec
        parts = buf.split(b"\n\n")
        self.pending = parts.pop()
        for ev in parts:
            rec.events += 1
            # one chunk per generated token (vLLM), its text possibly empty (a UTF-8 character
            # split across tokens); the role chunk starts with "delta":{"role"
            if _TOKEN in ev:
                rec.tokens += 1
                rec.token_times.append(now)
                if rec.tokens == 1:
                    rec.ttft_s = now - self.t0

    async def request(self, data: bytes) -> StreamRecord:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(data)
        return await self.waiter


@dataclass
class StreamResult:
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    events: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0


async def sse_load(port: int, data: bytes, streams: int, concurrency: int, max_seconds: float,
                   timeout: float = 60.0) -> StreamResult:
    """`concurrency` streams open at all times until `streams` were started or time is up."""
    loop = asyncio.get_running_loop()
    res = StreamResult()
    left = streams
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal left
        _, client = await loop.create_connection(StreamClient, "127.0.0.1", port)
        try:
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                try:
                    rec = await asyncio.wait_for(client.request(data), timeout)
                except TimeoutError:
                    rec = StreamRecord()
                res.events += rec.events
                res.tokens += rec.tokens
                if not rec.ok:
                    res.failed += 1
                    client.transport.close()
                    _, client = await loop.create_connection(StreamClient, "127.0.0.1", port)
                    continue
                res.ok += 1
                res.ttft_s.append(rec.ttft_s)
                t = rec.token_times
                res.gaps_s.extend(b - a for a, b in zip(t, t[1:], strict=False))
        finally:
            client.transport.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    # stagger the starts over one stream's worth of time, so streams do not tick in lockstep
    async def staggered(i: int) -> None:
        await asyncio.sleep(i * 0.5 / concurrency)
        await worker()

    await asyncio.gather(*(staggered(i) for i in range(concurrency)))
    res.wall_s, res.client_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return res
