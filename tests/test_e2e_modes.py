"""The other ways to run: observability mode (Envoy does not wait for the sidecar) and the lean
h2 transport, each through the real Envoy with the openai client."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.stack import (
    RecordingSink,
    ThreadedSidecar,
    envoy_stats,
    sidecar_settings,
    start_envoy,
    wait_events,
)
from tests.test_e2e import MODEL, MSG, _sim_counters


@pytest.fixture(params=[("grpcio", "sync"), ("grpcio", "observe"), ("h2", "sync"), ("h2", "observe"), ("grpcio", "hybrid"),
                        ("h2", "hybrid"), ("h2", "sync", "uvloop"), ("grpcio", "sync", "uvloop"),
                        ("h2", "sync", "busypoll")],
                ids=lambda p: "-".join(p))
def stack(request, sim, tmp_path):
    transport, mode, *loop = request.param
    rec = RecordingSink()
    grpc = {"transport": transport, "event_loop": loop[0] if loop and loop[0] != "busypoll" else "asyncio"}
    if loop == ["busypoll"]:
        grpc["busy_poll_us"] = 300
    sc = ThreadedSidecar(sidecar_settings(tmp_path, grpc=grpc), extra_sinks=[rec]).start()
    envoy, url, admin = start_envoy(tmp_path, sim, sc.sidecar.grpc_port, mode=mode)
    yield mode, url, admin, rec, sc
    envoy.stop()
    sc.stop()


def _wait(rec, user):
    return wait_events(rec, user, 1)[0]


def test_modes_meter_every_request(stack, sim):
    mode, url, admin, rec, sc = stack
    cases = [dict(stream=False), dict(stream=True), dict(stream=True, stream_options={"include_usage": True})]
    for case in cases * 2:
        user = "u" + uuid.uuid4().hex[:10]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": "modes", "x-user": user})
        before = _sim_counters(sim)
        out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=25, **case)
        if case["stream"]:
            chunks = list(out)
            if "stream_options" not in case:
                # Hybrid mode asks vLLM for usage but cannot hide the extra chunk (README).
                assert any(c.usage for c in chunks) == (mode == "hybrid")
        after = _sim_counters(sim)
        truth = (after[0] - before[0], after[1] - before[1])
        ev = _wait(rec, user)
        assert not ev.client_aborted and not ev.error
        if mode == "observe" and case["stream"] and "stream_options" not in case:
            # Observe mode cannot ask vLLM for usage: the model's tokenizer counts the text.
            # vLLM counts the end-of-sequence token on a "stop" finish; the text does not hold it.
            assert ev.token_source == 2 and not ev.usage_injected
            eos = 1 if ev.finish_reason == "stop" else 0
            assert ev.completion_tokens == truth[1] - eos
        else:
            assert ev.token_source == 1
            assert (ev.prompt_tokens, ev.completion_tokens) == truth
        assert ev.usage_injected == (mode != "observe" and case["stream"] and "stream_options" not in case)
    stats = envoy_stats(admin)
    bad = {k: v for k, v in stats.items() if v and any(w in k for w in ("failed", "failure_mode_allowed", "timeout"))}
    assert not bad, bad
    assert sc.sidecar.stats.events_emitted == len(cases) * 2
    assert not sc.sidecar.service.pending  # every request stream found its response stream
