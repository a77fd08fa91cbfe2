"""/v1/messages (Anthropic): input, output and cache tokens from the body and from
message_start / message_delta, the Anthropic error shape, the request as chat messages."""

from __future__ import annotations

import orjson

from extproc.events import TokenSource
from extproc.processors.messages import openai_messages
from tests.processor_helpers import TOKENIZERS, run, sse

REQ = {"model": "m", "max_tokens": 20, "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}


def _stream(output_tokens=7, cut_after_start=False):
    start = ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m-served",
        "usage": {"input_tokens": 15, "output_tokens": 0, "cache_read_input_tokens": 8}}})
    deltas = [
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
    ]
    end = [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": output_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return sse(start, *deltas) if cut_after_start else sse(start, *deltas, *end)


def test_json_usage_with_cache_tokens():
    body = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                         "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hello"}],
                         "stop_reason": "max_tokens", "usage": {
                             "input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 30,
                             "cache_creation_input_tokens": 12}})
    _, ev, _, _ = run("/v1/messages", REQ, 200, [body])
    assert (ev.endpoint, ev.operation, ev.token_source) == ("messages", "chat", TokenSource.UPSTREAM_USAGE)
    # Anthropic's input_tokens leaves out cache reads and writes; prompt_tokens holds all three
    assert (ev.prompt_tokens, ev.cached_tokens, ev.cache_creation_tokens, ev.completion_tokens) == (52, 30, 12, 5)
    assert ev.total_tokens == 57 and ev.finish_reason == "max_tokens"


def test_stream_input_from_message_start_output_from_message_delta():
    body = _stream()
    ex, ev, client, answer = run("/v1/messages", {**REQ, "stream": True}, 200,
                                 [body[i:i + 3] for i in range(0, len(body), 3)] + [b""])
    assert answer.request_body.response.body_mutation.WhichOneof("mutation") is None
    assert client == body and not ev.usage_injected
    assert (ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens, ev.total_tokens) == (23, 8, 7, 30)
    assert ev.response_model == "m-served" and ev.finish_reason == "end_turn" and not ev.client_aborted


def test_stream_cut_after_message_start_keeps_the_exact_input():
    _, ev, _, _ = run("/v1/messages", {**REQ, "stream": True}, 200, [_stream(cut_after_start=True)], eos=False)
    assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER_ESTIMATE  # output by the tiktoken stand-in
    assert ev.prompt_tokens == 23 and ev.cached_tokens == 8
    assert ev.completion_tokens == TOKENIZERS.for_model("m").count("Hello")


def test_message_stop_ends_the_stream_for_the_client():
    ex, ev, _, _ = run("/v1/messages", {**REQ, "stream": True}, 200, [_stream()], eos=False)
    assert not ev.client_aborted and ev.token_source == TokenSource.UPSTREAM_USAGE


def test_anthropic_errors():
    err = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: required"}})
    _, ev, _, _ = run("/v1/messages", REQ, 400, [err])
    assert ev.error == "upstream_error" and "max_tokens: required" in ev.error_detail
    mid = sse(("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
              ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    _, ev, _, _ = run("/v1/messages", {**REQ, "stream": True}, 200, [mid, b""])
    assert ev.error == "upstream_error" and "Overloaded" in ev.error_detail


def test_request_as_chat_messages():
    req = {"system": [{"type": "text", "text": "x-anthropic-billing-header: abc"}, {"type": "text", "text": "S"}],
           "messages": [
               {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"},
                                                 {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
           ]}
    assert openai_messages(req) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
        {"role": "assistant", "reasoning": "t", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"q":1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"}]
    ex, _, _, _ = run("/v1/messages", REQ, 200, [b"{}"])
    assert ex.processor.chat_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ex.processor.prompt_text() == "system\nBe brief.\nuser\nHi"


def test_chat_messages_render_to_the_simulators_prompt_count():
    """What the tokenizer fallback will render through the chat template (issue 12 item 6) is
    what vLLM (here the simulator, with the Llama 3 template) counts as input_tokens."""
    from extproc.devtools.sim import chat_apis
    from extproc.devtools.sim import generation as gen

    for req in (REQ, {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]}):
        ex, _, _, _ = run("/v1/messages", req, 200, [b"{}"])
        assert len(gen.chat_prompt_ids(ex.processor.chat_messages())) == \
            len(gen.chat_prompt_ids(chat_apis.anthropic_messages(req)))
