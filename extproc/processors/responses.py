"""/v1/responses (OpenAI Responses API as vLLM serves it).

Usage: the response object's `usage` (input_tokens, input_tokens_details.cached_tokens,
output_tokens, output_tokens_details.reasoning_tokens). A stream is SSE with `event:` lines and
no [DONE]; the usage comes in the `response.completed` event (or `response.incomplete` /
`response.failed`), which vLLM always sends: nothing needs to be asked for, nothing removed.
Output text arrives as `response.output_text.delta`, reasoning as `response.reasoning_text.delta`.
"""

from __future__ import annotations

from typing import Any

from extproc.processors.base import (
    EndpointProcessor,
    RecountRequest,
    Usage,
    _as_int,
    _error_message,
)
from extproc.tokenizers import TokenCounter

_TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
# The events after which vLLM sends nothing more.
_FINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))


def parse_usage(usage: dict[str, Any]) -> Usage:
    u = Usage(prompt=_as_int(usage.get("input_tokens")), completion=_as_int(usage.get("output_tokens")),
              total=_as_int(usage.get("total_tokens")))
    details = usage.get("input_tokens_details")
    if isinstance(details, dict):
        u.cached = _as_int(details.get("cached_tokens"))
    details = usage.get("output_tokens_details")
    if isinstance(details, dict):
        u.reasoning = _as_int(details.get("reasoning_tokens"))
    return u


def _parts_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str))
    return ""


def _first_text(content: Any) -> str | None:
    """An assistant item's text as vLLM takes it: the string, or the first part's text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        return text if isinstance(text, str) else None
    return None


def _item_message(item: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any] | None:
    """One input item as a chat message, or None when it was folded into `prev`: vLLM folds a
    function call, a reasoning item or an assistant text into the assistant message before it
    while that message lacks the part, so an agent's turn stays one message."""
    assistant = prev if prev is not None and prev.get("role") == "assistant" else None
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"id": item.get("call_id", ""), "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")}}
        if assistant is not None:
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        content, summary = item.get("content"), item.get("summary")
        source = content if isinstance(content, list) and content else summary
        reasoning = _first_text(source if isinstance(source, list) and source else None) or ""
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id", ""),
                "content": output if isinstance(output, str) else _parts_text(output)}
    if kind != "message" or not isinstance(item.get("role"), str):
        return None  # not a prompt item (vLLM refuses what it cannot render)
    if item["role"] == "assistant":
        text = _first_text(item.get("content"))
        if text is not None:
            if assistant is not None and assistant.get("content") is None:
                assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    return {"role": item["role"], "content": _parts_text(item.get("content"))}


def input_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request as OpenAI chat messages, as vLLM builds them before the chat template:
    instructions as the system message, a string input as one user message, input items as
    messages (function calls as assistant tool calls, their outputs as tool messages, reasoning
    as the assistant's reasoning). A previous_response_id's stored history is vLLM's alone."""
    out: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    items = request.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return out
    if not isinstance(items, list):
        return out
    for item in items:
        if isinstance(item, dict):
            message = _item_message(item, out[-1] if out else None)
            if message is not None:
                out.append(message)
    return out


def messages_text(messages: list[dict[str, Any]]) -> str:
    """Role and text of each message, for a tokenizer count when no chat template is at hand."""
    parts = []
    for msg in messages:
        content = msg.get("content")
        text = content if isinstance(content, str) else ""
        for call in msg.get("tool_calls", ()):
            fn = call.get("function", {})
            text += f"{fn.get('name', '')}({fn.get('arguments', '')})"
        if isinstance(msg.get("reasoning"), str):
            text = msg["reasoning"] + text
        parts.append(f"{msg.get('role', '')}\n{text}")
    return "\n".join(parts)


class ResponsesProcessor(EndpointProcessor):
    endpoint = "responses"
    operation = "chat"

    def _inject_usage(self, req: dict[str, Any]) -> bytes | None:
        return None  # a Responses stream always ends with the usage

    def _on_sse_event(self, data: bytes, now_ns: int) -> bool:
        obj = self._sse_json(data)
        if obj is None:
            return True
        kind = obj.get("type")
        if kind == "response.output_text.delta":
            self._record_output(self._choice({}), obj.get("delta"), None, now_ns)
        elif kind in ("response.reasoning_text.delta", "response.reasoning.delta"):
            self._record_output(self._choice({}), None, obj.get("delta"), now_ns)
        elif kind == "error":
            self._flag("upstream_error", _error_message(obj) if "error" in obj else str(obj.get("message"))[:500])
        elif isinstance(kind, str) and kind.startswith("response."):
            response = obj.get("response")
            if isinstance(response, dict):
                self._on_response_object(response, streamed=True)
            if kind in _FINAL:
                self.done_seen = True
                if kind == "response.failed" and not self.error:
                    err = response.get("error") if isinstance(response, dict) else None
                    self._flag("upstream_error", _error_message({"error": err}) if err else "response.failed")
        return True

    def _on_response_object(self, response: dict[str, Any], *, streamed: bool) -> None:
        model = response.get("model")
        if isinstance(model, str) and model:
            self.response_model = model
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = parse_usage(usage)
        status = response.get("status")
        if isinstance(status, str) and status not in ("in_progress", "queued"):
            state = self._choice({})
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            state.finish_reason = reason if isinstance(reason, str) and reason else status
        if streamed:
            return  # the output text came as deltas
        output = response.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                self._record_output(self._choice({}), _parts_text(item.get("content")), None, 0)
            elif item.get("type") == "reasoning":
                self._record_output(self._choice({}), None, _parts_text(item.get("content")), 0)

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        # the base class read `usage` in the chat shape; this one replaces it
        self.usage = None
        self._on_response_object(obj, streamed=False)

    def chat_messages(self) -> list[dict[str, Any]] | None:
        return input_messages(self.request) if self.request else None

    def _continues(self) -> bool:
        # vLLM prepends the stored conversation of previous_response_id, which only it holds
        return bool(self.request.get("previous_response_id"))

    def count_prompt(self, counter: TokenCounter) -> tuple[int, bool]:
        count, exact = super().count_prompt(counter)
        return count, exact and not self._continues()

    def recount_request(self) -> RecountRequest | None:
        return None if self._continues() else super().recount_request()

    def prompt_text(self) -> str:
        return messages_text(input_messages(self.request))
