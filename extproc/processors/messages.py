"""/v1/messages (Anthropic Messages API as vLLM serves it).

Usage: `usage.input_tokens`, `output_tokens`, `cache_read_input_tokens`,
`cache_creation_input_tokens`. Anthropic counts cache reads and writes apart from input_tokens;
stored as prompt_tokens = input + cache read + cache creation (the OpenAI convention, where
cached tokens are part of the prompt), cached_tokens = cache read, cache_creation_tokens =
cache creation. A stream (SSE with `event:` lines) carries the input in `message_start` and the
cumulative output in `message_delta`, and ends with `message_stop`; vLLM always includes them,
so nothing is asked for. Errors: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.events import TokenSource, UsageEvent
from extproc.processors.base import (
    EndpointProcessor,
    RecountRequest,
    Usage,
    _as_int,
    _error_message,
)
from extproc.processors.responses import messages_text


def _blocks_text(content: Any, kinds: tuple[str, ...] = ("text",)) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if isinstance(block, dict) and block.get("type") in kinds:
            text = block.get("text") if block.get("type") != "thinking" else block.get("thinking")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        # vLLM drops Claude Code's per-request attribution block (it defeats prefix caching)
        return "".join(b["text"] for b in system if isinstance(b, dict) and b.get("type") == "text"
                       and isinstance(b.get("text"), str) and not b["text"].startswith("x-anthropic-billing-header"))
    return ""


def openai_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request as OpenAI chat messages, as vLLM converts it before the chat template: the
    system prompt (top-level and system-role messages) first, text blocks as content, thinking
    as reasoning, tool_use as tool calls, a user's tool_result as a tool message."""
    out: list[dict[str, Any]] = []
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    system = _system_text(request.get("system")) + "".join(
        _system_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "system")
    if system:
        out.append({"role": "system", "content": system})
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") == "system" or not isinstance(msg.get("role"), str):
            continue
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        converted: dict[str, Any] = {"role": role}
        texts, calls, reasoning = [], [], []
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
                texts.append(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
            elif kind == "tool_use":
                calls.append({"id": block.get("id", ""), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            elif kind == "tool_result":
                result = block.get("content")
                if role == "user":
                    text = result if isinstance(result, str) else "\n".join(
                        b.get("text", "") for b in result if isinstance(b, dict) and b.get("type") == "text"
                    ) if isinstance(result, list) else ""
                    out.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": text})
                else:  # vLLM writes the result as Python prints it (a list as its repr)
                    texts.append(f"Tool result: {result or ''}")
        if reasoning:
            converted["reasoning"] = "".join(reasoning)
        if calls:
            converted["tool_calls"] = calls
        if texts:
            converted["content"] = texts[0] if len(texts) == 1 else "\n".join(texts)
        # vLLM keeps an assistant turn even when empty; a user turn without text (tool results
        # only) is dropped
        if role != "user" or texts:
            out.append(converted)
    return out


class MessagesProcessor(EndpointProcessor):
    endpoint = "messages"
    operation = "chat"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._input = self._output = self._cache_read = self._cache_creation = 0
        self._usage_seen = False

    def _inject_usage(self, req: dict[str, Any]) -> bytes | None:
        return None  # vLLM always reports usage on a Messages stream

    def _take_usage(self, usage: Any, *, final: bool) -> None:
        if not isinstance(usage, dict):
            return
        self._usage_seen = True
        # message_delta may repeat the input (vLLM does) or omit it (Anthropic): keep the largest
        self._input = max(self._input, _as_int(usage.get("input_tokens")))
        self._cache_read = max(self._cache_read, _as_int(usage.get("cache_read_input_tokens")))
        self._cache_creation = max(self._cache_creation, _as_int(usage.get("cache_creation_input_tokens")))
        if final or "output_tokens" in usage:
            self._output = _as_int(usage.get("output_tokens"))  # cumulative: the last one wins
        if final:  # before message_delta the output is unknown: a stream cut there is counted
            prompt = self._prompt()
            self.usage = Usage(prompt=prompt, completion=self._output, total=prompt + self._output,
                               cached=self._cache_read)

    def _prompt(self) -> int:
        return self._input + self._cache_read + self._cache_creation

    def _on_sse_event(self, data: bytes, now_ns: int) -> bool:
        obj = self._sse_json(data)
        if obj is None:
            return True
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._record_output(self._choice({}), delta.get("text"), delta.get("thinking"), now_ns)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                model = message.get("model")
                if isinstance(model, str) and model:
                    self.response_model = model
                self._take_usage(message.get("usage"), final=False)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self._choice({}).finish_reason = delta["stop_reason"]
            self._take_usage(obj.get("usage"), final=True)
        elif kind == "message_stop":
            self.done_seen = True
        elif kind == "error":
            self._flag("upstream_error", _error_message(obj))
        return True

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        self.usage = None  # the base class read `usage` in the chat shape
        self._take_usage(obj.get("usage"), final=True)
        reason = obj.get("stop_reason")
        state = self._choice({})
        if isinstance(reason, str):
            state.finish_reason = reason
        content = obj.get("content")
        self._record_output(state, _blocks_text(content), _blocks_text(content, ("thinking",)), 0)

    def fill_event(self, ev: UsageEvent) -> None:
        super().fill_event(ev)
        if self.usage is not None:
            ev.cache_creation_tokens = self._cache_creation
        elif self._usage_seen and ev.token_source in (TokenSource.TOKENIZER, TokenSource.TOKENIZER_ESTIMATE):
            # message_start told the input exactly; only the output was counted
            ev.prompt_tokens = self._prompt()
            ev.cached_tokens, ev.cache_creation_tokens = self._cache_read, self._cache_creation
            ev.total_tokens = ev.prompt_tokens + ev.completion_tokens

    def chat_messages(self) -> list[dict[str, Any]] | None:
        return openai_messages(self.request) if self.request else None

    def recount_request(self) -> RecountRequest | None:
        # message_start already told the input exactly: /tokenize would only replace it with
        # a count of the converted chat
        return None if self._usage_seen else super().recount_request()

    def prompt_text(self) -> str:
        return messages_text(openai_messages(self.request))
