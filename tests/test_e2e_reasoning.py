"""Reasoning models through Envoy: vLLM's reasoning_tokens when it reports them, else our count
of the streamed `delta.reasoning` text (a part of completion_tokens)."""

from __future__ import annotations

import openai
import pytest

from extproc.tokenizers import TokenizerRegistry
from tests.stack import RecordingSink, ThreadedSidecar, sidecar_settings, start_envoy, start_sim
from tests.test_e2e import MODEL, MSG
from tests.test_e2e_modes import _wait


@pytest.mark.parametrize("reported", [True, False], ids=["vllm-reports", "vllm-silent"])
def test_reasoning_tokens(tmp_path, reported):
    sim_args = ["--reasoning"] if reported else ["--reasoning", "--no-reasoning-tokens-details"]
    sim, sim_url = start_sim(tmp_path, *sim_args)
    rec = RecordingSink()
    sc = ThreadedSidecar(sidecar_settings(tmp_path), extra_sinks=[rec]).start()
    envoy, url, _ = start_envoy(tmp_path, sim_url, sc.sidecar.grpc_port)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", default_headers={"x-user": "r1"})
        chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=60, stream=True,
                                                     stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
        assert reasoning, "the simulator streams reasoning first"
        ev = _wait(rec, "r1")
        details = usage.completion_tokens_details
        if reported:
            assert ev.reasoning_tokens == details.reasoning_tokens  # upstream wins
        else:
            assert details is None or not details.reasoning_tokens
            counter = TokenizerRegistry(models={MODEL: "llama3"}).for_model(MODEL)
            assert ev.reasoning_tokens == counter.count(reasoning)
        assert 0 < ev.reasoning_tokens <= ev.completion_tokens == usage.completion_tokens
    finally:
        envoy.stop()
        sc.stop()
        sim.stop()
