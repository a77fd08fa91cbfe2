"""Drive the sidecar's stream loop with a policy, as Envoy's messages would (response headers
skipped, the status as the response.code attribute on the first body message)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from extproc import wire
from extproc.config import AttributionSettings
from extproc.governance.governor import Governor
from extproc.governance.policy import hash_key, parse_policy
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

KEY_SEARCH, KEY_ADS = "sk-search-1", "sk-ads-1"
MODEL = "m"


def policy_text(budgets: str = "", rate_limits: str = "", require_key: bool = False) -> str:
    return (f'keys:\n  - sha256: "{hash_key(KEY_SEARCH)}"\n    team: search\n    feature: ranking\n'
            f'  - sha256: "{hash_key(KEY_ADS)}"\n    team: ads\n    name: ads-bot\n'
            f"budgets:\n{budgets or '  []'}\nrate_limits:\n{rate_limits or '  []'}\n"
            f"require_key: {'true' if require_key else 'false'}\n")


class FakePrices:
    """A tiny price table: $1 per 1k prompt tokens, $2 per 1k completion tokens; unpriced models."""

    def list_cost_micros(self, model: str, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                         reasoning_tokens: int, at_unix_nano: int) -> int | None:
        if model != MODEL:
            return None
        return prompt_tokens * 1000 + completion_tokens * 2000


def service_with(governor: Governor) -> tuple[ExtProcService, RecordingSink]:
    stats, rec = SidecarStats(), RecordingSink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             [rec], stats, governor=governor)
    return service, rec


def governor(text: str, ledger: Any = None, **kw: Any) -> Governor:
    return Governor(parse_policy(text), ledger, **kw)


def chat_body(max_tokens: int | None = 10, content: str = "hello there", stream: bool = False) -> bytes:
    req: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    if max_tokens is not None:
        req["max_tokens"] = max_tokens
    return orjson.dumps(req)


def json_answer(prompt: int, completion: int) -> bytes:
    return orjson.dumps({"model": MODEL, "choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}})


async def answer(resp: Any) -> wire.ProcessingResponse | None:
    return await resp if isinstance(resp, asyncio.Future) else resp


def headers(key: str | None = None, *, header: str = "authorization", **extra: str):  # noqa: ANN201
    if key is not None:
        extra[header] = f"Bearer {key}" if header == "authorization" else key
    return m.request_headers(**extra)


async def request(service: ExtProcService, key: str | None, body: bytes, *, usage: tuple[int, int] | None = (5, 7),
                  end: bool = True, **hdrs: str) -> list[wire.ProcessingResponse]:
    """One request through a session; returns the answers. `usage`: what the upstream reports;
    end=False leaves the session open (the caller closes it)."""
    session = service.open_stream()
    out = [await answer(session.on_message(headers(key, **hdrs)))]
    if out[0].WhichOneof("response") == "immediate_response":
        session.close()
        return out
    out.append(await answer(session.on_message(m.body(body, eos=True))))
    if out[-1].WhichOneof("response") == "immediate_response" or usage is None:
        if end:
            session.close()
        return out
    out.append(await answer(session.on_message(m.body(json_answer(*usage), response=True, eos=True, code=200))))
    session.close()
    return out


def immediate(resp: wire.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    ir = resp.immediate_response
    hdrs = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return ir.status.code, hdrs, orjson.loads(ir.body)
