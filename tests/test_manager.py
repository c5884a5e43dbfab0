"""The seed's IStreamingManager API, end to end in one process."""

from __future__ import annotations

import pytest

from streaming_app.exceptions import GMIErrorCode, StreamError
from streaming_app.manager import StreamingManager

from .conftest import RecordingClient, delta


async def test_push_reaches_registered_client_in_order(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    seqs = [await manager.push_chunk(stream_id, delta(stream_id, str(i))) for i in range(20)]
    assert seqs == list(range(1, 21))
    assert client.texts == [str(i) for i in range(20)]


async def test_push_after_close_raises(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    await manager.close_stream(stream_id, "done")
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(stream_id, delta(stream_id, "late"))
    assert info.value.code is GMIErrorCode.STREAM_CLOSED
