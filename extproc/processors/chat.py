"""/v1/chat/completions: output in delta.content, reasoning in delta.reasoning (vLLM) or
delta.reasoning_content (older vLLM)."""

from __future__ import annotations

from typing import Any

from extproc.processors.base import EndpointProcessor


def _reasoning(obj: dict[str, Any]) -> Any:
    value = obj.get("reasoning")
    return value if value is not None else obj.get("reasoning_content")


def _content_text(content: Any) -> str:
    """Message content is a string or a list of parts; only text parts count as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


class ChatProcessor(EndpointProcessor):
    endpoint = "chat"
    operation = "chat"

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        state = self._choice(choice)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._record_output(state, delta.get("content"), _reasoning(delta), now_ns)

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            state = self._choice(choice)
            message = choice.get("message")
            if isinstance(message, dict):
                self._record_output(state, _content_text(message.get("content")), _reasoning(message), 0)

    def chat_messages(self) -> list[dict[str, Any]] | None:
        messages = self.request.get("messages")
        if not isinstance(messages, list):
            return None
        return [m for m in messages if isinstance(m, dict)]

    def prompt_text(self) -> str:
        messages = self.request.get("messages")
        if not isinstance(messages, list):
            return ""
        parts = []
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', '')}\n{_content_text(m.get('content'))}")
        return "\n".join(parts)
