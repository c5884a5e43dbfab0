"""A long agent turn with long silences, through a real Daphne on each channels_redis layer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from streaming_app.protocol import CloseCode

from .servers import SETTINGS, DaphneServer, base_env, manage, read_frames
from .slow_agent import GAPS
from .test_daphne import start_turn

LAYERS = {
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "core": "channels_redis.core.RedisChannelLayer",
}


async def follow_a_turn(env: dict[str, str], log: Path) -> tuple[list[dict[str, Any]], int]:
    with DaphneServer(env, log=log) as server:
        stream_id, cookie = await asyncio.to_thread(start_turn, server, "take your time")
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.http_url},
        ) as ws:
            frames = await read_frames(ws)
        rows = await asyncio.to_thread(
            manage, "shell", "--no-imports", "-c",
            "from streaming_app.models import StreamClient; "
            f"print(StreamClient.objects.filter(stream_id={stream_id!r}).count())",
            env=env,
        )  # fmt: skip
        assert rows.stdout.strip() == "0", rows.stderr
        return frames, ws.close_code or 0


@pytest.mark.database_independent  # the layers and processes, on any database
@pytest.mark.timeout(150)
async def test_a_minute_long_turn_with_long_silences_on_both_layers(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """60 s with 12 s of silence between chunks: longer than redis-py's default socket timeout
    and channels_redis's blocking pop, on both layers at once."""
    settings = {**SETTINGS, "AGENT": "tests.slow_agent.agent"}
    runs = []
    for name, backend in LAYERS.items():
        env = base_env(
            DATABASE_URL=database_url, REDIS_URL=redis_url, CHANNEL_LAYER_BACKEND=backend,
            STREAMING_APP_JSON=json.dumps(settings),
        )  # fmt: skip
        runs.append(follow_a_turn(env, tmp_path / f"daphne-{name}.log"))
    results = await asyncio.gather(*runs)
    for (frames, code), name in zip(results, LAYERS, strict=True):
        chunks = [f for f in frames if f["type"] == "chunk"]
        assert [f["seq"] for f in chunks] == list(range(1, GAPS + 2)), (name, frames)
        assert chunks[-1]["chunk"]["type"] == "final_response"
        assert frames[-1] == {"type": "closed", "reason": "Interaction complete.",
                              "last_seq": GAPS + 1}, name  # fmt: skip
        assert code == CloseCode.STREAM_CLOSED, name
