"""/v1/audio/transcriptions and /v1/audio/translations: multipart requests read without JSON,
stream_include_usage added to a stream's form (and its chunk removed), the duration vLLM
reports stored as audio_seconds, plain-text answers counted, bad forms flagged."""

from __future__ import annotations

import orjson
import pytest

from extproc.events import TokenSource
from extproc.processors.multipart import add_field, form_fields
from tests.audio_helpers import multipart, wav
from tests.ext_proc_msgs import sse
from tests.processor_helpers import TOKENIZERS, run

AUDIO = wav(0.01) + b"\r\n--not-the-boundary\r\n"  # file bytes that look like a delimiter


def test_form_fields_skip_the_file_and_add_field_appends_one():
    body, _ = multipart({"model": "whisper", "stream": "true", "prompt": "Hallo"}, AUDIO, "b0undary")
    assert form_fields(body) == {"model": "whisper", "stream": "true", "prompt": "Hallo"}
    more = add_field(body, "stream_include_usage", "true")
    assert form_fields(more)["stream_include_usage"] == "true"
    assert more.endswith(b"\r\n--b0undary--\r\n") and AUDIO in more


@pytest.mark.parametrize(("path", "endpoint"), [("/v1/audio/transcriptions", "transcription"),
                                                ("/v1/audio/translations", "translation")])
def test_json_answer_duration_and_counted_text(path, endpoint):
    body, _ = multipart({"model": "m"}, AUDIO)
    answer = orjson.dumps({"text": "Hello wörld, this is a test", "usage": {"type": "duration", "seconds": 7}})
    _, ev, client, req = run(path, body, 200, [answer])
    assert req.request_body.response.body_mutation.WhichOneof("mutation") is None
    assert (ev.endpoint, ev.operation, ev.audio_seconds) == (endpoint, endpoint, 7)
    assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE and ev.prompt_tokens == 0
    assert ev.completion_tokens == TOKENIZERS.for_model("m").count("Hello wörld, this is a test")
    assert ev.request_model == "m" and not ev.error


def test_plain_text_answer_that_starts_like_sse_is_still_text():
    body, _ = multipart({"model": "m", "response_format": "text"}, AUDIO)
    _, ev, client, _ = run("/v1/audio/transcriptions", body, 200, [b"data is what we", b" talk about"])
    assert not ev.error and ev.completion_tokens == TOKENIZERS.for_model("m").count("data is what we talk about")
    assert client == b"data is what we talk about"


def test_stream_gets_usage_and_the_client_does_not_see_it():
    body, _ = multipart({"model": "m", "stream": "true"}, AUDIO)
    chunk = {"id": "t", "object": "transcription.chunk", "created": 1, "model": "m",
             "choices": [{"delta": {"content": "Hi there"}, "finish_reason": "stop", "stop_reason": None}]}
    final = {"id": "t", "object": "transcription.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    stream = sse(orjson.dumps(chunk), orjson.dumps(final), "[DONE]")
    _, ev, client, req = run("/v1/audio/transcriptions", body, 200, [stream, b""])
    sent = req.request_body.response.body_mutation.body
    assert form_fields(sent)["stream_include_usage"] == "true"
    assert ev.usage_injected and ev.stream and ev.token_source == TokenSource.UPSTREAM_USAGE
    assert (ev.prompt_tokens, ev.completion_tokens, ev.finish_reason) == (3, 4, "stop")
    assert client == sse(orjson.dumps(chunk), "[DONE]")


def test_client_that_asked_for_usage_keeps_it():
    body, _ = multipart({"model": "m", "stream": "true", "stream_include_usage": "true"}, AUDIO)
    _, ev, _, req = run("/v1/audio/transcriptions", body, 200, [sse("[DONE]"), b""])
    assert req.request_body.response.body_mutation.WhichOneof("mutation") is None and not ev.usage_injected


@pytest.mark.parametrize("body", [b"", b'{"model": "m"}', b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv"])
def test_bad_forms_are_flagged(body):
    _, ev, _, _ = run("/v1/audio/transcriptions", body, 400, [b'{"error": {"message": "bad"}}'])
    assert ev.error == "malformed_request_multipart" and ev.token_source == TokenSource.NONE


def test_error_answer():
    body, _ = multipart({"model": "nope"}, AUDIO)
    _, ev, _, _ = run("/v1/audio/transcriptions", body, 404,
                      [b'{"error": {"message": "The model `nope` does not exist."}}'])
    assert ev.error == "upstream_error" and "nope" in ev.error_detail and ev.audio_seconds == 0


def test_verbose_json_duration_is_rounded_up_and_a_bad_one_flagged():
    body, _ = multipart({"model": "m", "response_format": "verbose_json"}, AUDIO)
    answer = orjson.dumps({"duration": "2.31", "language": "en", "text": "Hello", "segments": []})
    _, ev, _, _ = run("/v1/audio/transcriptions", body, 200, [answer])
    assert ev.audio_seconds == 3 and not ev.error and ev.completion_tokens > 0
    _, ev, _, _ = run("/v1/audio/transcriptions", body, 200, [orjson.dumps({"duration": "long", "text": "x"})])
    assert ev.error == "malformed_response" and ev.audio_seconds == 0
