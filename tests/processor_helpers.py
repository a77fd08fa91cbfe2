"""Drive one request through an Exchange in the shipped message shape (response headers
skipped, the status as the response.code attribute on the first body message)."""

from __future__ import annotations

import orjson

from extproc import wire
from extproc.config import AttributionSettings
from extproc.events import UsageEvent
from extproc.exchange import Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m

TOKENIZERS = TokenizerRegistry()


def run(path: str, request: dict | bytes, status: int, chunks: list[bytes], *, eos: bool = True,
        ctx: ProcessorContext | None = None,
        headers: dict[str, str] | None = None) -> tuple[Exchange, UsageEvent, bytes, wire.ProcessingResponse]:
    """Returns the exchange, its event, what the client received and the request body answer.
    eos=False: the stream ends without Envoy's end of stream (the client went away)."""
    stats = SidecarStats()
    ex = Exchange(Attribution(AttributionSettings(), stats), ctx or ProcessorContext(TOKENIZERS), stats)
    ex.handle(wire.REQUEST_HEADERS, m.request_headers(path, **(headers or {})).request_headers)
    body = request if isinstance(request, bytes) else orjson.dumps(request)
    req_answer = ex.handle(wire.REQUEST_BODY, m.body(body, eos=True).request_body)
    client = b""
    for i, chunk in enumerate(chunks):
        last = eos and i == len(chunks) - 1
        msg = m.body(chunk, response=True, eos=last, code=status if i == 0 else None)
        resp = ex.handle_request(msg, wire.RESPONSE_BODY)
        mutation = resp.response_body.response.body_mutation
        which = mutation.WhichOneof("mutation")
        client += mutation.body if which == "body" else b"" if which == "clear_body" else chunk
    ev = ex.finish()
    assert ev is not None
    return ex, ev, client, req_answer


def sse(*events: tuple[str, dict]) -> bytes:
    return b"".join(b"event: " + k.encode() + b"\ndata: " + orjson.dumps(o) + b"\n\n" for k, o in events)
