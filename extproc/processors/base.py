"""What every OpenAI-compatible endpoint shares: request parsing, usage injection, SSE and
JSON response handling, and turning what was seen into token counts.

Subclasses say where output text lives in a chunk and how to estimate prompt tokens.
Nothing here does I/O: the stream loop feeds bytes in and reads the result out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.chat_template import ChatTemplateError
from extproc.events import TokenSource, UsageEvent
from extproc.sse import DEFAULT_MAX_EVENT_BYTES, SSEParser
from extproc.tokenizers import TokenCounter, TokenizerRegistry

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 4096
# A JSON response body larger than this is not ours to parse (nor to hold in memory).
MAX_JSON_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProcessorContext:
    tokenizers: TokenizerRegistry
    force_include_usage: bool = True
    # metering.unknown_post and metering.path_prefixes (see processors/routing.py)
    unknown_post: str = "pass"
    path_prefixes: tuple[str, ...] = ()
    # Per-request memory bounds (metering.* settings): one SSE event, the request body read
    # in pieces (observability mode streams it), the output text kept for a tokenizer count.
    max_sse_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_request_body_bytes: int = 8 * 1024 * 1024
    max_output_text_chars: int = 4 * 1024 * 1024


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    reasoning: int = 0


@dataclass(slots=True)
class ChoiceState:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str = ""
    # Tokens of text already counted and let go (the output text limit), and of reasoning.
    text_counted: int = 0
    reasoning_counted: int = 0


@dataclass(frozen=True, slots=True)
class RecountRequest:
    """/tokenize bodies (vLLM's) that count an event's tokens as the served model does: the
    prompt (one body per prompt, summed), each choice's output text and reasoning text."""

    prompt: list[dict[str, Any]]
    output: list[dict[str, Any]] = field(default_factory=list)
    reasoning: list[dict[str, Any]] = field(default_factory=list)


class RequestError(Exception):
    """Bad input from client or upstream: recorded on the event, never raised past the stream."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


class EndpointProcessor:
    endpoint = "unknown"
    # gen_ai.operation.name (OpenTelemetry GenAI), stored as UsageEvent.operation
    operation = ""
    streams = True  # endpoint supports stream=true
    has_output = True  # False: input tokens only (embeddings, rerank, ...): nothing to reserve for output
    # Set by on_request_body when another processor meters this request (/invocations)
    delegate: EndpointProcessor | None = None

    def __init__(self, ctx: ProcessorContext) -> None:
        self.ctx = ctx
        self.request: dict[str, Any] = {}
        self.request_model = ""
        self.response_model = ""
        self.stream = False
        self.n = 1
        self.usage_injected = False
        # Client did not ask for the usage chunk we made vLLM send: remove it on the way out.
        self.strip_usage_chunk = False
        self.status = 0
        self.is_sse = False
        self.usage: Usage | None = None
        self.choices: dict[int, ChoiceState] = {}
        self.first_output_ns = 0
        # Running estimate for live metrics: one per output delta (vLLM sends ~1 token each).
        self.live_output_tokens = 0
        self.response_events = 0
        self.error = ""
        self.error_detail = ""
        self.response_complete = False
        # data: [DONE] seen: the stream is over for the client even if Envoy's end-of-stream
        # never reaches us (clients such as the openai SDK hang up right after it).
        self.done_seen = False
        self._sse = SSEParser(ctx.max_sse_event_bytes)
        self._body: list[bytes] = []
        self._body_len = 0
        # Output text characters kept across choices (a str length is free, its UTF-8 size is not).
        self._text_kept = 0
        # Times the kept text went over metering.max_output_text_chars and was counted in pieces.
        self.text_segments = 0

    # -- request ---------------------------------------------------------------------------

    def on_request_body(self, body: bytes, rewrite: bool = True) -> bytes | None:
        """Parse the whole request; return a replacement body or None (always None when
        `rewrite` is off: observability mode cannot change the request)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("non_utf8_request", f"request body is not UTF-8: {exc}") from None
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise RequestError("malformed_request_json", f"request body is not JSON: {exc}") from None
        if not isinstance(req, dict):
            raise RequestError("malformed_request_json", "request body is not a JSON object")
        self.request = req
        model = req.get("model")
        self.request_model = model if isinstance(model, str) else ""
        self.stream = req.get("stream") is True and self.streams
        n = req.get("n", 1)
        self.n = n if isinstance(n, int) and n > 0 else 1
        if self.stream and rewrite and self.ctx.force_include_usage:
            return self._inject_usage(req)
        return None

    def _inject_usage(self, req: dict[str, Any]) -> bytes | None:
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return None
        opts = dict(opts) if isinstance(opts, dict) else {}
        opts["include_usage"] = True
        # Without include_usage the client would never have seen per-chunk usage; keep it so.
        opts["continuous_usage_stats"] = False
        req["stream_options"] = opts
        self.usage_injected = True
        self.strip_usage_chunk = True
        return orjson.dumps(req)

    # -- response --------------------------------------------------------------------------

    def on_response_headers(self, status: int, content_type: str) -> None:
        self.status = status
        self.is_sse = content_type.startswith("text/event-stream")
        if status >= 400 and not self.error:
            self.error = "upstream_error"
        elif self.stream and not self.is_sse:
            # A JSON answer to a stream request is legal only for errors; keep parsing as JSON.
            log.warning("stream request answered with content-type %r", content_type)

    @property
    def rewrites_response(self) -> bool:
        return self.strip_usage_chunk and self.is_sse and self.status < 400

    def on_response_chunk(self, chunk: bytes, end_of_stream: bool, now_ns: int) -> bytes | None:
        """Consume a body chunk; return replacement bytes when the chunk must change."""
        if self.is_sse and self.status < 400:
            return self._on_sse_chunk(chunk, end_of_stream, now_ns)
        if chunk:
            if not self.first_output_ns and self.status < 400:
                self.first_output_ns = now_ns
            limit = MAX_ERROR_BODY if self.status >= 400 else MAX_JSON_BODY
            if self._body_len < limit:
                self._body.append(chunk)
            self._body_len += len(chunk)
        if end_of_stream:
            self._finish_json_body()
        return None

    def _on_sse_chunk(self, chunk: bytes, end_of_stream: bool, now_ns: int) -> bytes | None:
        events = self._sse.feed(chunk) if chunk else []
        if end_of_stream:
            events.extend(self._sse.flush())
            self.response_complete = True
        kept: list[bytes] | None = [] if self.rewrites_response else None
        for ev in events:
            if ev.oversized:  # passed on unread: its tokens are not in the text counted
                self._flag("sse_event_too_large", f"an SSE event exceeded metering.max_sse_event_bytes "
                           f"({self.ctx.max_sse_event_bytes} bytes); its content was not metered")
                if kept is not None:
                    kept.append(ev.raw)
                continue
            self.response_events += 1
            if self._on_sse_event(ev.data, now_ns) and kept is not None:
                kept.append(ev.raw)
        if end_of_stream and self._sse.garbage_lines and not self.error:
            self._flag("malformed_response", f"{self._sse.garbage_lines} non-SSE lines in event stream")
        if kept is None:
            return None
        out = b"".join(kept)
        # Unfinished event bytes wait for the next chunk, so a usage chunk split across chunks
        # can still be removed whole; Envoy is told to drop what we hold back.
        return out if out != chunk else None

    def _on_sse_event(self, data: bytes, now_ns: int) -> bool:
        """Handle one event; return False to drop it from the client's stream."""
        if data == b"[DONE]":
            self.done_seen = True
            return True
        obj = self._sse_json(data)
        if obj is None:
            return True
        if "error" in obj and "choices" not in obj:
            self._flag("upstream_error", _error_message(obj))
            return True
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.response_model = model
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # Cumulative with continuous_usage_stats: the last one wins, never a sum.
            self.usage = _parse_usage(usage)
        choices = obj.get("choices")
        if isinstance(choices, list):
            if not choices and isinstance(usage, dict) and self.strip_usage_chunk:
                return False
            for choice in choices:
                if isinstance(choice, dict):
                    self._on_stream_choice(choice, now_ns)
        return True

    def _sse_json(self, data: bytes) -> dict[str, Any] | None:
        """An event's data as a JSON object, or None (flagged malformed_response)."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._flag("malformed_response", f"SSE data is not JSON: {exc}")
            return None
        if not isinstance(obj, dict):
            self._flag("malformed_response", "SSE data is not a JSON object")
            return None
        return obj

    def _choice(self, choice: dict[str, Any]) -> ChoiceState:
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState()
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            state.finish_reason = reason
        return state

    def _record_output(self, state: ChoiceState, text: Any, reasoning: Any, now_ns: int) -> None:
        got = False
        if isinstance(text, str) and text:
            state.text.append(text)
            self._text_kept += len(text)
            got = True
        if isinstance(reasoning, str) and reasoning:
            state.reasoning.append(reasoning)
            self._text_kept += len(reasoning)
            got = True
        if got:
            self.live_output_tokens += 1
            if not self.first_output_ns:
                self.first_output_ns = now_ns
            if self._text_kept > self.ctx.max_output_text_chars:
                self._count_kept_text()

    def _count_kept_text(self) -> None:
        """Over the output text limit: count what is kept and let it go. Each cut can split a
        token, so a count made of pieces can differ from the whole text's by a token per cut."""
        self.text_segments += 1
        if self.text_segments == 1:
            log.warning("%s response: output text over metering.max_output_text_chars (%d); counted in pieces",
                        self.endpoint, self.ctx.max_output_text_chars)
        counter = self.ctx.tokenizers.for_model(self.request_model)
        for c in self.choices.values():
            if c.text:
                c.text_counted += counter.count("".join(c.text))
                c.text = []
            if c.reasoning:
                c.reasoning_counted += counter.count("".join(c.reasoning))
                c.reasoning = []
        self._text_kept = 0

    def _finish_json_body(self) -> None:
        self.response_complete = True
        body = b"".join(self._body)
        self._body = []
        if self.status >= 400:
            detail = body[:MAX_ERROR_BODY].decode("utf-8", "replace")
            try:
                obj = orjson.loads(body)
                detail = _error_message(obj) if isinstance(obj, dict) else detail
            except orjson.JSONDecodeError:
                pass
            self._flag("upstream_error", f"HTTP {self.status}: {detail}")
            return
        if self._body_len > MAX_JSON_BODY:
            self._flag("response_too_large", f"{self._body_len} bytes, not parsed")
            return
        if not body:
            self._flag("malformed_response", "empty response body")
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if self._recover_as_sse(body):
                return
            self._flag("malformed_response", f"response body is not JSON: {exc}")
            return
        if not isinstance(obj, dict):
            self._flag("malformed_response", "response body is not a JSON object")
            return
        model = obj.get("model")
        self.response_model = model if isinstance(model, str) else ""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = _parse_usage(usage)
        self._on_json_response(obj)

    def _recover_as_sse(self, body: bytes) -> bool:
        """The framing was guessed from the body's first byte; an event stream behind an
        unexpected first byte (a byte-order mark, say) is still metered once it has ended.
        Nothing can be removed from what the client already received."""
        if b"data:" not in body:
            return False
        events = self._sse.feed(body)
        events.extend(self._sse.flush())
        if not events:
            return False
        log.warning("%s response read as JSON was an event stream; metered at its end", self.endpoint)
        self.is_sse = True
        self.strip_usage_chunk = False
        for ev in events:
            self.response_events += 1
            self._on_sse_event(ev.data, 0)
        return True

    def _flag(self, kind: str, detail: str) -> None:
        if not self.error:  # the first problem is the one to report
            self.error = kind
        if not self.error_detail:
            self.error_detail = detail[:500]
            log.warning("%s request: %s: %s", self.endpoint, kind, detail[:500])

    # -- endpoint specifics ----------------------------------------------------------------

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        raise NotImplementedError

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def prompt_text(self) -> str:
        """Text to count as the prompt when upstream reports no usage."""
        return ""

    def chat_messages(self) -> list[dict[str, Any]] | None:
        """The prompt as OpenAI chat messages (what the model's chat template renders), or
        None when the prompt is not a chat."""
        return None

    def text_prompts(self) -> list[str] | None:
        """Plain text prompts, each tokenized on its own with the model's special tokens (a
        completions request), or None."""
        return None

    def recount_request(self) -> RecountRequest | None:
        """What vLLM's /tokenize must be asked to count this request's tokens, or None when it
        cannot say (no prompt it knows, output text already let go under the limit)."""
        if self.text_segments:
            return None
        base: dict[str, Any] = {"model": self.request_model} if self.request_model else {}
        messages = self.chat_messages()
        if messages is not None:
            prompt = [{**base, "messages": messages,
                       "add_generation_prompt": self.request.get("add_generation_prompt") is not False}]
        else:
            texts = self.text_prompts()
            if texts is None:
                return None
            prompt = [{**base, "prompt": t} for t in texts]
        choices = [self.choices[i] for i in sorted(self.choices)]
        return RecountRequest(
            prompt,
            [{**base, "prompt": "".join(c.text), "add_special_tokens": False} for c in choices if c.text],
            [{**base, "prompt": "".join(c.reasoning), "add_special_tokens": False} for c in choices if c.reasoning],
        )

    def count_prompt(self, counter: TokenCounter) -> tuple[int, bool]:
        """Prompt tokens without the upstream's usage, and whether they are counted as the
        model counts them (its chat template, its tokenizer's special tokens)."""
        messages = self.chat_messages()
        if messages is not None and counter.chat is not None:
            try:
                return counter.chat(messages, self.request.get("add_generation_prompt") is not False), True
            except ChatTemplateError as exc:
                log.warning("%s request: chat template failed (%s); prompt estimated", self.endpoint, exc)
        texts = self.text_prompts() if messages is None else None
        if texts is not None and counter.prompt is not None:
            return sum(counter.prompt(t) for t in texts), True
        return counter.count(self.prompt_text()), False

    # -- result ----------------------------------------------------------------------------

    def fill_event(self, ev: UsageEvent) -> None:
        ev.endpoint = self.endpoint
        ev.operation = self.operation
        ev.metered = True
        ev.request_model = self.request_model
        ev.response_model = self.response_model
        ev.stream = self.stream
        ev.choices = self.n
        ev.usage_injected = self.usage_injected
        ev.response_events = self.response_events
        ev.finish_reason = ",".join(
            self.choices[i].finish_reason for i in sorted(self.choices) if self.choices[i].finish_reason
        )
        self._fill_tokens(ev)
        if self.error:
            ev.error = self.error
            ev.error_detail = self.error_detail

    def _fill_tokens(self, ev: UsageEvent) -> None:
        reasoning_text = "".join("".join(c.reasoning) for c in self.choices.values())
        reasoning_counted = sum(c.reasoning_counted for c in self.choices.values())
        counter = None
        if self.usage is not None:
            u = self.usage
            ev.token_source = TokenSource.UPSTREAM_USAGE
            ev.prompt_tokens, ev.completion_tokens = u.prompt, u.completion
            ev.total_tokens = u.total or u.prompt + u.completion
            ev.cached_tokens = u.cached
            ev.reasoning_tokens = u.reasoning
            if not u.reasoning and (reasoning_text or reasoning_counted):
                # vLLM reports no reasoning count; ours is a subset of completion_tokens.
                counter = self.ctx.tokenizers.for_model(self.request_model)
                ev.reasoning_tokens = min(counter.count(reasoning_text) + reasoning_counted, u.completion)
                ev.tokenizer = counter.name
            return
        has_output = any(c.text or c.reasoning or c.text_counted or c.reasoning_counted
                         for c in self.choices.values())
        if not has_output and (self.error or not self.request):
            ev.token_source = TokenSource.NONE
            return
        counter = self.ctx.tokenizers.for_model(self.request_model)
        # Count the joined text per choice: per-chunk sums drift (measured: ~5% of responses).
        ev.completion_tokens = sum(
            counter.count("".join(c.text)) + counter.count("".join(c.reasoning)) + c.text_counted + c.reasoning_counted
            for c in self.choices.values()
        )
        ev.reasoning_tokens = (counter.count(reasoning_text) if reasoning_text else 0) + reasoning_counted
        if self.text_segments and not self.error:
            self._flag("output_text_limit", f"output text over metering.max_output_text_chars "
                       f"({self.ctx.max_output_text_chars}) was counted in {self.text_segments + 1} pieces: "
                       f"completion_tokens may be off by up to {self.text_segments} per choice")
        ev.prompt_tokens, exact = self.count_prompt(counter)
        ev.total_tokens = ev.prompt_tokens + ev.completion_tokens
        ev.token_source = TokenSource.TOKENIZER if exact and counter.own else TokenSource.TOKENIZER_ESTIMATE
        ev.tokenizer = counter.name


def _parse_usage(usage: dict[str, Any]) -> Usage:
    u = Usage(
        prompt=_as_int(usage.get("prompt_tokens")),
        completion=_as_int(usage.get("completion_tokens")),
        total=_as_int(usage.get("total_tokens")),
    )
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        u.cached = _as_int(details.get("cached_tokens"))
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        u.reasoning = _as_int(details.get("reasoning_tokens"))
    return u


def _error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error", obj)
    if isinstance(err, dict):
        msg = err.get("message")
        return str(msg) if msg is not None else orjson.dumps(err).decode()[:500]
    return str(err)[:500]

