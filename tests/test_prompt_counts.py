"""Prompt tokens without the upstream's usage (a client abort before the usage chunk) are
counted as vLLM counts them: the served model's chat template rendered for a chat, the
tokenizer's special tokens (BOS) for a text prompt. Checked against the simulator, which renders
Llama 3's chat template and tokenizes as vLLM does; the tokenizer-only count stays the last
resort, flagged tokenizer_estimate."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from extproc.chat_template import ChatTemplateError, load_chat_template
from extproc.config import AttributionSettings
from extproc.events import TokenSource
from extproc.exchange import Exchange
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry, bundled_tokenizer_config, llama3_tokenizer_path
from tests import ext_proc_msgs as m

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHATS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],  # the 8 vs 19
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Price of GPUs?\n"}],
    [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "café 日本語 🎉"}]}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is a ledger?"},
     {"role": "assistant", "content": "Un registre."}, {"role": "user", "content": "And an invoice? " * 40}],
]
PROMPTS = ["Once upon a time", ["first prompt", "second, café"], "<|begin_of_text|>already there"]


def _post(sim: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{sim}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _aborted(registry: TokenizerRegistry, path: str, request: dict, chunk: dict):  # noqa: ANN202
    """The request streamed, one output chunk arrived, then Envoy reset the stream."""
    return _aborted_exchange(registry, path, request, chunk)[0]


def _aborted_exchange(registry: TokenizerRegistry, path: str, request: dict, chunk: dict):  # noqa: ANN202
    stats = SidecarStats()
    ex = Exchange(Attribution(AttributionSettings(), stats), ProcessorContext(registry), stats)
    for msg in (m.request_headers(path), m.body(orjson.dumps({**request, "stream": True}), eos=True),
                m.body(m.sse(orjson.dumps(chunk)), response=True, code=200)):
        ex.handle(msg.WhichOneof("request"), getattr(msg, msg.WhichOneof("request")))
    ev = ex.finish()
    assert ev.client_aborted and ev.completion_tokens > 0
    return ev, ex


CHAT_CHUNK = {"model": MODEL, "choices": [{"index": 0, "delta": {"content": "Sure"}}]}
TEXT_CHUNK = {"model": MODEL, "choices": [{"index": 0, "text": " there"}]}


@pytest.mark.parametrize("messages", CHATS)
def test_aborted_chat_prompt_counts_what_the_simulator_counts(sim, messages):
    want = _post(sim, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    ev = _aborted(TokenizerRegistry(models={MODEL: "llama3"}), "/v1/chat/completions",
                  {"model": MODEL, "messages": messages}, CHAT_CHUNK)
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"]
    assert ev.token_source == TokenSource.TOKENIZER and ev.tokenizer.endswith("+chat_template")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_aborted_completion_prompt_counts_what_the_simulator_counts(sim, prompt):
    want = _post(sim, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    ev = _aborted(TokenizerRegistry(models={MODEL: "llama3"}), "/v1/completions",
                  {"model": MODEL, "prompt": prompt}, TEXT_CHUNK)
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"]
    assert ev.token_source == TokenSource.TOKENIZER


def test_add_generation_prompt_false_is_counted_as_the_simulator_does(sim):
    messages = CHATS[1]
    want = _post(sim, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2,
                                                "add_generation_prompt": False})
    ev = _aborted(TokenizerRegistry(models={MODEL: "llama3"}), "/v1/chat/completions",
                  {"model": MODEL, "messages": messages, "add_generation_prompt": False}, CHAT_CHUNK)
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"]


def test_a_model_directory_is_read_like_a_hugging_face_snapshot(sim, tmp_path):
    """tokenizer.models may name a model directory (tokenizer.json + tokenizer_config.json)."""
    (tmp_path / "tokenizer.json").write_bytes(Path(llama3_tokenizer_path()).read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes(Path(bundled_tokenizer_config("llama3")).read_bytes())
    messages = CHATS[1]
    want = _post(sim, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    ev = _aborted(TokenizerRegistry(models={MODEL: str(tmp_path)}), "/v1/chat/completions",
                  {"model": MODEL, "messages": messages}, CHAT_CHUNK)
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"] and ev.token_source == TokenSource.TOKENIZER


def test_without_a_template_the_count_is_an_estimate_and_says_so(sim):
    messages = CHATS[0]
    want = _post(sim, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    for models in ({MODEL: llama3_tokenizer_path()}, {}):  # the model's tokenizer.json alone; tiktoken
        ev = _aborted(TokenizerRegistry(models=models), "/v1/chat/completions",
                      {"model": MODEL, "messages": messages}, CHAT_CHUNK)
        assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE
        assert 0 < ev.prompt_tokens < want["usage"]["prompt_tokens"]


def test_a_template_that_refuses_the_messages_falls_back_to_the_estimate(tmp_path, caplog):
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "{{ raise_exception('roles must alternate') }}"}))
    (tmp_path / "tokenizer.json").write_bytes(Path(llama3_tokenizer_path()).read_bytes())
    ev = _aborted(TokenizerRegistry(models={MODEL: str(tmp_path)}), "/v1/chat/completions",
                  {"model": MODEL, "messages": CHATS[0]}, CHAT_CHUNK)
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE and ev.prompt_tokens > 0
    assert "roles must alternate" in caplog.text


def test_templates_run_sandboxed_and_bad_files_are_refused_clearly(tmp_path):
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(ChatTemplateError):
        load_chat_template(cfg).render([{"role": "user", "content": "x"}])
    cfg.write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template(cfg)
    cfg.write_text("{not json")
    with pytest.raises(ChatTemplateError, match="cannot read"):
        load_chat_template(cfg)
    cfg.write_text(json.dumps({"bos_token": "<s>"}))  # a base model: no template
    assert load_chat_template(cfg) is None


def test_a_broken_template_file_leaves_the_tokenizer_and_logs(tmp_path, caplog):
    (tmp_path / "tokenizer.json").write_bytes(Path(llama3_tokenizer_path()).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    counter = TokenizerRegistry(models={MODEL: str(tmp_path)}).for_model(MODEL)
    assert counter.own and counter.chat is None and "cannot load the chat template" in caplog.text


def _post_status(sim: str, path: str, body: dict) -> tuple[int, dict]:
    try:
        return 200, _post(sim, path, body)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("messages", CHATS)
def test_simulator_tokenize_counts_a_chat_as_its_chat_completions_does(sim, messages):
    want = _post(sim, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    got = _post(sim, "/tokenize", {"model": MODEL, "messages": messages})
    assert got["count"] == len(got["tokens"]) == want["usage"]["prompt_tokens"]
    assert got["max_model_len"] > 0 and got["token_strs"] is None


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if isinstance(p, str)])
def test_simulator_tokenize_counts_a_prompt_as_its_completions_does(sim, prompt):
    want = _post(sim, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    got = _post(sim, "/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert got["count"] == want["usage"]["prompt_tokens"] and got["tokens"][0] == 128000
    assert len(got["token_strs"]) == got["count"]
    bare = _post(sim, "/tokenize", {"prompt": prompt, "add_special_tokens": False})  # no model: the served one
    assert bare["count"] == got["count"] - 1
    assert _post(sim, "/detokenize", {"model": MODEL, "tokens": bare["tokens"]})["prompt"] == prompt


def test_simulator_tokenize_refuses_what_vllm_refuses(sim):
    status, body = _post_status(sim, "/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404 and "does not exist" in body["error"]["message"]
    status, body = _post_status(sim, "/tokenize", {"messages": CHATS[0], "continue_final_message": True})
    assert status == 400 and "Cannot set both" in body["error"]["message"]
    status, body = _post_status(sim, "/tokenize", {"model": MODEL})
    assert status == 400
    status, body = _post_status(sim, "/detokenize", {"tokens": ["a"]})
    assert status == 400


# Responses `input`/`instructions` and Messages `system` + content blocks, in the shapes clients
# send; vLLM turns each into chat messages and renders the chat template, so must the fallback.
RESPONSES = [
    {"input": "What is a chargeback?"},
    {"instructions": "Answer briefly.", "input": "What is a chargeback?"},
    {"instructions": "Be exact.", "input": [{"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": "hi"},
                                            {"role": "user", "content": "  Price of GPUs?\n"}]},
    {"input": [{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Describe"}, {"type": "input_text", "text": "café 日本語 🎉"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Un registre."}]},
               {"role": "developer", "content": "Answer in French."},
               {"role": "user", "content": [{"type": "input_text", "text": "And an invoice? " * 40}]}]},
    # an agent's turn: reasoning, text and calls fold into one assistant message, as vLLM folds them
    {"instructions": "Use tools.", "input": [
        {"role": "user", "content": "What is 6 times 7?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Multiply."}, {"type": "reasoning_text", "text": "Twice."}]},
        {"type": "message", "role": "assistant", "id": "m1", "status": "completed",
         "content": [{"type": "output_text", "text": "Calling."}, {"type": "output_text", "text": "Ignored."}]},
        {"type": "function_call", "call_id": "c1", "name": "mul", "arguments": '{"a": 6, "b": 7}'},
        {"type": "function_call", "call_id": "c2", "name": "log", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "c3", "name": "done", "arguments": "{}"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Summarised."}]},
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "Thanks."}]},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "What is a chargeback?"}]},
    {"system": "Answer briefly.", "messages": [{"role": "user", "content": "hello"},
                                               {"role": "assistant", "content": "hi"},
                                               {"role": "user", "content": "  Price of GPUs?\n"}]},
    {"system": [{"type": "text", "text": "You are terse. "}, {"type": "text", "text": "Answer in French."}],
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                               {"type": "text", "text": "café 日本語 🎉"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Un registre."}]},
                  {"role": "user", "content": [{"type": "text", "text": "And an invoice? " * 40}]}]},
    # Claude Code's shape: an attribution block in the system prompt, thinking, tool use and
    # results, empty text blocks (vLLM drops them, and a user turn left with no text)
    {"system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=abc"},
                {"type": "text", "text": ""}, {"type": "text", "text": "You are a coding agent."}],
     "messages": [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "List files."}]},
                  {"role": "assistant", "content": [
                      {"type": "thinking", "thinking": "Use ls.", "signature": "sig"},
                      {"type": "text", "text": "Listing."},
                      {"type": "tool_use", "id": "t1", "name": "bash", "input": {"cmd": "ls", "all": True}}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.py"},
                                                                               {"type": "text", "text": "b.py"}]}]},
                  {"role": "assistant", "content": [{"type": "text", "text": ""}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"},
                                               {"type": "text", "text": "Now explain."}]}]},
]
RESPONSES_CHUNK = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                   "content_index": 0, "delta": "Sure"}
MESSAGES_CHUNK = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Sure"}}
AGENT_CASES = [("/v1/responses", {"max_output_tokens": 2, **r}, RESPONSES_CHUNK, "input_tokens") for r in RESPONSES] + [
    ("/v1/messages", {"max_tokens": 2, **r}, MESSAGES_CHUNK, "input_tokens") for r in MESSAGES]


@pytest.mark.parametrize(("path", "request_", "chunk", "key"), AGENT_CASES,
                         ids=[f"{c[0].rsplit('/', 1)[1]}-{i}" for i, c in enumerate(AGENT_CASES)])
def test_aborted_responses_and_messages_prompts_count_what_the_simulator_counts(sim, path, request_, chunk, key):
    """A Responses or Messages stream cut before its usage (for Messages: before message_start)
    is counted through the chat template, and through vLLM's /tokenize when no template is here,
    both as the simulator counted the same request."""
    request_ = {"model": MODEL, **request_}
    want = _post(sim, path, request_)["usage"][key]
    ev = _aborted(TokenizerRegistry(models={MODEL: "llama3"}), path, request_, chunk)
    assert ev.prompt_tokens == want and ev.token_source == TokenSource.TOKENIZER
    assert ev.tokenizer.endswith("+chat_template")
    ev, ex = _aborted_exchange(TokenizerRegistry(models={}), path, request_, chunk)
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE  # to be recounted by /tokenize
    recount = ex.processor.recount_request()
    assert recount is not None and len(recount.prompt) == 1
    assert _post(sim, "/tokenize", recount.prompt[0])["count"] == want


def test_a_template_gets_tool_calls_and_reasoning_as_vllm_hands_them(tmp_path):
    """vLLM decodes an assistant's tool-call arguments to a mapping before the template runs
    (invalid or non-object JSON becomes {}), drops an empty tool_calls list and passes the
    reasoning as `reasoning_content` too; templates that render them count what vLLM counts."""
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": (
        "{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content or '' }}|{{ m.content }}"
        "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}<{{ c.function.name }}"
        "{{ c.function.arguments | tojson }}>{% endfor %}{% else %}-{% endif %}]{% endfor %}")}))
    template = load_chat_template(cfg)
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "reasoning": "think", "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a":1,"b":"é"}'}},
                    {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                    {"id": "3", "type": "function", "function": {"name": "h", "arguments": "[1]"}},
                    {"id": "4", "type": "function", "function": {"name": "k", "arguments": ""}}]},
                {"role": "assistant", "content": "x", "tool_calls": []}]
    before = json.dumps(messages)
    assert template.render(messages, add_generation_prompt=False) == (
        '[user||go-][assistant|think|<f{"a": 1, "b": "é"}><g{}><h{}><k{}>][assistant||x-]')
    assert json.dumps(messages) == before  # the request itself is left as it came


def test_a_responses_request_continuing_a_stored_one_stays_an_estimate(sim):
    """With previous_response_id vLLM prepends a history only it holds: counting the visible
    input is no exact count, and vLLM's /tokenize cannot be asked for it either."""
    request_ = {"model": MODEL, "previous_response_id": "resp_earlier", "input": "And then?"}
    ev, ex = _aborted_exchange(TokenizerRegistry(models={MODEL: "llama3"}), "/v1/responses", request_, RESPONSES_CHUNK)
    alone = _post(sim, "/v1/responses", {"model": MODEL, "input": "And then?", "max_output_tokens": 2})
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE
    assert ev.prompt_tokens == alone["usage"]["input_tokens"]  # the visible part, counted exactly
    assert ex.processor.recount_request() is None
