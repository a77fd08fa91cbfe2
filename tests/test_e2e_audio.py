"""The audio routes through the real Envoy in sync, hybrid and observe mode, with the official
openai SDK (multipart uploads): the duration vLLM reports is stored exactly, a stream's tokens
exactly when usage could be asked for, the text counted otherwise."""

from __future__ import annotations

import urllib.request
import uuid

import openai
import pytest

from tests.audio_helpers import multipart, wav
from tests.stack import metered_stack, wait_events
from tests.test_e2e import MODEL, _sim_counters


@pytest.fixture(params=["sync", "hybrid", "observe"])
def stack(request, sim, tmp_path):
    with metered_stack(tmp_path, sim, mode=request.param) as (url, rec, sc):
        yield request.param, url, rec, sc


def test_sdk_transcription_and_translation(stack, sim):
    mode, url, rec, sc = stack
    for seconds, api, fmt in ((2.2, "transcriptions", "json"), (1.0, "translations", "json"),
                              (0.5, "transcriptions", "text")):
        user = "s" + uuid.uuid4().hex[:10]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-user": user})
        before = _sim_counters(sim)
        out = getattr(client.audio, api).create(model=MODEL, file=("a.wav", wav(seconds)), response_format=fmt)
        after = _sim_counters(sim)
        ev = wait_events(rec, user, 1)[0]
        assert ev.metered and not ev.error, ev.error_detail
        assert ev.endpoint == api[:-1] and ev.operation == api[:-1] and ev.token_source == 2
        text = out if fmt == "text" else out.text
        assert text and ev.completion_tokens > 0
        if fmt == "json":
            usage = out.usage if isinstance(out.usage, dict) else out.usage.model_dump()  # Translation keeps a dict
            assert ev.audio_seconds == usage["seconds"] == int(-(-seconds // 1))
        # vLLM counts the end-of-sequence token of a stopped output; the text does not hold it
        assert (after[1] - before[1]) - ev.completion_tokens in (0, 1)


def test_stream(stack, sim):
    mode, url, rec, sc = stack
    user = "s" + uuid.uuid4().hex[:10]
    body, content_type = multipart({"model": MODEL, "stream": "true"}, wav(1.5))
    before = _sim_counters(sim)
    req = urllib.request.Request(f"{url}/v1/audio/transcriptions", data=body, method="POST",
                                 headers={"content-type": content_type, "x-user": user})
    with urllib.request.urlopen(req, timeout=30) as r:
        client = r.read()
    after = _sim_counters(sim)
    truth = (after[0] - before[0], after[1] - before[1])
    ev = wait_events(rec, user, 1)[0]
    assert ev.metered and not ev.error and ev.stream and client.endswith(b"data: [DONE]\n\n")
    if mode == "observe":
        assert ev.token_source == 2 and truth[1] - ev.completion_tokens in (0, 1)
    else:
        assert ev.token_source == 1 and ev.usage_injected and (ev.prompt_tokens, ev.completion_tokens) == truth
        # sync mode hides the usage chunk it asked for; hybrid mode cannot (README)
        assert (b'"usage":{' in client) == (mode == "hybrid")
