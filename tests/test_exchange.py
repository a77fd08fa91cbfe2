"""Exchange + processors driven by ext_proc messages as Envoy sends them (no network)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import wire
from extproc.config import AttributionSettings
from extproc.events import TokenSource
from extproc.exchange import Exchange, framing_of
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.storage import pbinput
from extproc.storage.columns import ColumnStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

TOKENIZERS = TokenizerRegistry()


def _exchange(stats: SidecarStats | None = None) -> Exchange:
    stats = stats or SidecarStats()
    return Exchange(Attribution(AttributionSettings(), stats), ProcessorContext(TOKENIZERS), stats)


def _shipped_shape(msgs) -> list:
    """The shipped Envoy configs skip response headers: Envoy attaches the status to the first
    response body message as the response.code attribute instead. Tests written with response
    headers are turned into that shape (headers followed by a body become the body alone)."""
    msgs = list(msgs)
    out = []
    for i, req in enumerate(msgs):
        nxt = msgs[i + 1] if i + 1 < len(msgs) else None
        if (req.WhichOneof("request") == "response_headers" and nxt is not None
                and nxt.WhichOneof("request") == "response_body"):
            status = next(h.raw_value for h in req.response_headers.headers.headers if h.key == ":status")
            nxt.attributes["envoy.filters.http.ext_proc"].fields["response.code"].number_value = int(status)
            continue
        out.append(req)
    return out


def _run(ex: Exchange, msgs, *, shape: str = "shipped") -> list[wire.ProcessingResponse]:
    """shape="headers": response headers sent to the sidecar (a config that asks for them)."""
    out = []
    if shape == "shipped":
        msgs = _shipped_shape(msgs)
    for req in msgs:
        kind = req.WhichOneof("request")
        out.append(ex.handle_request(req, kind))
    return out


def _chunk(text=None, *, index=0, finish=None, usage=None, choices=True, reasoning=None):
    delta = {}
    if text is not None:
        delta["content"] = text
    if reasoning is not None:
        delta["reasoning"] = reasoning
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "resp-model",
           "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish,
                        "stop_reason": None}] if choices else [],
           "usage": usage}
    return orjson.dumps(obj)


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 8}}


def _chat_request(**kw) -> bytes:
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req.update(kw)
    return orjson.dumps(req)


def test_streaming_chat_injects_and_strips_usage():
    stats = SidecarStats()
    ex = _exchange(stats)
    resps = _run(ex, [m.request_headers(x_team="search", x_feature="qa"),
                      m.body(_chat_request(stream=True), eos=True)])
    mutated = resps[1].request_body.response.body_mutation.body
    sent = orjson.loads(mutated)
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert resps[1].request_body.response.header_mutation.set_headers[0].header.raw_value == str(len(mutated)).encode()
    stream = m.sse(_chunk("Hel"), _chunk("lo", finish="stop"), _chunk(choices=False, usage=USAGE), "[DONE]")
    resps = _run(ex, [m.response_headers(), m.body(stream[:50], response=True),
                      m.body(stream[50:], response=True), m.body(b"", response=True, eos=True)])
    forwarded = b""
    for i, r in enumerate(resps):
        mut = r.response_body.response.body_mutation
        piece = [stream[:50], stream[50:], b""][i]
        forwarded += mut.body if mut.WhichOneof("mutation") == "body" else (b"" if mut.clear_body else piece)
    assert b'"usage":{' not in forwarded and b"[DONE]" in forwarded and b"lo" in forwarded
    assert stats.live_output_tokens == 2  # one per output delta, as the stream went by
    assert ex.response_done
    ev = ex.finish()
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens, ev.cached_tokens) == (11, 3, 14, 8)
    assert ev.token_source == TokenSource.UPSTREAM_USAGE
    assert dict(ev.labels) == {"team": "search", "feature": "qa", "user": "unattributed", "env": "unattributed"}
    assert ev.usage_injected and ev.stream and not ev.client_aborted and ev.metered
    assert ev.finish_reason == "stop" and ev.response_model == "resp-model" and ev.request_id == "rid-1"
    assert ev.time_to_first_token_ns > 0 and ev.duration_ns >= ev.time_to_first_token_ns


def test_client_asked_for_usage_keeps_chunk_and_request_untouched():
    ex = _exchange()
    resps = _run(ex, [m.request_headers(), m.body(_chat_request(stream=True, stream_options={"include_usage": True}), eos=True)])
    assert not resps[1].request_body.response.HasField("body_mutation")
    stream = m.sse(_chunk("a", finish="stop"), _chunk(choices=False, usage=USAGE), "[DONE]")
    resps = _run(ex, [m.response_headers(), m.body(stream, response=True, eos=True)])
    assert not resps[0].response_body.response.HasField("body_mutation")
    assert ex.finish().completion_tokens == 3


def test_continuous_usage_is_cumulative_not_summed():
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}), eos=True)])
    chunks = [_chunk("x", usage={"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i}) for i in (1, 2, 3)]
    chunks.append(_chunk(choices=False, usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}))
    _run(ex, [m.response_headers(), m.body(m.sse(*chunks, "[DONE]"), response=True, eos=True)])
    ev = ex.finish()
    assert (ev.prompt_tokens, ev.completion_tokens) == (5, 3)


def test_abort_mid_stream_counts_seen_tokens_with_tokenizer():
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True), m.response_headers(),
              m.body(m.sse(_chunk("Hello"), _chunk(" world"), _chunk(" again", index=1)), response=True)])
    ev = ex.finish()  # the stream ended here: Envoy reset it
    assert ev.client_aborted
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE
    assert ev.completion_tokens == TOKENIZERS.for_model("m").count("Hello world") + TOKENIZERS.for_model("m").count(" again")
    assert ev.prompt_tokens > 0 and ev.tokenizer.startswith("tiktoken:")


def test_n2_non_stream_json_and_reasoning():
    ex = _exchange()
    body = orjson.dumps({"id": "x", "object": "chat.completion", "model": "resp",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "a", "reasoning": "think hard"}, "finish_reason": "stop"},
                                     {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}})
    _run(ex, [m.request_headers(), m.body(_chat_request(n=2), eos=True), m.response_headers(content_type="application/json"),
              m.body(body[:10], response=True), m.body(body[10:], response=True, eos=True)])
    ev = ex.finish()
    assert ev.finish_reason == "stop,length" and ev.choices == 2 and not ev.stream
    assert (ev.prompt_tokens, ev.completion_tokens) == (4, 9)
    assert ev.reasoning_tokens == TOKENIZERS.for_model("m").count("think hard")


def test_embeddings_input_tokens_only():
    ex = _exchange()
    body = orjson.dumps({"object": "list", "data": [{"embedding": [0.1]}], "model": "e",
                         "usage": {"prompt_tokens": 7, "total_tokens": 7}})
    _run(ex, [m.request_headers("/v1/embeddings"), m.body(orjson.dumps({"model": "e", "input": "hello", "stream": True}), eos=True),
              m.response_headers(content_type="application/json"), m.body(body, response=True, eos=True)])
    ev = ex.finish()
    assert (ev.endpoint, ev.prompt_tokens, ev.completion_tokens, ev.total_tokens, ev.stream) == ("embeddings", 7, 0, 7, False)


def test_embeddings_without_usage_count_every_input_form_with_the_tokenizer():
    """An upstream that reports no usage: strings are tokenized, token-id inputs counted as they are."""
    count = TOKENIZERS.for_model("e").count
    body = orjson.dumps({"object": "list", "data": [{"embedding": [0.1]}] * 3, "model": "e"})
    cases = [("hello world", count("hello world")),
             (["hello", "good bye", [1, 2, 3], ["not", "ids"]], count("hello") + count("good bye") + 3),
             ([5, 6, 7, 8], 4)]
    for inputs, want in cases:
        ex = _exchange()
        _run(ex, [m.request_headers("/v1/embeddings"), m.body(orjson.dumps({"model": "e", "input": inputs}), eos=True),
                  m.response_headers(content_type="application/json"), m.body(body, response=True, eos=True)])
        ev = ex.finish()
        assert (ev.prompt_tokens, ev.total_tokens, ev.completion_tokens) == (want, want, 0), inputs
        assert ev.token_source == TokenSource.TOKENIZER and ev.tokenizer == TOKENIZERS.for_model("e").name


def test_aborted_completion_stream_counts_its_prompt_with_the_tokenizer():
    count = TOKENIZERS.for_model("m").count
    chunk = orjson.dumps({"id": "c", "object": "text_completion", "model": "m",
                          "choices": [{"index": 0, "text": " the answer", "finish_reason": None}]})
    for prompt, want_prompt in (("Say hi", count("Say hi")), (["first", "second"], count("first\nsecond"))):
        ex = _exchange()
        _run(ex, [m.request_headers("/v1/completions"),
                  m.body(orjson.dumps({"model": "m", "prompt": prompt, "stream": True}), eos=True),
                  m.response_headers(), m.body(m.sse(chunk), response=True)])
        ev = ex.finish()  # Envoy reset the stream here
        assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER_ESTIMATE
        assert (ev.prompt_tokens, ev.completion_tokens) == (want_prompt, count(" the answer")), prompt


def test_chat_content_parts_count_their_text_only():
    """OpenAI's list-of-parts content (text and images): the text parts are the prompt's text."""
    count = TOKENIZERS.for_model("m").count
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                             {"type": "text", "text": "briefly"}]}]
    plain = [{"role": "user", "content": "Describe this\nbriefly"}]
    counted = []
    for msgs in (messages, plain):
        ex = _exchange()
        _run(ex, [m.request_headers(), m.body(_chat_request(messages=msgs, stream=True), eos=True),
                  m.response_headers(), m.body(m.sse(_chunk("Sure")), response=True)])
        ev = ex.finish()
        assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER_ESTIMATE
        assert ev.completion_tokens == count("Sure")
        counted.append(ev.prompt_tokens)
    assert counted[0] == counted[1] > 0  # the image part adds no text


@pytest.mark.parametrize(("payload", "kind"), [(b"{not json", "malformed_request_json"),
                                               (b"\xff\xfe{}", "non_utf8_request"),
                                               (b"[1, 2]", "malformed_request_json")])
def test_bad_request_bodies_are_flagged_and_passed_through(payload, kind):
    ex = _exchange()
    resps = _run(ex, [m.request_headers(), m.body(payload, eos=True)])
    assert resps[1] == wire.continue_response(wire.REQUEST_BODY)
    _run(ex, [m.response_headers(400, "application/json"),
              m.body(b'{"error": {"message": "bad", "type": "BadRequestError", "code": 400}}', response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == kind and ev.http_status == 400 and ev.token_source == TokenSource.NONE


def test_upstream_error_is_flagged_with_message():
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(), eos=True), m.response_headers(503, "application/json"),
              m.body(b'{"error": {"message": "overloaded"}}', response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "upstream_error" and "overloaded" in ev.error_detail and ev.http_status == 503


def test_body_that_is_not_sse_is_flagged():
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True), m.response_headers(),
              m.body(b"<html>\nnot an event stream\n\n", response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "malformed_response"


def test_malformed_sse_json_is_flagged_and_stream_continues():
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True), m.response_headers(),
              m.body(m.sse(b"{broken", _chunk("ok", finish="stop"), _chunk(choices=False, usage=USAGE), "[DONE]"), response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "malformed_response" and ev.completion_tokens == 3


@pytest.mark.parametrize(("body", "detail"), [(b"", "empty response body"),
                                              (b"[1, 2]", "response body is not a JSON object"),
                                              (b"<html>bad gateway</html>", "response body is not JSON")])
def test_unusable_json_response_is_flagged(body, detail):
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(), eos=True),
              m.response_headers(content_type="application/json"), m.body(body, response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "malformed_response" and ev.error_detail.startswith(detail)
    # nothing to count from, and no guess: the event says so
    assert ev.http_status == 200 and not ev.client_aborted and ev.token_source == TokenSource.NONE


def test_oversized_json_response_is_flagged_not_parsed(monkeypatch):
    from extproc.processors import base

    monkeypatch.setattr(base, "MAX_JSON_BODY", 100)
    body = orjson.dumps({"model": "m", "choices": [], "usage": USAGE, "pad": "x" * 200})
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(), eos=True),
              m.response_headers(content_type="application/json"),
              m.body(body[:150], response=True), m.body(body[150:], response=True, eos=True)])
    ev = ex.finish()
    assert ev.error == "response_too_large" and ev.error_detail == f"{len(body)} bytes, not parsed"


def test_sse_events_that_are_not_chunks_are_flagged_and_the_stream_still_counts():
    """vLLM reports an engine failure mid-stream as an `error` event; anything that is not a JSON
    object is malformed. Either way the chunks around it still count, and the first problem wins."""
    error = orjson.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    for bad, kind, detail in ((error, "upstream_error", "engine died"),
                              (b"[1, 2]", "malformed_response", "SSE data is not a JSON object")):
        ex = _exchange()
        _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True), m.response_headers(),
                  m.body(m.sse(_chunk("one"), bad, _chunk(" two", finish="stop"), _chunk(choices=False, usage=USAGE),
                               "[DONE]"), response=True, eos=True)])
        ev = ex.finish()
        assert (ev.error, ev.error_detail) == (kind, detail)
        assert (ev.prompt_tokens, ev.completion_tokens) == (11, 3) and not ev.client_aborted


def test_json_answer_to_a_stream_request_is_parsed_as_json():
    body = orjson.dumps({"model": "m", "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
                         "usage": USAGE})
    ex = _exchange()
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True),
              m.response_headers(content_type="application/json"), m.body(body, response=True, eos=True)])
    ev = ex.finish()
    assert ev.stream and not ev.error and (ev.prompt_tokens, ev.completion_tokens) == (11, 3)


def test_unknown_path_passes_through_unmetered_but_counted():
    stats = SidecarStats()
    ex = _exchange(stats)
    resps = _run(ex, [m.request_headers("/v1/models", method="GET"), m.response_headers(200, "application/json")])
    assert resps[0].mode_override.response_body_mode == wire.ProcessingMode.NONE
    assert ex.response_done
    ev = ex.finish()
    assert not ev.metered and ev.endpoint == "unknown" and ev.http_status == 200 and not ev.client_aborted
    assert stats.unmetered_requests == 1


def test_label_injection_is_rejected():
    stats = SidecarStats()
    ex = _exchange(stats)
    _run(ex, [m.request_headers(x_team="a'; DROP TABLE usage_events; --", x_feature="x" * 500)])
    ev = ex.finish()
    assert ev.labels["team"] == "invalid" and ev.labels["feature"] == "invalid"
    assert stats.labels_rejected == {"team": 1, "feature": 1}


def test_headers_sent_as_value_not_raw_value():
    ex = _exchange()
    ex.handle("request_headers", m.headers({":method": "POST", ":path": "/v1/completions", "x-team": "t"}, raw=False).request_headers)
    assert ex.processor is not None and ex.event.labels["team"] == "t"


def test_streamed_request_body_in_observe_mode_is_read_but_never_rewritten():
    ex = _exchange()
    ex.observe = True
    body = _chat_request(stream=True)
    resps = _run(ex, [m.request_headers(), m.body(body[:7]), m.body(body[7:], eos=True)])
    assert not any(r.request_body.response.HasField("body_mutation") for r in resps[1:])
    stream = m.sse(_chunk("Hello"), _chunk(" there", finish="stop"), "[DONE]")
    _run(ex, [m.response_headers(), m.body(stream, response=True, eos=True)])
    ev = ex.finish()
    assert not ev.usage_injected and ev.stream and ev.request_model == "m"
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE
    assert ev.completion_tokens == TOKENIZERS.for_model("m").count("Hello there")


@pytest.mark.parametrize(("first", "kind"), [
    (b"data: {}\n\n", "text/event-stream"), (b"\n: keep-alive\n\n", "text/event-stream"),
    (b"event: x\ndata: 1\n\n", "text/event-stream"), (b'{"id": "c1"}', "application/json"),
    (b"d", "text/event-stream"), (b"da", "text/event-stream"), (b"\r\n d", "text/event-stream"),
    (b"{", "application/json"), (b"  [", "application/json"),
    (b"", None), (b" \n\r\t", None), (b"upstream connect error", "application/json"),
])
def test_framing_is_decided_by_the_first_non_blank_byte(first, kind):
    assert framing_of(first) == kind


def test_response_code_attribute_whatever_the_filter_name():
    assert wire.response_code(m.body(b"x", response=True, code=429, filter_name="extproc.response")) == 429
    assert wire.response_code(m.body(b"x", response=True)) is None


def test_client_hanging_up_after_done_is_not_an_abort():
    """The openai SDK closes the connection once it reads [DONE]; Envoy may then reset the
    ext_proc stream before its end-of-stream message: the client got everything."""
    ex = _exchange()
    stream = m.sse(_chunk("Hi", finish="stop"), _chunk(choices=False, usage=USAGE), "[DONE]")
    _run(ex, [m.request_headers(), m.body(_chat_request(stream=True), eos=True),
              m.response_headers(), m.body(stream, response=True)])  # no end-of-stream message follows
    ev = ex.finish()
    assert not ev.client_aborted and not ex.response_done
    assert (ev.prompt_tokens, ev.completion_tokens) == (11, 3) and ev.finish_reason == "stop"


# --- any sequence Envoy (or a broken peer) could send ---------------------------------------

_BODIES = st.one_of(
    st.sampled_from([_chat_request(stream=True), _chat_request(), _chat_request(stream=True, n=2),
                     orjson.dumps({"model": "m", "input": ["a", "b"]}), orjson.dumps({"prompt": "x", "model": "m"}),
                     b"data: " + _chunk("yo") + b"\n\n", b"data: " + _chunk(usage=USAGE, choices=False) + b"\n\n",
                     b"data: [DONE]\n\n", orjson.dumps({"choices": [{"message": {"content": "x"}}], "usage": USAGE}),
                     b'{"object":"error","message":"bad","code":400}', b"\xff\xfe", b"data: {\"choices\": 7}\n\n",
                     b"", b"[]", b"null", b'{"usage": {"prompt_tokens": -5, "completion_tokens": 1e300}}']),
    st.binary(max_size=64),
)
_PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/x", ""])
_MESSAGES = st.one_of(
    st.builds(lambda path, method, team, eos: m.headers({":method": method, ":path": path, "x-team": team,
                                                        "x-request-id": "r"}, eos=eos),
              _PATHS, st.sampled_from(["POST", "GET", ""]), st.text(max_size=12), st.booleans()),
    st.builds(lambda body, eos: m.body(body, eos=eos), _BODIES, st.booleans()),
    st.builds(lambda body, eos, code: m.body(body, response=True, eos=eos, code=code),
              _BODIES, st.booleans(), st.none() | st.integers(0, 999)),
    st.builds(lambda status, ct, eos: m.headers({":status": status, "content-type": ct}, response=True, eos=eos),
              st.sampled_from(["200", "500", "abc", ""]), st.sampled_from(["text/event-stream", "application/json", ""]),
              st.booleans()),
    st.just(wire.ProcessingRequest()),  # no oneof set
    st.just(wire.ProcessingRequest(request_trailers=wire.pb.HttpTrailers())),
    st.just(wire.ProcessingRequest(response_trailers=wire.pb.HttpTrailers())),
)


@settings(max_examples=400, deadline=None)
@given(msgs=st.lists(_MESSAGES, max_size=12), observe=st.booleans(),
       role=st.sampled_from(["", "", "request", "response"]))
def test_any_message_sequence_is_answered_in_kind_and_yields_at_most_one_storable_event(msgs, observe, role):
    stats, rec = SidecarStats(), RecordingSink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TOKENIZERS), [rec], stats)
    session = service.open_stream((("x-extproc-role", role),) if role else ())
    for msg in msgs:
        msg.observability_mode = observe
        resp = session.on_message(msg)
        kind = msg.WhichOneof("request")
        if observe or kind is None:
            assert resp is None
        else:  # Envoy fails the stream on an answer of another kind
            assert resp is not None and resp.WhichOneof("response") == kind
    session.close()
    session.close()
    service.sweep_pending(max_age_s=-1)  # hybrid request streams hand over, or are swept
    assert len(rec.events) <= 1 and stats.events_emitted == len(rec.events)
    for ev in rec.events:
        body = pbinput.encode([ev.SerializeToString()], 4096, ColumnStats())
        assert body and ev.event_id and ev.end_time_unix_nano >= ev.start_time_unix_nano


def test_immediate_error_is_an_openai_style_body_with_headers():
    resp = wire.immediate_error(429, "team search is over budget", error_type="rate_limit_error",
                                code="budget_exceeded", headers={"retry-after": "60"})
    imm = resp.immediate_response
    assert imm.status.code == 429
    assert orjson.loads(imm.body) == {"error": {"message": "team search is over budget",
                                                "type": "rate_limit_error", "param": None,
                                                "code": "budget_exceeded"}}
    got = {o.header.key: o.header.raw_value for o in imm.headers.set_headers}
    assert got == {"content-type": b"application/json", "retry-after": b"60"}
