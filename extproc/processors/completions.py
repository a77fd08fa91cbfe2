"""/v1/completions: output in choices[].text."""

from __future__ import annotations

from typing import Any

from extproc.processors.base import EndpointProcessor


class CompletionsProcessor(EndpointProcessor):
    endpoint = "completions"
    operation = "text_completion"

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        self._record_output(self._choice(choice), choice.get("text"), None, now_ns)

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._record_output(self._choice(choice), choice.get("text"), None, 0)

    def text_prompts(self) -> list[str] | None:
        prompt = self.request.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return prompt
        return None

    def prompt_text(self) -> str:
        prompt = self.request.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):
            # Token-id prompts are counted by length below; strings are joined.
            return "\n".join(p for p in prompt if isinstance(p, str))
        return ""
