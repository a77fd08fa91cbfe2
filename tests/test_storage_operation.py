"""Migration 0004's columns (operation, cache_creation_tokens, audio_seconds) are stored from
both insert formats, and rows from before it read '' and 0."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extproc.storage.sink import batch_token
from tests.storage_helpers import chdb_storage, make_event, settings_for


@pytest.mark.parametrize("fmt", ["protobuf", "arrow"])
async def test_operation_columns_round_trip(tmp_path: Path, fmt: str) -> None:
    events = [
        make_event(0, operation="chat", endpoint="messages", cached_tokens=5, cache_creation_tokens=17),
        make_event(1, operation="transcription", endpoint="transcription", audio_seconds=42),
        make_event(2),  # an event that sets none of them
    ]
    payloads = [e.SerializeToString() for e in events]
    async with chdb_storage(settings_for(tmp_path, storage={"insert_format": fmt})) as st:
        await asyncio.to_thread(st.writer().write, payloads, batch_token(payloads))
        got = await st.run(lambda c: c.query(
            "SELECT request_id, operation, endpoint, cached_tokens, cache_creation_tokens, audio_seconds "
            "FROM usage_events ORDER BY request_id").result_rows)
    assert got == [("req-0", "chat", "messages", 5, 17, 0), ("req-1", "transcription", "transcription", 0, 0, 42),
                   ("req-2", "", "chat", 0, 0, 0)]
