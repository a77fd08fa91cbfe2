"""Which processor meters a request: vLLM's own routes, matched exactly as its router does.

vLLM's server (FastAPI on uvicorn) percent-decodes the path, then matches it exactly and case
sensitively; there is no prefix or suffix matching, and a trailing slash is answered with a
redirect to the path without it (which then comes back as its own, metered request). The
sidecar routes on the same decoded path, so a request reaches a model handler only under a path
the sidecar meters. Envoy normalizes the path before both see it (envoy_config.py).
"""

from __future__ import annotations

from urllib.parse import unquote

from extproc.processors.audio import TranscriptionProcessor, TranslationProcessor
from extproc.processors.base import EndpointProcessor, ProcessorContext
from extproc.processors.chat import ChatProcessor
from extproc.processors.cohere_embed import CohereEmbedProcessor
from extproc.processors.completions import CompletionsProcessor
from extproc.processors.embeddings import EmbeddingsProcessor
from extproc.processors.invocations import InvocationsProcessor
from extproc.processors.messages import MessagesProcessor
from extproc.processors.pooling import ClassifyProcessor, PoolingProcessor
from extproc.processors.rerank import RerankProcessor
from extproc.processors.responses import ResponsesProcessor
from extproc.processors.score import ScoreProcessor

# Inference routes of vLLM's OpenAI-compatible server, POST only.
ROUTES: dict[str, type[EndpointProcessor]] = {
    "/v1/chat/completions": ChatProcessor,
    "/v1/completions": CompletionsProcessor,
    "/v1/embeddings": EmbeddingsProcessor,
    "/v1/responses": ResponsesProcessor,
    "/v1/messages": MessagesProcessor,
    "/rerank": RerankProcessor,
    "/v1/rerank": RerankProcessor,
    "/v2/rerank": RerankProcessor,
    "/score": ScoreProcessor,
    "/v1/score": ScoreProcessor,
    "/pooling": PoolingProcessor,
    "/classify": ClassifyProcessor,
    "/v2/embed": CohereEmbedProcessor,
    "/invocations": InvocationsProcessor,
    "/v1/audio/transcriptions": TranscriptionProcessor,
    "/v1/audio/translations": TranslationProcessor,
}

# POST routes of vLLM's that run no inference: forwarded and counted as unmetered, even when
# metering.unknown_post is refuse.
NON_INFERENCE_POST = frozenset((
    "/tokenize", "/detokenize", "/v1/messages/count_tokens", "/ping",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
))


def route_path(path: str, prefixes: tuple[str, ...] = ()) -> str:
    """The path vLLM's router matches: no query, percent-decoded as an ASGI server decodes it
    (%2F included), after a configured prefix that Envoy's route strips."""
    path = path.split("?", 1)[0]
    if "%" in path:
        path = unquote(path, errors="replace")
    for prefix in prefixes:
        if path.startswith(prefix) and path[len(prefix):len(prefix) + 1] == "/":
            return path[len(prefix):]
    return path


def processor_for(method: str, path: str, ctx: ProcessorContext) -> EndpointProcessor | None:
    """None means: not an inference request, pass through unmetered (or refuse: see refusal)."""
    if method != "POST":
        return None
    cls = ROUTES.get(route_path(path, ctx.path_prefixes))
    return cls(ctx) if cls is not None else None


def refusal(method: str, path: str, ctx: ProcessorContext) -> str | None:
    """Why a request with no processor is refused (metering.unknown_post: refuse), or None."""
    if method != "POST" or ctx.unknown_post != "refuse":
        return None
    routed = route_path(path, ctx.path_prefixes)
    if routed in NON_INFERENCE_POST or routed in ROUTES:
        return None
    return (f"POST {routed[:200]} is not a route this gateway can meter; the request was not "
            "forwarded. Metered routes: " + ", ".join(sorted(ROUTES)))
