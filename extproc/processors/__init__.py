"""One processor per OpenAI-compatible endpoint; `processor_for` routes by path."""

from __future__ import annotations

from extproc.processors.base import EndpointProcessor, ProcessorContext, RequestError
from extproc.processors.chat import ChatProcessor
from extproc.processors.completions import CompletionsProcessor
from extproc.processors.embeddings import EmbeddingsProcessor

__all__ = ["EndpointProcessor", "ProcessorContext", "RequestError", "processor_for"]

_ROUTES: tuple[tuple[str, type[EndpointProcessor]], ...] = (
    ("/v1/chat/completions", ChatProcessor),
    ("/v1/completions", CompletionsProcessor),
    ("/v1/embeddings", EmbeddingsProcessor),
)


def processor_for(method: str, path: str, ctx: ProcessorContext) -> EndpointProcessor | None:
    """None means: pass through unmetered. A path prefix (e.g. /tenant-a/v1/...) is allowed."""
    if method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, cls in _ROUTES:
        if path.endswith(suffix):
            return cls(ctx)
    return None
