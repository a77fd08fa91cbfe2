"""The worker -> parent channel's framing, and how a worker's counters add up in the parent."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.stats import SidecarStats
from extproc.workers import relay

FRAMES = st.lists(st.tuples(st.sampled_from(sorted(relay.KINDS)), st.binary(max_size=300)), max_size=8)


@given(FRAMES, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20))
def test_frames_survive_any_cutting(frames, cuts):
    wire = b"".join(relay.frame(k, p) for k, p in frames)
    reader, got, pos, i = relay.FrameReader(), [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        got.extend(reader.feed(wire[pos:pos + step]))
        pos, i = pos + step, i + 1
    assert got == frames
    assert reader.pending == 0


def test_a_cut_frame_is_pending_not_returned():
    reader = relay.FrameReader()
    whole = relay.frame(relay.EVENT, b"abcdef")
    assert list(reader.feed(whole[:-1])) == []
    assert reader.pending == len(whole) - 1
    assert list(reader.feed(whole[-1:])) == [(relay.EVENT, b"abcdef")]


@pytest.mark.parametrize("bad, message", [
    (bytes([99]) + b"\x00\x00\x00\x01x", "unknown frame kind 99"),
    (bytes([relay.EVENT]) + (relay.MAX_FRAME + 1).to_bytes(4, "big"), "exceeds"),
])
def test_bad_frames_raise(bad, message):
    reader = relay.FrameReader()
    with pytest.raises(relay.RelayError, match=message):
        list(reader.feed(relay.frame(relay.STATS, b"{}") + bad))


def test_flush_tokens_round_trip_and_bad_length():
    [(kind, payload)] = relay.FrameReader().feed(relay.token_frame(relay.FLUSH, 2**40 + 7))
    assert kind == relay.FLUSH and relay.token(payload) == 2**40 + 7
    with pytest.raises(relay.RelayError):
        relay.token(b"\x00" * 3)


def test_worker_counters_add_up_in_the_parent():
    parent = SidecarStats(streams_opened=5, events_emitted=5)
    parent.errors["sink_emit"] = 1
    worker = SidecarStats()
    worker.streams_opened, worker.events_emitted = 3, 2
    worker.messages["request_headers"] = 3
    first = orjson.loads(orjson.dumps(worker.snapshot()))  # as it crosses the channel
    parent.add_delta(first, {})
    worker.streams_opened, worker.events_emitted = 7, 6
    worker.messages["request_headers"] = 7
    worker.errors["request_body"] = 1
    second = orjson.loads(orjson.dumps(worker.snapshot()))
    parent.add_delta(second, first)
    assert parent.streams_opened == 12 and parent.events_emitted == 11
    assert parent.messages == {"request_headers": 7}
    assert parent.errors == {"sink_emit": 1, "request_body": 1}


def test_a_snapshot_with_junk_is_ignored_where_it_is_junk():
    parent = SidecarStats()
    parent.add_delta({"streams_opened": "many", "messages": {"request_headers": 2, "x": "y"},
                      "no_such_counter": 4, "errors": [1]}, {})
    assert parent.streams_opened == 0
    assert parent.messages == {"request_headers": 2}
    assert parent.errors == {}
