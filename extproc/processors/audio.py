"""/v1/audio/transcriptions and /v1/audio/translations: multipart requests (an audio file and
text fields), never parsed as JSON.

What vLLM reports: a `json` answer carries {"text", "usage": {"type": "duration", "seconds"}},
the audio's length, and no token counts; `text`, `srt` and `vtt` answers are plain text and
`verbose_json` has no usage but the `duration`. So audio_seconds is stored from vLLM, and the output tokens are
counted on the text by the model's tokenizer (token_source tokenizer). A stream (form field
stream=true) is SSE of chat-like `transcription.chunk` / `translation.chunk` events; its token
usage (prompt_tokens = the decoder's prompt, completion_tokens) comes in a last chunk only with
stream_include_usage=true, which the sidecar adds to the form (and removes that chunk again)
when the client did not ask for it.
"""

from __future__ import annotations

import math
from typing import Any

from extproc.events import TokenSource, UsageEvent
from extproc.processors.base import EndpointProcessor, RequestError, _as_int
from extproc.processors.multipart import add_field, form_fields
from extproc.tokenizers import TokenCounter

_TRUE = ("true", "True", "1")
_TEXT_FORMATS = ("text", "srt", "vtt")


class TranscriptionProcessor(EndpointProcessor):
    endpoint = "transcription"
    operation = "transcription"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio_seconds = 0

    def on_request_body(self, body: bytes, rewrite: bool = True) -> bytes | None:
        if not body:
            raise RequestError("malformed_request_multipart", "request body is empty")
        fields = form_fields(body)
        self.request = dict(fields)
        self.request_model = fields.get("model", "")
        self.stream = fields.get("stream", "").strip() in _TRUE
        if not (self.stream and rewrite and self.ctx.force_include_usage):
            return None
        if fields.get("stream_include_usage", "").strip() in _TRUE:
            return None
        self.usage_injected = self.strip_usage_chunk = True
        return add_field(body, "stream_include_usage", "true")

    def on_response_headers(self, status: int, content_type: str) -> None:
        super().on_response_headers(status, content_type)
        if status < 400:
            # the framing is the request's: a plain-text transcript may begin like an SSE field
            self.is_sse = self.stream

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._record_output(self._choice(choice), delta.get("content"), None, now_ns)

    def _finish_json_body(self) -> None:
        if self.status < 400 and self.request.get("response_format") in _TEXT_FORMATS:
            self.response_complete = True
            text = b"".join(self._body).decode("utf-8", "replace")
            self._body = []
            self._record_output(self._choice({}), text, None, 0)
            return
        super()._finish_json_body()

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        self.usage = None  # a duration, not tokens
        if isinstance(usage, dict) and usage.get("type") == "duration":
            seconds = usage.get("seconds")
            self.audio_seconds = _as_int(math.ceil(seconds) if isinstance(seconds, float) else seconds)
        elif isinstance(obj.get("duration"), (str, int, float)):
            # verbose_json: the duration itself, rounded up as vLLM rounds usage.seconds
            try:
                self.audio_seconds = _as_int(math.ceil(float(obj["duration"])))
            except (ValueError, OverflowError):
                self._flag("malformed_response", f"duration is not a number: {str(obj['duration'])[:50]}")
        text = obj.get("text")
        self._record_output(self._choice({}), text, None, 0)

    def fill_event(self, ev: UsageEvent) -> None:
        super().fill_event(ev)
        ev.audio_seconds = self.audio_seconds
        if ev.token_source in (TokenSource.TOKENIZER, TokenSource.TOKENIZER_ESTIMATE):
            ev.prompt_tokens = 0  # the input is audio: no text to count
            ev.total_tokens = ev.completion_tokens

    def count_prompt(self, counter: TokenCounter) -> tuple[int, bool]:
        # the input is audio, reported as audio_seconds: zero prompt tokens is exact, not a guess
        return 0, True

    def prompt_text(self) -> str:
        return ""


class TranslationProcessor(TranscriptionProcessor):
    endpoint = "translation"
    operation = "translation"
