"""Routing as vLLM's router does it: exact, case-sensitive, percent-decoded paths; configured
prefixes; metering.unknown_post (pass or refuse) through the exchange and the stream session."""

from __future__ import annotations

import orjson
import pytest

from extproc import wire
from extproc.config import AttributionSettings, ConfigError, load_settings
from extproc.labels import Attribution
from extproc.processors import ProcessorContext, processor_for, refusal
from extproc.processors.routing import ROUTES, route_path
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

TOKENIZERS = TokenizerRegistry()
CTX = ProcessorContext(TOKENIZERS)
REFUSE = ProcessorContext(TOKENIZERS, unknown_post="refuse")


@pytest.mark.parametrize(("raw", "routed"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions?stream=1", "/v1/chat/completions"),
    ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
    ("/v1/%63hat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions/", "/v1/chat/completions/"),
    ("/v1//chat/completions", "/v1//chat/completions"),  # Envoy merges slashes; vLLM would not
    ("/bad%ffutf8", "/bad\ufffdutf8"),
])
def test_route_path_decodes_like_an_asgi_server(raw, routed):
    assert route_path(raw) == routed


@pytest.mark.parametrize("path", ["/tenant-a/v1/chat/completions", "/x/v1/chat/completions",
                                  "/V1/Chat/Completions", "/v1/chat/completions/", "/v1/chat/completionsx",
                                  "/v1/chat/completions/extra"])
def test_no_prefix_suffix_or_case_matching(path):
    assert processor_for("POST", path, CTX) is None


def test_configured_prefix_is_stripped_whole_segments_only():
    ctx = ProcessorContext(TOKENIZERS, path_prefixes=("/tenant-a",))
    assert processor_for("POST", "/tenant-a/v1/chat/completions", ctx).endpoint == "chat"
    assert processor_for("POST", "/v1/chat/completions", ctx).endpoint == "chat"
    assert processor_for("POST", "/tenant-ab/v1/chat/completions", ctx) is None


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_every_route_has_a_processor_on_post_only(path):
    assert processor_for("POST", path, CTX) is not None
    assert processor_for("GET", path, CTX) is None
    assert refusal("POST", path, REFUSE) is None


def test_refusal_spares_known_non_inference_routes_and_other_methods():
    assert refusal("POST", "/v1/unknown", CTX) is None  # pass is the default
    assert "not a route this gateway can meter" in refusal("POST", "/v1/unknown", REFUSE)
    assert refusal("POST", "/tokenize", REFUSE) is None
    assert refusal("POST", "/v1/messages/count_tokens", REFUSE) is None
    assert refusal("GET", "/v1/models", REFUSE) is None
    assert refusal("DELETE", "/v1/unknown", REFUSE) is None


def test_config_keys():
    s = load_settings(None, {"metering": {"unknown_post": "refuse", "path_prefixes": ["/a", "/b"]}}, environ={})
    assert s.metering.unknown_post == "refuse" and s.metering.path_prefixes == ["/a", "/b"]
    env = load_settings(None, None, environ={"EXTPROC_METERING__UNKNOWN_POST": "refuse",
                                             "EXTPROC_METERING__PATH_PREFIXES": "/t1,/t2"})
    assert env.metering.unknown_post == "refuse" and env.metering.path_prefixes == ["/t1", "/t2"]
    assert load_settings(None, None, environ={}).metering.unknown_post == "pass"
    with pytest.raises(ConfigError, match="unknown_post"):
        load_settings(None, {"metering": {"unknown_post": "drop"}}, environ={})
    with pytest.raises(ConfigError, match="path_prefixes"):
        load_settings(None, {"metering": {"path_prefixes": ["tenant/"]}}, environ={})


def _service(ctx: ProcessorContext) -> tuple[ExtProcService, RecordingSink]:
    stats = SidecarStats()
    rec = RecordingSink()
    return ExtProcService(Attribution(AttributionSettings(), stats), ctx, [rec], stats), rec


@pytest.mark.parametrize("role", ["", "request"])
def test_refused_post_gets_an_openai_error_and_one_event(role):
    service, rec = _service(REFUSE)
    session = service.open_stream([("x-extproc-role", role)] if role else [])
    resp = session.on_message(m.request_headers("/v1/not-a-route"))
    assert resp.WhichOneof("response") == "immediate_response"
    imm = resp.immediate_response
    assert imm.status.code == 404
    err = orjson.loads(imm.body)["error"]
    assert err["code"] == "unmetered_path" and "/v1/not-a-route" in err["message"]
    assert session.finished
    session.close()
    assert len(rec.events) == 1
    ev = rec.events[0]
    assert not ev.metered and ev.error == "refused_path" and ev.http_status == 404 and not ev.client_aborted
    assert service.stats.refused_requests == 1 and not service.pending


def test_observe_mode_cannot_refuse_and_counts_unmetered():
    service, rec = _service(REFUSE)
    session = service.open_stream()
    req = m.request_headers("/v1/not-a-route")
    req.observability_mode = True
    assert session.on_message(req) is None
    session.close()
    assert rec.events[0].error == "" and not rec.events[0].metered
    assert service.stats.refused_requests == 0 and service.stats.unmetered_requests == 1


def test_pass_forwards_unknown_post_unmetered():
    service, rec = _service(CTX)
    session = service.open_stream()
    resp = session.on_message(m.request_headers("/v1/not-a-route"))
    assert resp.WhichOneof("response") == "request_headers"
    assert resp.mode_override.response_body_mode == wire.ProcessingMode.NONE
    assert service.stats.unmetered_requests == 1
