"""In-process CPU cost of the pieces of the sidecar's hot path, no sockets: what each lever of
issue 5 could save, next to what `bench.run` measures end to end.

    python -m bench.micro [--n 20000]

- exchange.json: the 4 messages Envoy sends for a non-streaming chat request (request headers
  as the openai SDK sends them, request body, response body with the response.code attribute,
  end of body) through a stream session (protobuf parse + handling + response serialization),
  and the event built and emitted at the end
- exchange.json with a policy: the same with a known virtual key, a hard budget and a rate
  limit (prompt counted, worst case reserved, settled), state in the process
- exchange.sse: one SSE event (one body message, as Envoy sends them at a token rate)
- sse.scan (lever): a bytes scan of the same events for what metering needs (usage, output text
  bytes) instead of orjson.loads + dict walks per chunk
- telemetry.emit / storage.emit: the two sinks, per event, on the event loop
- h2conn: the h2 transport's connection core for one request's stream as Envoy sends it (HEADERS,
  then the 4 messages of exchange.json in 4 reads, then WINDOW_UPDATE), with a session that
  answers at once: HTTP/2 + gRPC framing, HPACK, protobuf parse and serialize, no metering
- pricing.emit: the pricing stage (deploy/pricing.example.yaml) stamping cost and GPU work
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson

from bench.scenario import SDK_HEADERS
from extproc import wire
from extproc.config import Settings
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService, StreamSession
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry

pb = wire.pb
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_EXAMPLE_PRICING = Path(__file__).resolve().parent.parent / "deploy" / "pricing.example.yaml"


def _headers(pairs: dict[str, str], response: bool = False, eos: bool = False) -> bytes:
    hh = pb.HttpHeaders(headers=pb.HeaderMap(headers=[pb.HeaderValue(key=k, raw_value=v.encode())
                                                      for k, v in pairs.items()]), end_of_stream=eos)
    msg = pb.ProcessingRequest(response_headers=hh) if response else pb.ProcessingRequest(request_headers=hh)
    return msg.SerializeToString()


def _body(data: bytes, response: bool = False, eos: bool = False, code: int | None = None) -> bytes:
    b = pb.HttpBody(body=data, end_of_stream=eos)
    msg = pb.ProcessingRequest(response_body=b) if response else pb.ProcessingRequest(request_body=b)
    if code is not None:  # Envoy attaches it to the first response body message
        msg.attributes["envoy.filters.http.ext_proc"].fields["response.code"].number_value = code
    return msg.SerializeToString()


REQ_HEADERS = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "127.0.0.1:10000",
               ":scheme": "http", "content-type": "application/json", "content-length": "120",
               **SDK_HEADERS, "x-team": "bench", "x-feature": "bench", "x-forwarded-proto": "http",
               "x-request-id": "0d7c1f5e-2b61-4a39-9a43-7d0f4b8f3c11"}


def json_messages() -> list[bytes]:
    req = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Summarize our GPU bill."}],
                        "max_tokens": 16})
    resp = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Metering budget "
                                                              "tokens invoice ledger stream"},
                                      "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 12, "total_tokens": 28, "completion_tokens": 16}})
    return [_headers(REQ_HEADERS), _body(req, eos=True), _body(resp, response=True, code=200),
            _body(b"", response=True, eos=True)]


def sse_events(tokens: int = 64) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                         "model": MODEL, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                      "finish_reason": finish}]}) + b"\n\n"
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f" tok{i}"}, "length" if i == tokens - 1 else None) for i in range(tokens)]
    out.append(b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                         "model": MODEL, "choices": [], "usage": {
                                             "prompt_tokens": 12, "total_tokens": 12 + tokens,
                                             "completion_tokens": tokens}}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def timeit(fn: Callable[[], object], n: int) -> float:
    """µs per call, best of 3."""
    best = float("inf")
    for _ in range(3):
        gc.collect()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


class _Last:
    def __init__(self) -> None:
        self.event: object = None

    def emit(self, event: object) -> None:
        self.event = event


def _session_factory(governor: object = None) -> tuple[Callable[[], StreamSession], _Last]:
    stats = SidecarStats()
    last = _Last()
    service = ExtProcService(Attribution(Settings().attribution, stats), ProcessorContext(TokenizerRegistry()),
                             [last], stats, governor=governor)
    return service.open_stream, last


def bench_governor() -> object:
    """The SDK headers' key known (team bench), one hard budget and one rate limit (requests and
    tokens) that every request falls under and never reaches; state in this process."""
    from bench.scenario import BENCH_POLICY
    from extproc.governance.governor import Governor
    from extproc.governance.policy import hash_key, parse_policy

    key = SDK_HEADERS["authorization"].removeprefix("Bearer ")
    text = f'keys:\n  - sha256: "{hash_key(key)}"\n    team: bench\n' + BENCH_POLICY
    return Governor(parse_policy(text))


def run_exchange(new: Callable[[], StreamSession], messages: list[bytes]) -> None:
    session = new()
    for raw in messages:
        resp = session.on_message(pb.ProcessingRequest.FromString(raw))
        if resp is not None:
            resp.SerializeToString()
    session.close()


def scan_event(data: bytes, state: list[int]) -> None:
    """Lever prototype: what metering needs from one SSE event, from the bytes (no JSON objects).
    Counts output deltas and keeps the usage object's bytes; escapes are handled later, only when
    the tokenizer fallback needs the text."""
    i = data.find(b'"content":"')
    if i >= 0 and data[i + 11:i + 12] != b'"':
        state[0] += 1
    if data.find(b'"usage":{', 0) >= 0:
        state[1] += 1


def measure(n: int) -> list[tuple[str, float, str]]:
    """(what, µs, per what) rows."""
    new, last = _session_factory()
    msgs = json_messages()
    events = sse_events()
    # SSE stream: request headers/body as in the JSON case, then one body message per event
    stream_req = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    sse_msgs = [msgs[0], _body(stream_req, eos=True), _body(events[0], response=True, code=200),
                *(_body(e, response=True) for e in events[1:]), _body(b"", response=True, eos=True)]
    run_exchange(new, msgs)
    event = last.event
    governed, _ = _session_factory(bench_governor())
    rows: list[tuple[str, float, str]] = [
        ("exchange.json (4 msgs + event)", timeit(lambda: run_exchange(new, msgs), n), "per request"),
        ("  same with a policy (key, budget, rate limits; local)", timeit(lambda: run_exchange(governed, msgs), n),
         "per request"),
        ("exchange.sse (whole stream)", timeit(lambda: run_exchange(new, sse_msgs), n // 20) / len(events),
         f"per SSE event ({len(events)} events/stream)"),
        ("  protobuf parse of one message", timeit(lambda: [pb.ProcessingRequest.FromString(m) for m in msgs], n) / 4,
         "per message"),
        ("  orjson.loads of one SSE event", timeit(lambda: orjson.loads(events[5][6:-2]), n), "per event"),
        ("  sse.scan (lever prototype)", timeit(lambda: scan_event(events[5], [0, 0]), n), "per event"),
        ("  uuid4().hex", timeit(lambda: uuid.uuid4().hex, n), "per event"),
    ]

    async def sinks() -> None:
        with tempfile.TemporaryDirectory(prefix="extproc-micro-") as d:
            await _sinks(Path(d))

    async def _sinks(tmp: Path) -> None:
        from extproc.storage import open_storage
        from extproc.telemetry import UsageMetrics

        settings = Settings()
        settings.storage.dsn = f"chdb://{tmp / 'data'}"
        settings.spool.dir = str(tmp / "spool")
        metrics = UsageMetrics.from_settings(settings, SidecarStats())
        rows.append(("telemetry.emit (OTel metrics)", timeit(lambda: metrics.emit(event), n), "per event"))
        from extproc.governance.pricing import load_pricing
        from extproc.governance.stamp import PricingStage

        pricing = PricingStage(load_pricing(_EXAMPLE_PRICING))
        rows.append(("pricing.emit (list cost + GPU work)", timeit(lambda: pricing.emit(event), n), "per event"))
        storage = await open_storage(settings)
        sink = storage.sink()
        await sink.start()
        rows.append(("storage.emit (serialize + spool)", timeit(lambda: sink.emit(event), n), "per event"))
        await storage.close()

    asyncio.run(sinks())
    rows.append(("h2conn (one stream, 4 msgs, answering session)", h2_request_cost(n, msgs), "per request"))
    hop = min(asyncio.run(_hop(n, False)) for _ in range(3))
    inline = min(asyncio.run(_hop(n, True)) for _ in range(3))
    rows.append(("message via queue + future + handler task", hop, "per message (asyncio only)"))
    rows.append(("  same, handler called inline (lever)", inline, "per message (asyncio only)"))
    return rows


class _Answering:
    finished = False

    def on_message(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        kind = msg.WhichOneof("request")
        return wire.continue_response(kind) if kind is not None else None

    def close(self) -> None:
        pass


def h2_reads(messages: list[bytes], sid: int, block: bytes, credit: int) -> list[bytes]:
    """What Envoy writes for one stream, read by read (sync mode: one message per read)."""
    from extproc.transport import frames as f

    def data(m: bytes, flags: int = 0) -> bytes:
        return f.frame(f.DATA, flags, sid, f.U32.pack(len(m)).rjust(5, b"\0") + m)

    reads = [f.frame(f.HEADERS, f.END_HEADERS, sid, block) + data(messages[0])]
    reads += [data(m) for m in messages[1:-1]]
    reads.append(data(messages[-1], f.END_STREAM) + f.window_update(0, credit))
    return reads


def h2_request_cost(n: int, messages: list[bytes]) -> float:
    """µs per request through the sans-IO connection core (no socket, no event loop)."""
    import hpack

    from extproc.transport import frames as f
    from extproc.transport.h2conn import H2Connection

    encoder = hpack.Encoder()  # one per connection, as Envoy keeps one: repeated blocks are indexed
    headers = [(":method", "POST"), (":scheme", "http"), (":path", wire.METHOD_PATH), (":authority", "extproc"),
               ("content-type", "application/grpc"), ("te", "trailers"), ("x-envoy-internal", "true")]
    conn = H2Connection(lambda metadata: _Answering())
    conn.initiate()
    conn.receive(f.PREFACE + f.settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}))
    conn.data_to_send()
    # how much connection window one request's answers take: given back with its last read
    sid = 1
    used = 0
    for r in h2_reads(messages, sid, encoder.encode(headers), 1):
        conn.receive(r)
        out = conn.data_to_send()
        used += sum(len(p) for t, _, _, p in _frames(out) if t == f.DATA)
    conn.receive(f.window_update(0, used - 1))
    block = encoder.encode(headers)
    sids = iter(range(3, 1 << 31, 2))

    def one() -> None:
        for r in h2_reads(messages, next(sids), block, used):
            conn.receive(r)
            conn.data_to_send()

    us = timeit(one, n)
    assert not conn.closed and not conn.streams, "the bench stream did not complete"
    spare = iter(range(3, 1 << 31, 2))
    building = timeit(lambda: h2_reads(messages, next(spare), block, used), n)  # the client's part
    return us - building


def _frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    from extproc.transport import frames as f

    frames, pos = [], 0
    while pos < len(out):
        hi, lo, ftype, flags, sid = f.FRAME_HEADER.unpack_from(out, pos)
        length = (hi << 16) | lo
        frames.append((ftype, flags, sid, out[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return frames


async def _hop(n: int, inline: bool) -> float:
    """µs per message delivered from a protocol callback to a handler and back: through a queue,
    a future and an async-generator handler in its own task (as the h2 transport's deleted
    handler-task mode did), or by a
    direct call from the callback (the lever). Each message arrives in a new loop iteration."""
    loop = asyncio.get_running_loop()
    q: deque[int] = deque()
    waiter: list[asyncio.Future[None] | None] = [None]
    done = loop.create_future()
    count = [0]

    def handle(m: int) -> int:
        return m

    def got_response() -> None:
        count[0] += 1
        if count[0] >= n:
            done.set_result(None)
        else:
            loop.call_soon(feed)  # the next message: a later data_received

    def feed() -> None:
        if inline:
            handle(1)
            got_response()
            return
        q.append(1)
        w = waiter[0]
        if w is not None and not w.done():
            w.set_result(None)

    async def requests() -> AsyncIterator[int]:
        while True:
            while not q:
                waiter[0] = fut = loop.create_future()
                await fut
            yield q.popleft()

    async def handler(reqs: AsyncIterator[int]) -> AsyncIterator[int]:
        async for m in reqs:
            yield handle(m)

    async def serve() -> None:
        async for _ in handler(requests()):
            got_response()

    task = loop.create_task(serve())
    t = time.perf_counter()
    loop.call_soon(feed)
    await done
    elapsed = time.perf_counter() - t
    task.cancel()
    return elapsed / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    rows = measure(p.parse_args().n)
    width = max(len(r[0]) for r in rows)
    for name, us, unit in rows:
        print(f"{name:<{width}}  {us:8.2f} µs  {unit}")


if __name__ == "__main__":
    main()
