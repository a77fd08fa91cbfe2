"""One processor per vLLM endpoint family; `processor_for` routes by exact path (routing.py)."""

from __future__ import annotations

from extproc.processors.base import EndpointProcessor, ProcessorContext, RequestError
from extproc.processors.routing import processor_for, refusal

__all__ = ["EndpointProcessor", "ProcessorContext", "RequestError", "processor_for", "refusal"]
