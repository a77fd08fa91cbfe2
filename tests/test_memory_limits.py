"""Bounded memory per request (metering.* limits): an SSE event longer than max_sse_event_bytes,
a streamed request body over max_request_body_bytes, output text over max_output_text_chars,
and any number of client-sent model names. Each is flagged on the event, the request is still
metered as well as it can be, and the client receives every byte. Messages in the shipped shape:
response headers skipped, the status as the response.code attribute on the first body."""

from __future__ import annotations

import orjson
import pytest

from extproc import wire
from extproc.config import AttributionSettings, ConfigError, load_settings
from extproc.events import TokenSource
from extproc.exchange import Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m

TOKENIZERS = TokenizerRegistry()
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}
LIMIT = 2048


def _exchange(**limits: int) -> Exchange:
    stats = SidecarStats()
    return Exchange(Attribution(AttributionSettings(), stats), ProcessorContext(TOKENIZERS, **limits), stats)


def _chunk(text: str, **extra) -> bytes:  # noqa: ANN003
    return orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": text}, **extra}]})


def _feed(ex: Exchange, msgs) -> list[wire.ProcessingResponse]:  # noqa: ANN001
    out = []
    for msg in msgs:
        kind = msg.WhichOneof("request")
        out.append(ex.handle_request(msg, kind))
    return out


def _client_bytes(chunks: list[bytes], resps: list[wire.ProcessingResponse]) -> bytes:
    """What Envoy forwards: our replacement where we gave one, else the chunk as it was."""
    out = b""
    for chunk, r in zip(chunks, resps, strict=True):
        mut = r.response_body.response.body_mutation
        out += b"" if mut.clear_body else mut.body if mut.HasField("body") else chunk
    return out


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 500, 5000])
def test_an_sse_event_over_the_limit_is_forwarded_whole_unread_and_flagged(size):
    """Sync mode, usage chunk injected (so bytes are held back until an event ends): the
    oversized event reaches the client byte for byte, the parser never holds more than the
    limit plus one chunk, the events after it are read again, the usage still counts."""
    huge = _chunk("x" * (3 * LIMIT))
    client_wants = m.sse(_chunk("Hello"), huge, _chunk(" world", finish_reason="stop"), "[DONE]")
    upstream = m.sse(_chunk("Hello"), huge, _chunk(" world", finish_reason="stop"),
                     orjson.dumps({"model": "m", "choices": [], "usage": USAGE}), "[DONE]")
    ex = _exchange(max_sse_event_bytes=LIMIT)
    resps = _feed(ex, [m.request_headers(), m.body(orjson.dumps({"model": "m", "stream": True,
                                                                   "messages": [{"role": "user", "content": "hi"}]}),
                                                    eos=True)])
    assert resps[1].request_body.response.HasField("body_mutation")  # usage injected
    chunks = _pieces(upstream, size)
    msgs = [m.body(c, response=True, code=200 if i == 0 else None) for i, c in enumerate(chunks)]
    msgs.append(m.body(b"", response=True, eos=True))
    held = []
    out = []
    for msg in msgs:
        out.extend(_feed(ex, [msg]))
        held.append(len(ex.processor._sse.pending))
    assert max(held) <= LIMIT + size
    assert _client_bytes([*chunks, b""], out) == client_wants
    ev = ex.finish()
    assert ev.error == "sse_event_too_large" and "max_sse_event_bytes" in ev.error_detail
    assert (ev.prompt_tokens, ev.completion_tokens) == (12, 40) and ev.token_source == TokenSource.UPSTREAM_USAGE
    assert ex.processor.choices[0].finish_reason == "stop" and ev.response_events == 4


def test_an_oversized_event_without_usage_still_counts_the_rest():
    ex = _exchange(max_sse_event_bytes=LIMIT)
    ex.observe = True
    stream = m.sse(_chunk("Hello"), _chunk("y" * (2 * LIMIT)), _chunk(" world"))
    _feed(ex, [m.request_headers(), m.body(orjson.dumps({"model": "m", "stream": True, "messages": []}), eos=True),
               *[m.body(c, response=True, code=200 if i == 0 else None) for i, c in enumerate(_pieces(stream, 64))]])
    ev = ex.finish()
    assert ev.error == "sse_event_too_large" and ev.client_aborted
    assert ev.completion_tokens == TOKENIZERS.for_model("m").count("Hello world")


