"""/score, /v1/score: usage is vLLM's UsageInfo. The request pairs text_1 with text_2 (one with
many, or item by item; newer vLLM also names them queries / documents or data_1 / data_2); the
fallback counts both sides of every pair."""

from __future__ import annotations

from typing import Any

from extproc.processors.input_only import InputOnlyProcessor, texts_of

_SIDES = (("text_1", "text_2"), ("queries", "documents"), ("data_1", "data_2"))


def score_pairs(request: dict[str, Any]) -> tuple[list[Any], list[Any]] | None:
    for left, right in _SIDES:
        if left in request and right in request:
            return texts_of(request[left]), texts_of(request[right])
    return None


class ScoreProcessor(InputOnlyProcessor):
    endpoint = "score"
    operation = "score"

    def input_texts(self) -> list[str | list[int]]:
        pairs = score_pairs(self.request)
        if pairs is None:
            return []
        left, right = pairs
        if len(left) == 1:  # one against many
            left = left * len(right)
        return [*left[:len(right)], *right]
