"""`extproc serve` as a process, configured for metrics by the OpenTelemetry SDK's standard
variables only (no EXTPROC_* or metrics.* key): OTLP over HTTP and gRPC, the generic and the
per-signal variables, headers, service name and resource attributes, console, none and
OTEL_SDK_DISABLED. Exports are forced with the admin API's POST /v1/flush (the SDK's
force_flush exports synchronously), so nothing here waits on a timer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.stack import serve_process, start_envoy
from tests.telemetry_testing import OtlpGrpcReceiver, OtlpHttpReceiver, ReceiverLoop

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# the export interval is long: only POST /v1/flush (and the shutdown) export
QUIET = {"OTEL_METRIC_EXPORT_INTERVAL": "600000"}


class Receivers(ReceiverLoop):
    """Both OTLP receivers on a loop of their own (the test body is synchronous)."""

    def __init__(self) -> None:
        super().__init__()
        self.http = self.enter(OtlpHttpReceiver())
        self.grpc = self.enter(OtlpGrpcReceiver())


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    r.close()


def _post_flush(admin_port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/flush", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _metrics_status(admin_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _resource(receiver: OtlpHttpReceiver | OtlpGrpcReceiver) -> dict[str, Any]:
    res = receiver.requests[-1].resource_metrics[0].resource
    return {kv.key: kv.value.string_value for kv in res.attributes}


def _tokens(receiver: OtlpHttpReceiver | OtlpGrpcReceiver, team: str) -> dict[str, float]:
    snap = receiver.snapshot()
    return {t: sum(snap.value("extproc.tokens", a) for a in snap.attribute_sets("extproc.tokens")
                   if a.get("team") == team and a.get("token.type") == t)
            for t in ("input", "output")}


def _traffic(tmp_path: Path, sim: str, grpc_port: int, team: str) -> dict[str, int]:
    envoy, url, _ = start_envoy(tmp_path, sim, grpc_port)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": team})
        want = {"input": 0, "output": 0}
        for i in range(3):
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=6, stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage:
                    want["input"] += chunk.usage.prompt_tokens
                    want["output"] += chunk.usage.completion_tokens
        return want
    finally:
        envoy.stop()


def _serve(tmp_path: Path, env: dict[str, str]):
    proc, grpc_port, admin_port = serve_process(tmp_path, env={**QUIET, **env})
    proc.start()
    return proc, grpc_port, admin_port


def test_otlp_http_by_the_standard_variables_only(tmp_path, sim, receivers) -> None:
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.http.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret,x-tenant=acme",
        "OTEL_SERVICE_NAME": "gateway-a",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=gw-0,k8s.namespace.name=inference,"
                                    "deployment.environment.name=prod",
    }
    proc, grpc_port, admin_port = _serve(tmp_path, env)
    try:
        want = _traffic(tmp_path, sim, grpc_port, "otel-http")
        assert _post_flush(admin_port) == {"flushed": True}
        assert _tokens(receivers.http, "otel-http") == want and want["input"] > 0
        assert "gen_ai.client.token.usage" in receivers.http.snapshot().names()
        res = _resource(receivers.http)
        assert res["service.name"] == "gateway-a"
        assert res["k8s.pod.name"] == "gw-0" and res["k8s.namespace.name"] == "inference"
        assert res["deployment.environment.name"] == "prod"
        assert res["service.version"]  # ours, as nothing overrode it
        headers = {k.lower(): v for k, v in receivers.http.headers[-1].items()}
        assert headers["authorization"] == "Bearer s3cret" and headers["x-tenant"] == "acme"
        # OTEL_METRICS_EXPORTER=otlp lists no prometheus: the admin /metrics says why it is off
        status, text = _metrics_status(admin_port)
        assert status == 404 and "OTEL_METRICS_EXPORTER" in text
        assert not receivers.grpc.requests
    finally:
        assert proc.stop(timeout=60) == 0
    assert "metric exporters: otlp (OTEL_METRICS_EXPORTER=otlp)" in (tmp_path / "sidecar.log").read_text()


def test_otlp_grpc_by_the_per_signal_variables(tmp_path, sim, receivers) -> None:
    """The METRICS_ variants win over the generic ones (which point at the wrong receiver)."""
    env = {
        "OTEL_METRICS_EXPORTER": "otlp,prometheus",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.http.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receivers.grpc.endpoint,
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=generic",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-tenant=metrics",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes,k8s.node.name=node-1",
    }
    proc, grpc_port, admin_port = _serve(tmp_path, env)
    try:
        want = _traffic(tmp_path, sim, grpc_port, "otel-grpc")
        assert _post_flush(admin_port) == {"flushed": True}
        assert _tokens(receivers.grpc, "otel-grpc") == want and want["input"] > 0
        assert not receivers.http.requests
        res = _resource(receivers.grpc)
        assert res["service.name"] == "from-attributes" and res["k8s.node.name"] == "node-1"
        assert receivers.grpc.headers[-1]["x-tenant"] == "metrics"
        status, text = _metrics_status(admin_port)  # prometheus is in the list too
        assert status == 200 and 'team="otel-grpc"' in text
    finally:
        assert proc.stop(timeout=60) == 0


def test_an_endpoint_alone_exports_and_keeps_prometheus(tmp_path, receivers) -> None:
    proc, _, admin_port = _serve(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": receivers.http.endpoint})
    try:
        assert _post_flush(admin_port) == {"flushed": True}
        assert "extproc.ext_proc.streams.opened" in receivers.http.snapshot().names()
        assert _resource(receivers.http)["service.name"] == "extproc"
        assert _metrics_status(admin_port)[0] == 200
    finally:
        assert proc.stop(timeout=60) == 0


@pytest.mark.parametrize("env", [
    {"OTEL_SDK_DISABLED": "true", "OTEL_METRICS_EXPORTER": "otlp,prometheus"},
    {"OTEL_METRICS_EXPORTER": "none"},
], ids=["sdk-disabled", "none"])
def test_nothing_exported_when_switched_off(tmp_path, receivers, env) -> None:
    proc, _, admin_port = _serve(tmp_path, {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.http.endpoint})
    try:
        assert _post_flush(admin_port) == {"flushed": True}
        status, text = _metrics_status(admin_port)
        assert status == 404 and "disabled" in text
    finally:
        assert proc.stop(timeout=60) == 0  # the shutdown would push a last export
    assert not receivers.http.requests and not receivers.grpc.requests


def test_console_exporter_prints_to_stdout(tmp_path) -> None:
    proc, _, admin_port = _serve(tmp_path, {"OTEL_METRICS_EXPORTER": "console"})
    try:
        assert _post_flush(admin_port) == {"flushed": True}
    finally:
        assert proc.stop(timeout=60) == 0
    text = (tmp_path / "sidecar.log").read_text()
    assert '"resource_metrics"' in text and "extproc.ext_proc.streams.opened" in text


def test_a_bad_exporter_list_stops_the_start_with_its_name(tmp_path) -> None:
    proc, _, _ = serve_process(tmp_path, env={"OTEL_METRICS_EXPORTER": "otlp,jaeger"})
    with pytest.raises(RuntimeError, match="did not start"):
        proc.start(timeout=30)
    assert proc.proc is not None and proc.proc.wait(10) == 2  # config error, not a crash
    text = (tmp_path / "sidecar.log").read_text()
    assert "OTEL_METRICS_EXPORTER" in text and "'jaeger'" in text
