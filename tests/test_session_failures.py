"""Bugs inside the sidecar's own code, injected: each still leaves exactly one event behind, flagged,
and the other sinks keep their copy. Metering must never break the request or lose the count."""

from __future__ import annotations

import orjson
import pytest

from extproc import wire
from extproc.config import AttributionSettings
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.processors.base import EndpointProcessor
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
RESPONSE = orjson.dumps({"model": "m", "choices": [{"index": 0, "message": {"content": "hi"}}], "usage": USAGE})


class _BrokenSink:
    def emit(self, event) -> None:  # noqa: ANN001
        raise RuntimeError("disk on fire")


def _service(*sinks) -> tuple[ExtProcService, SidecarStats]:  # noqa: ANN002
    stats = SidecarStats()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             list(sinks), stats)
    return service, stats


def _exchange_json(service: ExtProcService) -> list:
    session = service.open_stream()
    answers = [session.on_message(msg) for msg in (
        m.request_headers(x_team="t"), m.body(orjson.dumps({"model": "m", "messages": []}), eos=True),
        m.body(RESPONSE, response=True, code=200), m.body(b"", response=True, eos=True))]
    session.close()
    session.close()  # closing twice (transport and handler both do) emits nothing more
    return answers


def test_a_failing_sink_does_not_cost_the_other_sinks_their_copy():
    rec = RecordingSink()
    service, stats = _service(_BrokenSink(), rec)
    _exchange_json(service)
    [ev] = rec.events
    assert (ev.prompt_tokens, ev.completion_tokens, ev.labels["team"]) == (5, 2, "t")
    assert stats.errors["sink_emit"] == 1 and stats.events_emitted == 1


def test_a_bug_while_filling_the_event_still_leaves_it_behind(monkeypatch):
    def broken(self, ev):  # noqa: ANN001, ANN202
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(EndpointProcessor, "_fill_tokens", broken)
    rec = RecordingSink()
    service, _ = _service(rec)
    answers = _exchange_json(service)
    assert all(a.WhichOneof("response") for a in answers)  # every message answered
    [ev] = rec.events
    assert ev.error == "internal_error" and ev.error_detail.startswith("fill_event: ZeroDivisionError")
    assert ev.labels["team"] == "t" and ev.http_status == 200 and not ev.client_aborted


@pytest.mark.parametrize("where", ["labels", "processor"])
def test_a_bug_on_request_headers_is_answered_continue_and_flagged(monkeypatch, where):
    """Before a processor exists (labels) or inside it: the request goes on, the event says so."""
    if where == "labels":
        monkeypatch.setattr(Attribution, "labels", lambda self, headers: 1 / 0)
    else:
        monkeypatch.setattr(EndpointProcessor, "on_request_body", lambda self, body, rewrite: 1 / 0)
    rec = RecordingSink()
    service, stats = _service(rec)
    answers = _exchange_json(service)
    assert [a.WhichOneof("response") for a in answers[:2]] == [wire.REQUEST_HEADERS, wire.REQUEST_BODY]
    [ev] = rec.events
    assert ev.error == "internal_error" and "ZeroDivisionError" in ev.error_detail
    kind = wire.REQUEST_HEADERS if where == "labels" else wire.REQUEST_BODY
    assert stats.errors[kind] == 1 and ev.error_detail.startswith(kind)
