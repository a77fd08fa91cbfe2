"""/v1/audio/transcriptions and /v1/audio/translations over the simulated model, shaped like
vLLM's: a multipart form (file, model, response_format, stream, stream_include_usage, ...).

The audio's length is read from a WAV header (else 16 kHz 16-bit mono is assumed); the text is
generated from a hash of the audio. `json` answers {"text", "usage": {"type": "duration",
"seconds"}} (seconds rounded up); `text` answers the text alone; `verbose_json` has duration,
language, text and segments but no usage. A stream is chat-like `transcription.chunk` (or
`translation.chunk`) events, then, with stream_include_usage, a chunk with empty choices and
{prompt_tokens, completion_tokens, total_tokens}, then [DONE]. The decoder prompt counted as
prompt_tokens is BOS + the form's `prompt`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from extproc.devtools.sim import generation as gen
from extproc.devtools.sim.protocol import SimError, bad_request, usage, validation_error

if TYPE_CHECKING:
    from extproc.devtools.sim.server import Simulator

_TRUE = ("true", "True", "1")
MAX_TOKENS = 24


def wav_seconds(data: bytes) -> float:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) >= 44:
        byte_rate = struct.unpack_from("<I", data, 28)[0]
        if byte_rate:
            return (len(data) - 44) / byte_rate
    return len(data) / 32_000


async def _form(request: web.Request) -> tuple[dict[str, str], bytes]:
    if not request.content_type.startswith("multipart/form-data"):
        raise SimError(400, "1 validation error:\n  Unsupported Media Type: Only 'multipart/form-data' is allowed",
                       "Bad Request")
    fields: dict[str, str] = {}
    audio = b""
    async for part in await request.multipart():
        if part.name == "file":
            audio = bytes(await part.read())
        elif part.name:
            fields.setdefault(part.name, (await part.read()).decode("utf-8", "replace"))
    if not audio:
        raise validation_error("missing", ("body", "file"), "Field required")
    return fields, audio


async def speech_to_text(sim: Simulator, request: web.Request, task: str) -> web.StreamResponse:
    cfg = sim.cfg
    fields, audio = await _form(request)
    if fields.get("model") and fields["model"] not in cfg.served_names:
        raise SimError(404, f"The model `{fields['model']}` does not exist.", "NotFoundError", "model")
    fmt = fields.get("response_format", "json")
    if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
        raise validation_error("literal_error", ("body", "response_format"),
                               "Input should be 'json', 'text', 'srt', 'verbose_json' or 'vtt'")
    stream = fields.get("stream", "") in _TRUE
    include_usage = fields.get("stream_include_usage", "") in _TRUE
    if include_usage and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", param="stream_include_usage")
    seconds = wav_seconds(audio)
    prompt = gen.text_prompt_ids(fields.get("prompt", ""))
    seed = int.from_bytes(hashlib.sha256(audio).digest()[:4], "big")
    prompts = [prompt]
    seqs = sim._seqs(prompts, 1, [MAX_TOKENS], seed)
    seq = seqs[0]
    cached = sim._lookup(prompts)
    steps = sim._steps(prompts, cached, seqs)
    rid, created = f"{task}-{uuid.uuid4().hex}", int(time.time())
    if stream:
        async def frames() -> AsyncIterator[bytes]:
            async for batch in steps:
                for _, t in batch:
                    last = t == seq.length - 1
                    chunk: dict[str, Any] = {
                        "id": rid, "object": f"{task}.chunk", "created": created, "model": cfg.model,
                        "choices": [{"delta": {"content": seq.deltas[t]}, "finish_reason": seq.out.finish_reason
                                     if last else None, "stop_reason": None}]}
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            if include_usage:
                final = {"id": rid, "object": f"{task}.chunk", "created": created, "model": cfg.model, "choices": [],
                         "usage": usage(len(prompt), seq.length, details_null=True)}
                yield b"data: " + orjson.dumps(final) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await sim.stream_frames(request, frames(), steps)
    if not await sim._run_to_end(request, steps):
        return web.Response()
    text = "".join(seq.deltas)
    if fmt in ("text", "srt", "vtt"):
        return web.Response(text=text, content_type="text/plain")
    if fmt == "verbose_json":
        return web.Response(body=orjson.dumps({"duration": f"{seconds:.2f}", "language": fields.get("language", "en"),
                                               "text": text, "segments": [], "words": None}),
                            content_type="application/json")
    return web.Response(body=orjson.dumps({"text": text, "usage": {"type": "duration", "seconds": math.ceil(seconds)}}),
                        content_type="application/json")
