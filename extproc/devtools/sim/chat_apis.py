"""The Responses API (/v1/responses) and the Anthropic Messages API (/v1/messages) over the
simulated engine, shaped like vLLM's: both turn the request into chat messages, apply the chat
template and generate as chat does.

Responses: usage {input_tokens, input_tokens_details.cached_tokens, output_tokens,
output_tokens_details.reasoning_tokens, total_tokens}; a stream is `event:` + `data:` frames
ending with response.completed (which carries the usage), no [DONE].
Messages: usage {input_tokens, output_tokens}; a stream is message_start (input tokens),
content blocks, message_delta (cumulative output tokens), message_stop. Errors in Anthropic's
shape {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from extproc.devtools.sim import generation as gen
from extproc.devtools.sim.protocol import (
    SimError,
    bad_request,
    check_model,
    field,
    require,
    resolve_max_tokens,
    validation_error,
)

if TYPE_CHECKING:
    from extproc.devtools.sim.server import Simulator


def _frame(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _text(content: Any, where: tuple[Any, ...], kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise bad_request("only text content is supported by the simulator")
        return "\n".join(parts)
    raise validation_error("union_type", where, "Input should be a valid string or a list of content parts")


def _first_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        return text if isinstance(text, str) else None
    return None


def _response_item(item: dict[str, Any], i: int, prev: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's construct_chat_messages_with_tool_call for one item: function calls, reasoning
    and assistant text fold into the assistant message before them while it lacks that part."""
    assistant = prev if prev is not None and prev.get("role") == "assistant" else None
    kind = item.get("type", "message")
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise validation_error("missing", ("body", "input", i, name), "Field required")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        if assistant is not None:
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise bad_request("Encrypted content is not supported.")
        content, summary = item.get("content"), item.get("summary")
        reasoning = _first_text(content if content else summary) or ""
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": _text(output, ("body", "input", i, "output"), ("input_text", "output_text", "text"))}
    if kind != "message" or "role" not in item:
        raise bad_request("only message, function_call, function_call_output and reasoning input items "
                          "are supported by the simulator")
    if item["role"] == "assistant":
        text = _first_text(item.get("content"))
        if text is not None:
            if assistant is not None and assistant.get("content") is None:
                assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    return {"role": item["role"],
            "content": _text(item.get("content"), ("body", "input", i), ("input_text", "output_text"))}


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = field(body, "instructions", str)
    if instructions:
        out.append({"role": "system", "content": instructions})
    items = require(body, "input")
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list):
        raise validation_error("union_type", ("body", "input"), "Input should be a valid string or list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request("only message input items are supported by the simulator")
        message = _response_item(item, i, out[-1] if out else None)
        if message is not None:
            out.append(message)
    return out


def _anthropic_text(block: dict[str, Any]) -> str | None:
    """A text block's text as vLLM keeps it: empty text and Claude Code's per-request
    attribution header are dropped."""
    text = block.get("text")
    if not isinstance(text, str) or not text or text.startswith("x-anthropic-billing-header"):
        return None
    return text


def _anthropic_blocks(role: str, content: list[Any], where: tuple[Any, ...],
                      out: list[dict[str, Any]]) -> dict[str, Any]:
    """vLLM's _convert_message_content: text blocks as content (one as a string, several as
    parts), thinking as reasoning, tool_use as tool calls, a user's tool_result as a tool
    message appended before the turn itself."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if isinstance(block.get("text"), str) and block["text"]:
                texts.append(block["text"])
        elif kind == "thinking" and block.get("thinking") is not None:
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({"id": block.get("id") or "call_0", "type": "function",
                          "function": {"name": block.get("name") or "",
                                       "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result":
            result = block.get("content")
            if role == "user":
                text = result if isinstance(result, str) else "\n".join(
                    b.get("text", "") for b in result if isinstance(b, dict) and b.get("type") == "text"
                ) if isinstance(result, list) else ""
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "", "content": text or ""})
            else:
                texts.append(f"Tool result: {result if result else ''}")
        elif kind not in ("thinking", "redacted_thinking"):
            raise validation_error("literal_error", (*where, j, "type"),
                                   "Input should be 'text', 'tool_use', 'tool_result' or 'thinking'")
    converted: dict[str, Any] = {"role": role}
    if reasoning:
        converted["reasoning"] = "".join(reasoning)
    if calls:
        converted["tool_calls"] = calls
    if texts:
        converted["content"] = texts[0] if len(texts) == 1 else [{"type": "text", "text": t} for t in texts]
    return converted


def anthropic_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = require(body, "messages")
    if not isinstance(messages, list):
        raise validation_error("list_type", ("body", "messages"), "Input should be a valid list")
    system = body.get("system")
    if isinstance(system, list):  # vLLM joins the system blocks with nothing between
        _text(system, ("body", "system"), ("text",))  # refuses what is not text
        system_text = "".join(t for b in system if (t := _anthropic_text(b)) is not None)
    else:
        system_text = _text(system, ("body", "system"), ("text",)) if system else ""
    out = [{"role": "system", "content": system_text}] if system_text else []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise validation_error("literal_error", ("body", "messages", i, "role"), "Input should be 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise validation_error("union_type", ("body", "messages", i, "content"),
                                   "Input should be a valid string or a list of content blocks")
        converted = _anthropic_blocks(m["role"], content, ("body", "messages", i, "content"), out)
        if m["role"] != "user" or "content" in converted:
            out.append(converted)
    return out


async def responses(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    cfg = sim.cfg
    messages = responses_messages(body)
    requested = field(body, "max_output_tokens", int)
    stream = field(body, "stream", bool) is True
    check_model(body, cfg)
    prompt = gen.chat_prompt_ids(messages)
    max_tokens = resolve_max_tokens(cfg, len(prompt), requested)
    prompts = [prompt]
    seqs = sim._seqs(prompts, 1, [max_tokens], field(body, "seed", int))
    cached = sim._lookup(prompts)
    rid, created = "resp_" + (request.headers.get("x-request-id") or uuid.uuid4().hex), int(time.time())
    steps = sim._steps(prompts, cached, seqs)
    seq = seqs[0]
    r = seq.out.reasoning_len if cfg.reasoning else 0

    def response_obj(status: str, with_output: bool) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if with_output:
            if r:
                output.append({"id": f"rs_{rid}", "type": "reasoning", "summary": [],
                               "content": [{"type": "reasoning_text", "text": "".join(seq.deltas[:r])}]})
            output.append({"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed",
                           "content": [{"type": "output_text", "text": "".join(seq.deltas[r:]),
                                        "annotations": [], "logprobs": None}]})
        length = seq.out.finish_reason == "length"
        final = status != "in_progress"
        return {"id": rid, "object": "response", "created_at": created, "model": cfg.model,
                "status": ("incomplete" if length else "completed") if final else status,
                "incomplete_details": {"reason": "max_output_tokens"} if final and length else None,
                "instructions": body.get("instructions"), "max_output_tokens": requested, "output": output,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": len(prompt),
                          "input_tokens_details": {"cached_tokens": cached[0] if cfg.enable_prompt_tokens_details else 0},
                          "output_tokens": seq.length,
                          "output_tokens_details": {"reasoning_tokens": r},
                          "total_tokens": len(prompt) + seq.length} if final else None}

    if not stream:
        if not await sim._run_to_end(request, steps):
            return web.Response()
        return _json(response_obj("completed", True))

    async def frames() -> AsyncIterator[bytes]:
        n = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal n
            n += 1
            return _frame(kind, {"type": kind, "sequence_number": n - 1, **fields})

        yield event("response.created", response=response_obj("in_progress", False))
        yield event("response.in_progress", response=response_obj("in_progress", False))
        started_text = False
        item = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        async for batch in steps:
            for _, t in batch:
                text = seq.deltas[t]
                if t < r:
                    if text:
                        yield event("response.reasoning_text.delta", item_id=f"rs_{rid}", output_index=0,
                                    content_index=0, delta=text)
                    continue
                if not started_text:
                    started_text = True
                    yield event("response.output_item.added", output_index=1 if r else 0, item=item)
                    yield event("response.content_part.added", item_id=item["id"], output_index=1 if r else 0,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                if text:
                    yield event("response.output_text.delta", item_id=item["id"], output_index=1 if r else 0,
                                content_index=0, delta=text, logprobs=[])
        done = response_obj("completed", True)
        if started_text:
            yield event("response.output_text.done", item_id=item["id"], output_index=1 if r else 0,
                        content_index=0, text="".join(seq.deltas[r:]), logprobs=[])
            yield event("response.output_item.done", output_index=1 if r else 0, item=done["output"][-1])
        yield event("response.completed", response=done)

    return await sim.stream_frames(request, frames(), steps)


def anthropic_error(exc: SimError) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(exc.status, "api_error")
    return _json({"type": "error", "error": {"type": kind, "message": exc.message}}, exc.status)


async def messages(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    try:
        return await _messages(sim, request, body)
    except SimError as exc:
        return anthropic_error(exc)


async def _messages(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    cfg = sim.cfg
    chat = anthropic_messages(body)
    requested = require(body, "max_tokens")
    if not isinstance(requested, int) or isinstance(requested, bool):
        raise validation_error("int_type", ("body", "max_tokens"), "Input should be a valid integer")
    stream = field(body, "stream", bool) is True
    check_model(body, cfg)
    prompt = gen.chat_prompt_ids(chat)
    max_tokens = resolve_max_tokens(cfg, len(prompt), requested)
    prompts = [prompt]
    seqs = sim._seqs(prompts, 1, [max_tokens], None)
    cached = sim._lookup(prompts)
    mid = "msg_" + (request.headers.get("x-request-id") or uuid.uuid4().hex)
    steps = sim._steps(prompts, cached, seqs)
    seq = seqs[0]
    r = seq.out.reasoning_len if cfg.reasoning else 0
    stop = "max_tokens" if seq.out.finish_reason == "length" else "end_turn"

    if not stream:
        if not await sim._run_to_end(request, steps):
            return web.Response()
        content: list[dict[str, Any]] = []
        if r:
            content.append({"type": "thinking", "thinking": "".join(seq.deltas[:r]), "signature": uuid.uuid4().hex})
        if "".join(seq.deltas[r:]):
            content.append({"type": "text", "text": "".join(seq.deltas[r:])})
        return _json({"id": mid, "type": "message", "role": "assistant", "content": content, "model": cfg.model,
                      "stop_reason": stop, "stop_sequence": None,
                      "usage": {"input_tokens": len(prompt), "output_tokens": seq.length}})

    async def frames() -> AsyncIterator[bytes]:
        yield _frame("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "content": [], "model": cfg.model,
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": len(prompt), "output_tokens": 0}}})
        block, index = None, -1
        async for batch in steps:
            for _, t in batch:
                text = seq.deltas[t]
                if not text:
                    continue
                kind = "thinking" if t < r else "text"
                if kind != block:
                    if block is not None:
                        yield _frame("content_block_stop", {"type": "content_block_stop", "index": index})
                    block, index = kind, index + 1
                    yield _frame("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": {"type": kind, kind: ""}})
                delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else \
                    {"type": "text_delta", "text": text}
                yield _frame("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        if block is not None:
            yield _frame("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _frame("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                       "usage": {"input_tokens": len(prompt), "output_tokens": seq.length}})
        yield _frame("message_stop", {"type": "message_stop"})

    return await sim.stream_frames(request, frames(), steps)
