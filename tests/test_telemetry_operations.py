"""gen_ai.operation.name for every route's endpoint: the OTel names where the conventions have
one (the Responses and Messages APIs are chat), the documented custom ones otherwise; input-only
operations get no output token usage series; each processor stores the same name."""

from __future__ import annotations

import pytest

from extproc.processors.routing import ROUTES
from extproc.telemetry import names as n
from tests.telemetry_testing import read
from tests.test_telemetry_usage import ATTRIBUTED, event, make


def test_every_processor_stores_the_operation_telemetry_uses():
    for cls in set(ROUTES.values()):
        if cls.endpoint == "invocations":
            continue  # meters through the processor the body selects
        assert cls.operation and n.OPERATIONS[cls.endpoint] == cls.operation, cls


@pytest.mark.parametrize(("endpoint", "operation", "output"), [
    ("responses", "chat", True), ("messages", "chat", True), ("rerank", "rerank", False),
    ("score", "score", False), ("classify", "classify", False), ("pooling", "pooling", False),
    ("cohere_embed", "embeddings", False), ("transcription", "transcription", True),
    ("translation", "translation", True),
])
def test_operation_names(endpoint, operation, output):
    metrics, reader = make()
    metrics.emit(event(endpoint=endpoint, operation=operation, completion_tokens=21 if output else 0))
    snap = read(reader)
    attrs = {**ATTRIBUTED, n.OPERATION: operation}
    assert snap.point(n.TOKEN_USAGE, {**attrs, n.TOKEN_TYPE: "input"}) is not None
    assert len(snap.attribute_sets(n.TOKEN_USAGE)) == (2 if output else 1)
