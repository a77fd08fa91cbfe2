"""Request validation and response bodies shaped like vLLM's OpenAI-compatible server.

Error bodies are vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}. Two
families, as in vLLM: request-schema failures (bad JSON, missing or mistyped fields) come from
FastAPI's validation handler with type "Bad Request"; checks made while serving (context length,
n, max_tokens) use type "BadRequestError"; an unknown model is 404 "NotFoundError".
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from extproc.devtools.sim.config import SimConfig


class SimError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> SimError:
    return SimError(400, message, "BadRequestError", param)


def validation_error(kind: str, loc: tuple[Any, ...], msg: str, param: str | None = None) -> SimError:
    # Same layout as vLLM's validation handler ("1 validation error:\n  {pydantic error dict}").
    detail = {"type": kind, "loc": loc, "msg": msg}
    dotted = ".".join(str(p) for p in loc)
    return SimError(400, f"1 validation error:\n  {detail}", HTTPStatus.BAD_REQUEST.phrase, param or dotted)


def status_error(status: int, message: str) -> SimError:
    """Error body for an arbitrary status (the x-sim-fail hook)."""
    try:
        name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        name = "Unknown"
    return SimError(status, message, name if name.endswith("Error") else name + "Error")


_TYPE_NAMES: dict[type, tuple[str, str]] = {
    int: ("int_type", "Input should be a valid integer"),
    bool: ("bool_type", "Input should be a valid boolean"),
    str: ("string_type", "Input should be a valid string"),
    list: ("list_type", "Input should be a valid list"),
    dict: ("dict_type", "Input should be a valid dictionary"),
}


def field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked against `kind` (None allowed: every optional field is nullable)."""
    value = body.get(name, default)
    if value is None:
        return None
    # bool is an int subclass in Python but not in JSON schemas
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        code, msg = _TYPE_NAMES[kind]
        raise validation_error(code, ("body", name), msg)
    return value


def require(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise validation_error("missing", ("body", name), "Field required")
    return body[name]


@dataclass
class Common:
    """Request fields shared by chat and completions, validated."""

    stream: bool
    include_usage: bool
    continuous_usage: bool
    n: int
    max_tokens: int | None  # as requested (None = server default)
    seed: int | None


def parse_common(body: dict[str, Any], cfg: SimConfig, max_tokens: int | None) -> Common:
    stream = bool(field(body, "stream", bool, False))
    options = field(body, "stream_options", dict)
    if options and not stream:
        raise validation_error("value_error", ("body",),
                               "Value error, Stream options can only be defined when `stream=True`.",
                               param="stream_options")
    n = field(body, "n", int, 1)
    n = 1 if n is None else n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.")
    include, continuous = should_include_usage(options, cfg.enable_force_include_usage)
    return Common(stream, include, continuous, n, max_tokens, field(body, "seed", int))


def should_include_usage(options: dict[str, Any] | None, force: bool) -> tuple[bool, bool]:
    """(final usage chunk, usage on every chunk), as vLLM decides them. Since vLLM PR #37923
    (2026-03) --enable-force-include-usage turns on both. An options object, even an empty one,
    defaults include_usage to true (StreamOptions.include_usage = True)."""
    if force:
        return True, True
    if options is None:
        return False, False
    include = bool(options.get("include_usage", True))
    return include, include and bool(options.get("continuous_usage_stats", False))


def check_model(body: dict[str, Any], cfg: SimConfig) -> None:
    model = field(body, "model", str)
    if model and model not in cfg.served_names:  # no model = the default model, as in vLLM
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def resolve_max_tokens(cfg: SimConfig, prompt_len: int, requested: int | None) -> int:
    """vLLM's context checks, then the effective max_tokens."""
    limit = cfg.max_model_len
    if prompt_len >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            param="input_tokens")
    if requested is not None and prompt_len + requested > limit:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
            f"maximum context length is {limit} tokens and your request has {prompt_len} input "
            f"tokens ({requested} > {limit} - {prompt_len}).", param="max_tokens")
    return min(cfg.max_tokens_default if requested is None else requested, limit - prompt_len)


def usage(prompt: int, completion: int, *, cached: int | None = None, reasoning: int | None = None,
          details_null: bool = False) -> dict[str, Any]:
    """vLLM's UsageInfo, fields in its order. `details_null` keeps a null prompt_tokens_details
    (non-streaming bodies dump every field; streamed usage drops the nulls)."""
    out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                           "completion_tokens": completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    elif details_null:
        out["prompt_tokens_details"] = None
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, chunk_usage: dict[str, Any] | None = None) -> dict[str, Any]:
    # vLLM dumps chunks with exclude_unset: stop_reason only on the finishing chunk, usage only
    # when set.
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = None
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [choice]}
    if chunk_usage is not None:
        chunk["usage"] = chunk_usage
    return chunk


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, chunk_usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [choice]}
    if chunk_usage is not None:
        chunk["usage"] = chunk_usage
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, final_usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": final_usage}


def chat_message(content: str | None, reasoning: str | None) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
            "function_call": None, "reasoning": reasoning}
