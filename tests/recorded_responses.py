"""vLLM-shaped exchanges, one per route and framing, for tests that cut them into chunks.

Each is what a client sends and what vLLM answers (status, body bytes), in vLLM's wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Recorded:
    name: str
    path: str
    request: bytes
    status: int
    response: bytes


def _sse(*objs: object) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n\n" for o in objs)


def _chat_chunk(content: str | None, *, finish: str | None = None, role: bool = False) -> dict:
    delta: dict = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None}], "usage": None}


_CHAT_USAGE = {"prompt_tokens": 19, "completion_tokens": 4, "total_tokens": 23, "prompt_tokens_details": None}
_CHAT_REQ = {"model": "m", "messages": [{"role": "user", "content": "Say hello, world"}]}

CHAT_STREAM = Recorded(
    "chat-stream", "/v1/chat/completions", orjson.dumps({**_CHAT_REQ, "stream": True}), 200,
    _sse(_chat_chunk("", role=True), _chat_chunk("Hello"), _chat_chunk(", wörld"),
         _chat_chunk("!", finish="stop"),
         {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
          "choices": [], "usage": _CHAT_USAGE},
         b"[DONE]"),
)
CHAT_STREAM_CLIENT_USAGE = Recorded(
    "chat-stream-client-usage", "/v1/chat/completions",
    orjson.dumps({**_CHAT_REQ, "stream": True, "stream_options": {"include_usage": True}}), 200,
    CHAT_STREAM.response,
)
CHAT_JSON = Recorded(
    "chat-json", "/v1/chat/completions", orjson.dumps(_CHAT_REQ), 200,
    orjson.dumps({"id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, wörld!"},
                               "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
                  "usage": _CHAT_USAGE}),
)
CHAT_STREAM_ERROR = Recorded(
    "chat-stream-400", "/v1/chat/completions", orjson.dumps({**_CHAT_REQ, "stream": True}), 400,
    orjson.dumps({"object": "error", "message": "maximum context length is 8192 tokens",
                  "type": "BadRequestError", "param": None, "code": 400}),
)
COMPLETIONS_STREAM = Recorded(
    "completions-stream", "/v1/completions",
    orjson.dumps({"model": "m", "prompt": "Once upon", "stream": True, "max_tokens": 3}), 200,
    _sse(*({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": f, "stop_reason": None}],
            "usage": None} for t, f in ((" a", None), (" time", None), (",", "length"))),
         {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
          "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}},
         b"[DONE]"),
)
EMBEDDINGS_JSON = Recorded(
    "embeddings", "/v1/embeddings", orjson.dumps({"model": "e", "input": ["a b", "c"]}), 200,
    orjson.dumps({"id": "embd-1", "object": "list", "created": 1, "model": "e",
                  "data": [{"index": 0, "object": "embedding", "embedding": [0.1, -0.2]},
                           {"index": 1, "object": "embedding", "embedding": [0.3, 0.4]}],
                  "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0}}),
)



def _events(*pairs: tuple[str, dict]) -> bytes:
    """SSE with `event:` lines (Responses and Messages APIs)."""
    return b"".join(b"event: " + k.encode() + b"\ndata: " + orjson.dumps(o) + b"\n\n" for k, o in pairs)


_RESP_USAGE = {"input_tokens": 18, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21}
_RESP_REQ = {"model": "m", "input": "Say hello", "max_output_tokens": 3}


def _response(status: str, usage: dict | None, text: str = "") -> dict:
    output = [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}] if text else []
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "status": status,
            "output": output, "usage": usage}


RESPONSES_STREAM = Recorded(
    "responses-stream", "/v1/responses", orjson.dumps({**_RESP_REQ, "stream": True}), 200,
    _events(("response.created", {"type": "response.created", "sequence_number": 0,
                                  "response": _response("in_progress", None)}),
            *(("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": i,
                                              "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                              "delta": d}) for i, d in enumerate(("Hel", "lo, wö", "rld"), 1)),
            ("response.completed", {"type": "response.completed", "sequence_number": 4,
                                    "response": _response("completed", _RESP_USAGE, "Hello, wörld")})),
)
RESPONSES_JSON = Recorded(
    "responses-json", "/v1/responses", orjson.dumps(_RESP_REQ), 200,
    orjson.dumps(_response("completed", _RESP_USAGE, "Hello, wörld")),
)
_MSG_REQ = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Say hello"}]}
MESSAGES_STREAM = Recorded(
    "messages-stream", "/v1/messages", orjson.dumps({**_MSG_REQ, "stream": True}), 200,
    _events(("message_start", {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 0}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": d}}) for d in ("Hel", "lo, wö", "rld")),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                               "usage": {"input_tokens": 11, "output_tokens": 3}}),
            ("message_stop", {"type": "message_stop"})),
)
MESSAGES_JSON = Recorded(
    "messages-json", "/v1/messages", orjson.dumps(_MSG_REQ), 200,
    orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                  "content": [{"type": "text", "text": "Hello, wörld"}], "stop_reason": "max_tokens",
                  "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 3}}),
)
MESSAGES_ERROR = Recorded(
    "messages-stream-404", "/v1/messages", orjson.dumps({**_MSG_REQ, "stream": True}), 404,
    orjson.dumps({"type": "error", "error": {"type": "not_found_error", "message": "The model `m` does not exist."}}),
)

_POOL_USAGE = {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0, "prompt_tokens_details": None}
RERANK_JSON = Recorded(
    "rerank", "/v1/rerank", orjson.dumps({"model": "m", "query": "q", "documents": ["dé one", "d two"]}), 200,
    orjson.dumps({"id": "rerank-1", "model": "m", "usage": {"prompt_tokens": 9, "total_tokens": 9},
                  "results": [{"index": 1, "document": {"text": "d two"}, "relevance_score": 0.8},
                              {"index": 0, "document": {"text": "dé one"}, "relevance_score": 0.1}]}),
)
SCORE_JSON = Recorded(
    "score", "/score", orjson.dumps({"model": "m", "text_1": "q", "text_2": ["a", "b"]}), 200,
    orjson.dumps({"id": "score-1", "object": "list", "created": 1, "model": "m",
                  "data": [{"index": 0, "object": "score", "score": 0.25}, {"index": 1, "object": "score", "score": 0.5}],
                  "usage": _POOL_USAGE}),
)
CLASSIFY_JSON = Recorded(
    "classify", "/classify", orjson.dumps({"model": "m", "input": ["good", "bad"]}), 200,
    orjson.dumps({"id": "classify-1", "object": "list", "created": 1, "model": "m",
                  "data": [{"index": 0, "label": "positive", "probs": [0.1, 0.9], "num_classes": 2}],
                  "usage": _POOL_USAGE}),
)
POOLING_JSON = Recorded(
    "pooling", "/pooling", orjson.dumps({"model": "m", "input": "x"}), 200,
    orjson.dumps({"id": "pool-1", "object": "list", "created": 1, "model": "m",
                  "data": [{"index": 0, "object": "pooling", "data": [0.5, -0.5]}], "usage": _POOL_USAGE}),
)
COHERE_EMBED_JSON = Recorded(
    "cohere-embed", "/v2/embed", orjson.dumps({"model": "m", "texts": ["a", "b"], "input_type": "search_query"}), 200,
    orjson.dumps({"id": "embd-1", "embeddings": {"float": [[0.1], [0.2]]}, "texts": ["a", "b"],
                  "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 4}}}),
)
INVOCATIONS_CHAT_STREAM = Recorded(
    "invocations-chat-stream", "/invocations", CHAT_STREAM.request, 200, CHAT_STREAM.response,
)

_FORM = b"\r\n".join([
    b"--f0rm", b'Content-Disposition: form-data; name="model"', b"", b"m",
    b"--f0rm", b'Content-Disposition: form-data; name="file"; filename="a.wav"', b"Content-Type: audio/wav", b"",
    b"RIFF\x00\x00data\r\n--f0rmless", b"--f0rm--", b""])


def _form(**fields: str) -> bytes:
    head = b"".join(b'--f0rm\r\nContent-Disposition: form-data; name="' + k.encode() + b'"\r\n\r\n' + v.encode()
                    + b"\r\n" for k, v in fields.items())
    return head + _FORM


def _speech_chunk(content: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if content is None else [{"delta": {"content": content}, "finish_reason": finish, "stop_reason": None}]
    return {"id": "t-1", "object": "transcription.chunk", "created": 1, "model": "m", "choices": choices,
            **({"usage": usage} if usage else {})}


TRANSCRIPTION_JSON = Recorded(
    "transcription-json", "/v1/audio/transcriptions", _form(), 200,
    orjson.dumps({"text": "Hello, wörld", "usage": {"type": "duration", "seconds": 3}}),
)
TRANSLATION_TEXT = Recorded(
    "translation-text", "/v1/audio/translations", _form(response_format="text"), 200,
    "data: this transcript looks like SSE, wörld".encode(),
)
TRANSCRIPTION_STREAM = Recorded(
    "transcription-stream", "/v1/audio/transcriptions", _form(stream="true"), 200,
    _sse(_speech_chunk("Hel"), _speech_chunk("lo, wörld", "stop"),
         _speech_chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}), b"[DONE]"),
)

ALL = (CHAT_STREAM, CHAT_STREAM_CLIENT_USAGE, CHAT_JSON, CHAT_STREAM_ERROR, COMPLETIONS_STREAM,
       EMBEDDINGS_JSON, RESPONSES_STREAM, RESPONSES_JSON, MESSAGES_STREAM, MESSAGES_JSON, MESSAGES_ERROR,
       RERANK_JSON, SCORE_JSON, CLASSIFY_JSON, POOLING_JSON, COHERE_EMBED_JSON, INVOCATIONS_CHAT_STREAM,
       TRANSCRIPTION_JSON, TRANSLATION_TEXT, TRANSCRIPTION_STREAM)