def test_a_streamed_request_body_over_the_limit_is_let_go_and_flagged():
    """Observability mode streams the request body: pieces past the limit are not kept; the
    request is not parsed, the upstream usage is still counted."""
    ex = _exchange(max_request_body_bytes=LIMIT)
    ex.observe = True
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "z" * (4 * LIMIT)}]})
    pieces = _pieces(body, 512)
    kept = []
    for i, piece in enumerate(pieces):
        _feed(ex, [m.request_headers()] if i == 0 else [])
        _feed(ex, [m.body(piece, eos=i == len(pieces) - 1)])
        kept.append(sum(map(len, ex._request_body)))
    assert max(kept) <= LIMIT
    answer = orjson.dumps({"model": "m", "choices": [{"index": 0, "message": {"content": "ok"}}], "usage": USAGE})
    _feed(ex, [m.body(answer, response=True, code=200), m.body(b"", response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "request_too_large" and str(len(body)) in ev.error_detail
    assert (ev.prompt_tokens, ev.completion_tokens) == (12, 40) and not ev.client_aborted


def test_output_text_over_the_limit_is_counted_in_pieces_and_flagged():
    """An aborted stream (no usage) with more output text than the limit: the kept text stays
    bounded, the count is that of the whole text within a token per cut."""
    words = [" token", " café", " 日本語", " meter", " 🎉"] * 400
    ex = _exchange(max_output_text_chars=LIMIT)
    _feed(ex, [m.request_headers(), m.body(orjson.dumps({"model": "m", "stream": True, "messages": []}), eos=True)])
    kept = []
    for i, w in enumerate(words):
        _feed(ex, [m.body(m.sse(_chunk(w)), response=True, code=200 if i == 0 else None)])
        kept.append(sum(map(len, ex.processor.choices[0].text)))
    assert max(kept) <= LIMIT + max(map(len, words))
    ev = ex.finish()
    whole = TOKENIZERS.for_model("m").count("".join(words))
    cuts = ex.processor.text_segments
    assert cuts >= 3 and ev.error == "output_text_limit" and "max_output_text_chars" in ev.error_detail
    assert abs(ev.completion_tokens - whole) <= cuts and ev.token_source == TokenSource.TOKENIZER_ESTIMATE


def test_output_text_over_the_limit_with_usage_is_not_flagged():
    """The upstream's usage needs no kept text: nothing is off, nothing to flag."""
    ex = _exchange(max_output_text_chars=LIMIT)
    _feed(ex, [m.request_headers(), m.body(orjson.dumps({"model": "m", "stream": True, "messages": []}), eos=True)])
    stream = m.sse(*[_chunk(" token" * 100) for _ in range(10)],
                   orjson.dumps({"model": "m", "choices": [], "usage": USAGE}), "[DONE]")
    _feed(ex, [m.body(stream, response=True, code=200), m.body(b"", response=True, eos=True)])
    ev = ex.finish()
    assert ex.processor.text_segments >= 1 and ev.error == "" and ev.completion_tokens == 40


def test_client_sent_model_names_grow_no_tokenizer_cache():
    reg = TokenizerRegistry(models={"llama": "llama3"})
    reg.warm()
    before = reg.cached_names
    for i in range(20_000):
        assert reg.for_model(f"client-model-{i}").name == "tiktoken:o200k_base"
    assert reg.cached_names == before and reg.for_model("llama").name.startswith("hf:")


def test_limits_are_settings_and_too_small_ones_are_refused():
    s = load_settings(None, {"metering": {"max_sse_event_bytes": "65536"}},
                      environ={"EXTPROC_METERING__MAX_OUTPUT_TEXT_CHARS": "2048"})
    assert (s.metering.max_sse_event_bytes, s.metering.max_output_text_chars) == (65536, 2048)
    assert s.metering.max_request_body_bytes == 8 * 1024 * 1024
    with pytest.raises(ConfigError, match="metering.max_request_body_bytes"):
        load_settings(None, {"metering": {"max_request_body_bytes": 10}}, environ={})
