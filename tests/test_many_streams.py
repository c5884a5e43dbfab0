"""One producer process pushing to 1,000 streams at once: zero errors, though its Redis pool is
far smaller (a push beyond it waits for a connection instead of failing)."""

from __future__ import annotations

import asyncio

import pytest
from django.test import override_settings

from streaming_app.chunks import TextDeltaChunk
from streaming_app.manager import StreamingManager

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.database_independent]

STREAMS = 1000


async def test_a_thousand_concurrent_pushes_from_one_process_all_succeed(redis_url: str) -> None:
    settings = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                "REDIS_URL": redis_url, "REDIS_MAX_CONNECTIONS": 20,
                "MAX_CONCURRENT_STREAMS": STREAMS}  # fmt: skip
    with override_settings(STREAMING_APP=settings):
        manager = StreamingManager()
        await manager.initialize()
        ids = [await manager.create_stream() for _ in range(STREAMS)]
        for round_ in (1, 2):
            results = await asyncio.gather(
                *(manager.push_chunk(sid, TextDeltaChunk(stream_id=sid, text_delta="x"))
                  for sid in ids), return_exceptions=True,
            )  # fmt: skip
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors == [], errors[:3]
            assert results == [round_] * STREAMS
        await manager.shutdown()
