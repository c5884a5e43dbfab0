"""``push_chunks``: many chunks in one history round trip, consecutive seqs, delivered as if
pushed one by one; all validated first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import websockets

from streaming_app.exceptions import GMIErrorCode, StreamError
from streaming_app.manager import StreamingManager

from .conftest import RecordingClient, delta
from .servers import DaphneServer, manager_call, read_frames

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_batch_gets_consecutive_seqs_and_arrives_in_order() -> None:
    manager = StreamingManager()
    await manager.initialize()
    sid = await manager.create_stream()
    client = RecordingClient("reader")
    await manager.register_client(sid, client)
    assert await manager.push_chunk(sid, delta(sid, "a")) == 1
    assert await manager.push_chunks(sid, [delta(sid, w) for w in "bcd"]) == [2, 3, 4]
    assert client.texts == ["a", "b", "c", "d"]
    bad = {"type": "text_delta", "stream_id": sid}  # no text_delta
    for chunks in ([delta(sid, "e"), bad], [], "not a list"):
        with pytest.raises(StreamError) as info:
            await manager.push_chunks(sid, chunks)  # type: ignore[arg-type]
        assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    assert await manager.push_chunk(sid, delta(sid, "f")) == 5  # nothing of them was pushed
    assert client.texts == ["a", "b", "c", "d", "f"]
    await manager.shutdown()


async def test_a_batch_from_another_process_through_the_one_round_trip_path(
    env: dict[str, str], tmp_path: Path
) -> None:
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        url, origin = f"{server.ws_url}/ws/streams/{sid}/", {"Origin": server.http_url}
        async with websockets.connect(url, additional_headers=origin) as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            out = manager_call(env, (
                f"out = await m.push_chunks({sid!r}, [TextDeltaChunk(stream_id={sid!r}, "
                "text_delta=str(i)) for i in range(200)])\n"
                "out = [out[0], out[-1], m.publishes_in_the_append]\n"
                f"await m.close_stream({sid!r})"
            ))  # fmt: skip
            frames = await read_frames(ws)
    assert out == [1, 200, True]  # one Redis script published all 200
    chunks = [f for f in frames if f["type"] == "chunk"]
    assert [f["seq"] for f in chunks] == list(range(1, 201))
    assert [f["chunk"]["text_delta"] for f in chunks] == [str(i) for i in range(200)]
