"""SSE parser: real vLLM-shaped streams split at every kind of boundary."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sse import SSEParser


def _chunk(i: int, text: str) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                        "finish_reason": None, "stop_reason": None}], "usage": None}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


TEXTS = ["Hello", " wörld", " 日本語", " 🎉🎉", " naïve café", "\n", " done"]
STREAM = b"".join(_chunk(i, t) for i, t in enumerate(TEXTS)) + b"data: [DONE]\n\n"


def _collect(chunks: list[bytes]) -> tuple[list[bytes], SSEParser]:
    p = SSEParser()
    out = []
    for c in chunks:
        out.extend(e.data for e in p.feed(c))
    out.extend(e.data for e in p.flush())
    return out, p


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _texts(datas: list[bytes]) -> list[str]:
    return [orjson.loads(d)["choices"][0]["delta"]["content"] for d in datas if d != b"[DONE]"]


def test_every_single_cut_point():
    for cut in range(1, len(STREAM)):
        datas, p = _collect([STREAM[:cut], STREAM[cut:]])
        assert _texts(datas) == TEXTS, cut
        assert datas[-1] == b"[DONE]"
        assert p.garbage_lines == 0


def test_byte_at_a_time_keeps_utf8_whole():
    datas, _ = _collect([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert _texts(datas) == TEXTS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_arbitrary_splits(cuts):
    datas, _ = _collect(_split(STREAM, cuts))
    assert _texts(datas) == TEXTS
    # raw bytes of the events reassemble the stream exactly (what the rewriter re-emits)
    p = SSEParser()
    raw = b"".join(e.raw for c in _split(STREAM, cuts) for e in p.feed(c))
    assert raw == STREAM


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(1, 400), max_size=10))
def test_line_endings(eol, cuts):
    stream = STREAM.replace(b"\n", eol)
    datas, _ = _collect(_split(stream, cuts))
    assert _texts(datas) == TEXTS


def _events(p: SSEParser, chunks: list[bytes]) -> list[tuple[bytes, bytes, str]]:
    out = [(e.data, e.raw, e.event) for c in chunks for e in p.feed(c)]
    return out + [(e.data, e.raw, e.event) for e in p.flush()]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=30).map(lambda b: b"data: " + b + b"\n\n"),
    st.sampled_from([b"data: x\n\n", b"data: \n\n", b"data: a\nb\n\n", b"data: a\r\n\r\n", b"data:x\n\n",
                     b"data: [DONE]\n\n", b"data: x\n\n\n", b"\n\n", b"event: e\ndata: x\n\n", b"junk\n\n"]),
    st.binary(max_size=12)), max_size=8))
def test_one_event_per_chunk_fast_path_agrees_with_the_general_parser(chunks):
    """vLLM's usual chunk (one `data: ` line and its blank line) skips the line splitting; fed
    one byte at a time instead, the general parser must find the same events and garbage."""
    fast, slow = SSEParser(), SSEParser()
    got = _events(fast, chunks)
    want = _events(slow, [bytes([b]) for c in chunks for b in c])
    assert [(d, e) for d, _, e in got] == [(d, e) for d, _, e in want]
    assert b"".join(r for _, r, _ in got) == b"".join(r for _, r, _ in want)
    assert len(got) == len(want) and fast.garbage_lines == slow.garbage_lines


def test_multiline_data_comments_and_fields():
    p = SSEParser()
    evs = p.feed(b": keepalive\n\nevent: msg\nid: 7\ndata: a\ndata: b\n\n")
    assert [(e.event, e.data) for e in evs] == [("msg", b"a\nb")]
    assert p.garbage_lines == 0


def test_unterminated_tail_is_flushed_at_end_of_stream():
    p = SSEParser()
    assert p.feed(b"data: {\"x\": 1}") == []
    assert [e.data for e in p.flush()] == [b'{"x": 1}']


def test_not_sse_is_noticed():
    p = SSEParser()
    p.feed(b"<html>oops</html>\n\n")
    p.flush()
    assert p.garbage_lines == 1


def test_an_event_over_the_limit_comes_back_as_raw_pieces_at_every_cut():
    """Whatever the cuts (a terminator split across chunks included, CRLF or LF), the pieces of
    an oversized event and the events around it give back the input byte for byte, and the
    events after it are parsed again."""
    for end in (b"\n\n", b"\r\n\r\n"):
        big = b"data: " + b"x" * 300 + end
        stream = b"data: a" + end + big + b"data: b" + end + b"data: [DONE]" + end
        for size in (1, 2, 3, 5, 64, len(stream)):
            p = SSEParser(max_event_bytes=100)
            got = []
            for i in range(0, len(stream), size):
                got.extend(p.feed(stream[i:i + size]))
            got.extend(p.flush())
            assert b"".join(e.raw for e in got) == stream, (end, size)
            assert [e.data for e in got if not e.oversized] == [b"a", b"b", b"[DONE]"], (end, size)
            assert p.oversized_events == 1 and not p.pending
