"""A running sidecar process exports OTLP over the wire (configured by the standard OTEL_*
variables); the test receives and decodes it after real requests through Envoy."""

from __future__ import annotations

import asyncio
import threading

import openai

from tests.stack import admin_json, serve_process, start_envoy, start_sim, wait_stats
from tests.telemetry_testing import OtlpHttpReceiver

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def test_sidecar_process_exports_otlp(tmp_path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    receiver = asyncio.run_coroutine_threadsafe(OtlpHttpReceiver().__aenter__(), loop).result(10)
    sim, sim_url = start_sim(tmp_path)
    sidecar, grpc_port, admin_port = serve_process(tmp_path, env={
        "EXTPROC_METRICS__OTLP": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_SERVICE_NAME": "extproc-e2e"})
    sidecar.start()
    envoy, url, _ = start_envoy(tmp_path, sim_url, grpc_port)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", default_headers={"x-team": "otlp"})
        want_in = want_out = 0
        for i in range(3):
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                               max_tokens=6)
            want_in += r.usage.prompt_tokens
            want_out += r.usage.completion_tokens
        # every stream ended and its event emitted, then one flush exports the metrics
        wait_stats(admin_port, lambda st: st["events_emitted"] >= 3 and st["streams_closed"] == st["streams_opened"],
                   "the three requests' events")
        assert admin_json(admin_port, "/v1/flush", "POST") == {"flushed": True}
        snap = receiver.snapshot()
        got = {t: sum(snap.value("extproc.tokens", a) for a in snap.attribute_sets("extproc.tokens")
                      if a.get("team") == "otlp" and a.get("token.type") == t)
               for t in ("input", "output")}
        assert got == {"input": want_in, "output": want_out} and want_in > 0
        assert admin_json(admin_port, "/v1/stats")["events_emitted"] == 3
        assert "gen_ai.client.token.usage" in snap.names()
        resource = receiver.requests[-1].resource_metrics[0].resource
        assert any(kv.key == "service.name" and kv.value.string_value == "extproc-e2e" for kv in resource.attributes)
    finally:
        envoy.stop()
        sidecar.stop()
        sim.stop()
        asyncio.run_coroutine_threadsafe(receiver.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
