"""Through the real Envoy, with the openai client: a stream that carries no usage (observe
mode cannot ask for it) and a stream the client abandons are counted as vLLM counts them, by
the served model's chat template or, with no template here, by vLLM's /tokenize; with neither,
the event says it is an estimate."""

from __future__ import annotations

import uuid

import anthropic
import openai
import pytest

from extproc.events import TokenSource
from extproc.recount import TOKENIZER_NAME
from tests.stack import metered_stack, sidecar_settings, start_sim, wait_events

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain chargeback."}]

SETUPS = {
    "template": ({"models": {MODEL: "llama3"}}, TokenSource.TOKENIZER, "+chat_template"),
    "tokenize": ({"models": {}, "tokenize_url": "SIM"}, TokenSource.TOKENIZER, TOKENIZER_NAME),
    "neither": ({"models": {}}, TokenSource.TOKENIZER_ESTIMATE, "tiktoken:o200k_base"),
}


@pytest.fixture(params=list(SETUPS))
def stack(request, sim, tmp_path):
    tokenizer, source, name = SETUPS[request.param]
    tokenizer = {k: (sim if v == "SIM" else v) for k, v in tokenizer.items()}
    settings = sidecar_settings(tmp_path, tokenizer=tokenizer)
    with metered_stack(tmp_path, sim, settings, mode="observe") as (url, rec, _):
        yield url, rec, source, name


def test_a_stream_without_usage_counts_its_prompt_as_vllm(stack):
    url, rec, source, name = stack
    user = "u" + uuid.uuid4().hex[:10]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-user": user})
    truth = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5).usage
    wait_events(rec, user, 1)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True))
    assert not any(c.usage for c in chunks)  # observe mode injects nothing
    ev = wait_events(rec, user, 2)[1]
    assert ev.token_source == source and name in ev.tokenizer
    if source == TokenSource.TOKENIZER:
        assert ev.prompt_tokens == truth.prompt_tokens
    else:  # the last resort, and it says so
        assert 0 < ev.prompt_tokens < truth.prompt_tokens


@pytest.fixture
def sync_stack(tmp_path):
    slow, slow_url = start_sim(tmp_path, "--tokens-per-second", "20")  # the client hangs up mid-stream
    with metered_stack(tmp_path, slow_url) as (url, rec, _):  # llama3: with its template
        yield url, rec
    slow.stop()


def test_a_client_that_abandons_its_stream_is_billed_the_prompt_vllm_counted(sync_stack):
    """The issue's case: the openai client reads two chunks of a stream and hangs up, before the
    usage chunk; the stored prompt is what vLLM counts (19 here, not the 8 of the plain text)."""
    url, rec = sync_stack
    user = "u" + uuid.uuid4().hex[:10]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-user": user})
    two = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    for kind, kwargs in (("chat", {"messages": two}), ("completions", {"prompt": "Tell me about GPU metering"})):
        api = client.chat.completions if kind == "chat" else client.completions
        truth = api.create(model=MODEL, max_tokens=5, **kwargs).usage
        stream = api.create(model=MODEL, max_tokens=200, stream=True, **kwargs)
        for i, _ in enumerate(stream):
            if i == 1:
                break
        stream.close()
        events = wait_events(rec, user, 2 if kind == "chat" else 4)
        ev = events[-1]
        assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER, kind
        assert ev.prompt_tokens == truth.prompt_tokens, kind


