"""Recorded responses of every route, cut anywhere, through the exchange in the shipped message
shape (response headers skipped, the status as the response.code attribute on the first body
message): the event and the bytes the client receives must not depend on where the cuts fall."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import wire
from extproc.config import AttributionSettings
from extproc.exchange import Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.processors.multipart import form_fields
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.recorded_responses import ALL, Recorded

TOKENIZERS = TokenizerRegistry()
# Fields that describe the request, not when or under which id it was seen.
_TIMELESS = ("event_id", "start_time_unix_nano", "end_time_unix_nano", "duration_ns", "time_to_first_token_ns")


def _replay(rec: Recorded, chunks: list[bytes]) -> tuple[dict, bytes]:
    """Run one exchange; return its event (timeless fields) and what the client received."""
    stats = SidecarStats()
    ex = Exchange(Attribution(AttributionSettings(), stats), ProcessorContext(TOKENIZERS), stats)
    ex.handle(wire.REQUEST_HEADERS, m.request_headers(rec.path).request_headers)
    ex.handle(wire.REQUEST_BODY, m.body(rec.request, eos=True).request_body)
    client = b""
    for i, chunk in enumerate(chunks):
        eos = i == len(chunks) - 1
        req = m.body(chunk, response=True, eos=eos, code=rec.status if i == 0 else None)
        resp = ex.handle_request(req, wire.RESPONSE_BODY)
        mutation = resp.response_body.response.body_mutation
        which = mutation.WhichOneof("mutation")
        client += mutation.body if which == "body" else b"" if which == "clear_body" else chunk
    ev = ex.finish()
    assert ev is not None
    for name in _TIMELESS:
        ev.ClearField(name)
    return {f.name: v for f, v in ev.ListFields()}, client


def _whole(rec: Recorded) -> tuple[dict, bytes]:
    return _replay(rec, [rec.response, b""])


def _what_vllm_sends_the_client(rec: Recorded) -> bytes:
    """Without the usage the sidecar asked for: a stream request without include_usage gets no
    usage chunk from vLLM, so it must get none through the sidecar either."""
    if rec.request.startswith(b"--"):  # an audio route's form: usage is asked for by a field
        form = form_fields(rec.request)
        req = {"stream": form.get("stream") == "true"}
        asked = form.get("stream_include_usage") == "true"
    else:
        req = orjson.loads(rec.request)
        asked = isinstance(req.get("stream_options"), dict) and req["stream_options"].get("include_usage")
    if rec.status >= 400 or not req.get("stream") or asked:
        return rec.response
    events = rec.response.split(b"\n\n")
    return b"\n\n".join(e for e in events if not (b'"choices":[]' in e and b'"usage":{' in e))


@pytest.mark.parametrize("rec", ALL, ids=lambda r: r.name)
def test_a_whole_body_is_metered_and_the_client_gets_what_vllm_would_send(rec):
    event, client = _whole(rec)
    assert client == _what_vllm_sends_the_client(rec)
    if rec.status >= 400:
        assert event["error"] == "upstream_error"
    else:
        assert "error" not in event, event
        if rec.path.startswith("/v1/audio/") and not event.get("stream"):
            # vLLM reports the audio's duration (or nothing), never tokens: the text is counted,
            # here with the tiktoken stand-in (no model tokenizer configured): an estimate
            assert event["token_source"] == 4 and event["completion_tokens"] > 0  # TOKENIZER_ESTIMATE
            return
        assert event["token_source"] == 1  # UPSTREAM_USAGE
        assert event["prompt_tokens"] > 0


@pytest.mark.parametrize("rec", ALL, ids=lambda r: r.name)
def test_every_first_chunk_length_gives_the_same_event_and_bytes(rec):
    expected = _whole(rec)
    body = rec.response
    for cut in range(len(body) + 1):
        # The first chunk holds `cut` bytes, then the rest, then Envoy's empty end of stream.
        assert _replay(rec, [body[:cut], body[cut:], b""]) == expected, f"first chunk {body[:cut]!r}"


@pytest.mark.parametrize("rec", ALL, ids=lambda r: r.name)
def test_leading_blanks_and_empty_chunks_change_nothing(rec):
    expected_event, expected_client = _whole(rec)
    event, client = _replay(rec, [b"", b"\n", b"", rec.response[:1], b"", rec.response[1:], b""])
    assert event == expected_event and client == b"\n" + expected_client


@settings(max_examples=150, deadline=None)
@given(rec=st.sampled_from(ALL), data=st.data())
def test_any_cuts_with_empty_chunks_between(rec, data):
    body = rec.response
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    pieces, last = [], 0
    for c in cuts:
        pieces.append(body[last:c])
        last = c
    pieces.append(body[last:])
    pieces.append(b"")
    assert _replay(rec, pieces) == _whole(rec)
