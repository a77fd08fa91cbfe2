"""vLLM down (restarting, crashed): Envoy answers 503 itself. Every request is still recorded,
once, as an upstream error with Envoy's reason, in every mode; nothing is counted as tokens."""

from __future__ import annotations

import openai
import pytest

from extproc.devtools.devstack import free_port
from tests.stack import metered_stack, sidecar_settings, wait_events


@pytest.mark.parametrize("mode", ["sync", "observe", "hybrid"])
def test_upstream_down_is_recorded_as_upstream_error(tmp_path, mode):
    settings = sidecar_settings(tmp_path, grpc={"transport": "h2"})
    # nothing listens on the upstream port
    with metered_stack(tmp_path, f"http://127.0.0.1:{free_port()}", settings, mode=mode) as (url, rec, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": "t", "x-user": "down"})
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError):
                out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=5, stream=stream)
                list(out)
        events = wait_events(rec, "down", 2)
        for ev in events:
            assert ev.http_status == 503 and ev.error == "upstream_error"
            assert "upstream connect error" in ev.error_detail
            assert (ev.prompt_tokens, ev.completion_tokens) == (0, 0) and not ev.client_aborted
            assert ev.labels["team"] == "t"