# The Responses and Messages APIs carry their usage in every stream, so only an abort leaves the
# prompt to count: the chat template (llama3) or, with no template here, vLLM's /tokenize.
AGENT_SETUPS = {
    "template": {"models": {MODEL: "llama3"}},
    "tokenize": {"models": {}, "tokenize_url": "SIM"},
}
RESPONSES_KW = dict(instructions="Answer briefly.", input=[  # an agent's conversation, one tool call in it
    {"role": "user", "content": "hello there"},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Look it up."}]},
    {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"term": "chargeback"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "internal billing of shared costs"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": [{"type": "input_text", "text": "Explain"}, {"type": "input_text", "text": "chargeback."}]}])
MESSAGES_KW = dict(system=[{"type": "text", "text": "You are terse. "}, {"type": "text", "text": "Answer briefly."}],
                   messages=[{"role": "user", "content": "hello there"},
                             {"role": "assistant", "content": [
                                 {"type": "text", "text": "hi"},
                                 {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"term": "chargeback"}}]},
                             {"role": "user", "content": [
                                 {"type": "tool_result", "tool_use_id": "t1", "content": "internal billing"},
                                 {"type": "text", "text": "Explain"}, {"type": "text", "text": "chargeback."}]}])


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory):
    proc, url = start_sim(tmp_path_factory.mktemp("slow-sim"), "--tokens-per-second", "20")
    yield url
    proc.stop()


@pytest.fixture(params=[(mode, setup) for mode in ("sync", "observe") for setup in AGENT_SETUPS],
                ids=lambda p: "-".join(p))
def agent_stack(request, slow_sim, tmp_path):
    mode, setup = request.param
    tokenizer = {k: (slow_sim if v == "SIM" else v) for k, v in AGENT_SETUPS[setup].items()}
    settings = sidecar_settings(tmp_path, tokenizer=tokenizer)
    with metered_stack(tmp_path, slow_sim, settings, mode=mode) as (url, rec, _):
        yield url, rec, setup


def _assert_counted_as_vllm(ev, setup: str, truth: int) -> None:
    assert ev.client_aborted and ev.token_source == TokenSource.TOKENIZER, (ev.token_source, ev.error_detail)
    assert ev.prompt_tokens == truth
    assert ev.tokenizer.endswith("+chat_template") if setup == "template" else ev.tokenizer == TOKENIZER_NAME


def test_an_abandoned_responses_stream_is_billed_the_prompt_vllm_counted(agent_stack, slow_sim):
    url, rec, setup = agent_stack
    user = "r" + uuid.uuid4().hex[:10]
    truth = openai.OpenAI(base_url=f"{slow_sim}/v1", api_key="k", max_retries=0).responses.create(
        model=MODEL, max_output_tokens=2, **RESPONSES_KW).usage.input_tokens
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-user": user})
    stream = client.responses.create(model=MODEL, max_output_tokens=200, stream=True, **RESPONSES_KW)
    seen = []
    for event in stream:  # the client reads a couple of events and hangs up, long before response.completed
        seen.append(event.type)
        if event.type == "response.output_text.delta":
            break
    stream.close()
    assert "response.completed" not in seen
    _assert_counted_as_vllm(wait_events(rec, user, 1)[0], setup, truth)


def test_a_messages_stream_cut_before_message_start_is_billed_the_prompt_vllm_counted(agent_stack, slow_sim):
    """The upstream drops the connection before message_start: no input_tokens were ever seen."""
    url, rec, setup = agent_stack
    user = "m" + uuid.uuid4().hex[:10]
    truth = anthropic.Anthropic(base_url=slow_sim, api_key="k", max_retries=0).messages.create(
        model=MODEL, max_tokens=2, **MESSAGES_KW).usage.input_tokens
    client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0,
                                 default_headers={"x-user": user, "x-sim-abort-after": "0"})
    with pytest.raises(Exception, match="incomplete chunked read"), \
            client.messages.stream(model=MODEL, max_tokens=200, **MESSAGES_KW) as s:
        s.get_final_message()  # the SDK sees the cut body (its HTTP client's error, not an APIError)
    _assert_counted_as_vllm(wait_events(rec, user, 1)[0], setup, truth)


def test_an_abandoned_messages_stream_keeps_the_input_message_start_told(agent_stack, slow_sim):
    url, rec, setup = agent_stack
    user = "n" + uuid.uuid4().hex[:10]
    truth = anthropic.Anthropic(base_url=slow_sim, api_key="k", max_retries=0).messages.create(
        model=MODEL, max_tokens=2, **MESSAGES_KW).usage.input_tokens
    client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, default_headers={"x-user": user})
    with client.messages.stream(model=MODEL, max_tokens=200, **MESSAGES_KW) as s:
        next(iter(s.text_stream))  # one text delta, then the client hangs up
    ev = wait_events(rec, user, 1)[0]
    assert ev.client_aborted and ev.prompt_tokens == truth
