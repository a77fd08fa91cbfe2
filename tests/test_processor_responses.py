"""/v1/responses: usage from the body and from response.completed, nothing injected, the
tokenizer fallback over the request converted to chat messages, failures flagged."""

from __future__ import annotations

import orjson

from extproc.events import TokenSource
from extproc.processors.responses import input_messages
from tests.processor_helpers import TOKENIZERS, run, sse

USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 16}, "output_tokens": 9,
         "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 30}
REQ = {"model": "m", "instructions": "Be brief.", "input": [{"role": "user", "content": "Hi there"}]}


def _resp(status="completed", usage=USAGE, **extra):
    return {"id": "resp_1", "object": "response", "model": "m", "status": status, "usage": usage,
            "output": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}]},
                       {"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hello!"}]}], **extra}


def _stream(final="response.completed", usage=USAGE):
    return sse(("response.created", {"type": "response.created", "response": _resp("in_progress", None)}),
               ("response.reasoning_text.delta", {"type": "response.reasoning_text.delta", "delta": "think"}),
               ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hello"}),
               ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "!"}),
               (final, {"type": final, "response": _resp("completed" if final == "response.completed"
                                                         else "failed", usage)}))


def test_json_usage():
    _, ev, client, answer = run("/v1/responses", REQ, 200, [orjson.dumps(_resp())])
    assert (ev.endpoint, ev.operation, ev.token_source) == ("responses", "chat", TokenSource.UPSTREAM_USAGE)
    assert (ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens, ev.reasoning_tokens, ev.total_tokens) == \
        (21, 16, 9, 4, 30)
    assert ev.finish_reason == "completed" and not ev.error and not ev.client_aborted


def test_stream_usage_from_response_completed_and_nothing_injected():
    body = _stream()
    ex, ev, client, answer = run("/v1/responses", {**REQ, "stream": True}, 200, [body[:7], body[7:], b""])
    assert answer.request_body.response.body_mutation.WhichOneof("mutation") is None  # request untouched
    assert client == body and not ev.usage_injected and ev.stream
    assert (ev.prompt_tokens, ev.completion_tokens, ev.reasoning_tokens) == (21, 9, 4)
    assert ev.token_source == TokenSource.UPSTREAM_USAGE and ev.response_events == 5


def test_incomplete_reason_is_the_finish_reason():
    body = orjson.dumps(_resp("incomplete", incomplete_details={"reason": "max_output_tokens"}))
    assert run("/v1/responses", REQ, 200, [body])[1].finish_reason == "max_output_tokens"


def test_stream_cut_before_completion_is_counted_by_the_tokenizer():
    body = _stream()
    cut = body[:body.index(b"event: response.completed")]
    _, ev, _, _ = run("/v1/responses", {**REQ, "stream": True}, 200, [cut], eos=False)
    counter = TOKENIZERS.for_model("m")
    assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER_ESTIMATE  # no model tokenizer configured
    assert ev.completion_tokens == counter.count("Hello!") + counter.count("think")
    assert ev.prompt_tokens == counter.count("system\nBe brief.\nuser\nHi there") > 0


def test_failed_response_and_error_event_are_flagged():
    _, ev, _, _ = run("/v1/responses", {**REQ, "stream": True}, 200, [_stream("response.failed"), b""])
    assert ev.error == "upstream_error" and not ev.client_aborted
    err = sse(("error", {"type": "error", "code": "x", "message": "engine died", "param": None}))
    _, ev, _, _ = run("/v1/responses", {**REQ, "stream": True}, 200, [err, b""])
    assert ev.error == "upstream_error" and "engine died" in ev.error_detail


def test_upstream_error_status_and_bad_bodies():
    err = orjson.dumps({"error": {"message": "model not found", "type": "NotFoundError", "code": 404}})
    _, ev, _, _ = run("/v1/responses", REQ, 404, [err])
    assert ev.error == "upstream_error" and "model not found" in ev.error_detail and ev.token_source == 3
    _, ev, _, _ = run("/v1/responses", {**REQ, "stream": True}, 200, [b"event: x\ndata: {nope\n\n", b""])
    assert ev.error == "malformed_response"
    _, ev, _, _ = run("/v1/responses", REQ, 200, [b"[1, 2]"])
    assert ev.error == "malformed_response"


def test_input_as_chat_messages():
    req = {"instructions": "sys", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_image", "image_url": "x"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        "junk"]}
    assert input_messages(req) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert input_messages({"input": "hello"}) == [{"role": "user", "content": "hello"}]
    # an agent's turn (reasoning, text, calls) is one assistant message, as vLLM folds it
    turn = {"input": [
        {"role": "user", "content": "go"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}],
         "content": [{"type": "reasoning_text", "text": "r1"}, {"type": "reasoning_text", "text": "r2"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "t1"},
                                                             {"type": "output_text", "text": "t2"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "42"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "only a summary"}]},
        {"type": "reasoning", "summary": []}]}
    assert input_messages(turn) == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "reasoning": "r1", "content": "t1", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "reasoning": "only a summary"}, {"role": "assistant", "reasoning": ""}]
    ex, _, _, _ = run("/v1/responses", {"model": "m", "input": "hello"}, 200, [orjson.dumps(_resp())])
    assert ex.processor.chat_messages() == [{"role": "user", "content": "hello"}]


def test_chat_messages_render_to_the_simulators_prompt_count():
    """What the tokenizer fallback will render through the chat template (issue 12 item 6) is
    what vLLM (here the simulator, with the Llama 3 template) counts as input_tokens."""
    from extproc.devtools.sim import chat_apis
    from extproc.devtools.sim import generation as gen

    for req in ({"model": "m", "input": "Hello there"},
                {"model": "m", "instructions": "Be brief.", "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
                    {"role": "user", "content": "What is a meter?"}]}):
        ex, _, _, _ = run("/v1/responses", req, 200, [b"{}"])
        assert len(gen.chat_prompt_ids(ex.processor.chat_messages())) == \
            len(gen.chat_prompt_ids(chat_apis.responses_messages(req)))
