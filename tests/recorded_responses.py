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

ALL = (CHAT_STREAM, CHAT_STREAM_CLIENT_USAGE, CHAT_JSON, CHAT_STREAM_ERROR, COMPLETIONS_STREAM,
       EMBEDDINGS_JSON)
