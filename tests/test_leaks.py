"""Nothing is left behind: every channel, group membership, Redis subscription, asyncio task
and row a client used is given back when its stream closes (a real Daphne on the pub/sub
layer, 200 streams each with a WebSocket client, a bridged plain client and a waiting agent)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from streaming_app.protocol import CloseCode

from .servers import DaphneServer, manager_call, read_frames

STREAMS = 200


def probe(server: DaphneServer, action: str, data: Any = None) -> Any:
    request = urllib.request.Request(
        f"{server.http_url}/__probe__/{action}",
        data=None if data is None else json.dumps(data).encode(),
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def held(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "rss_kib"}


async def settled(server: DaphneServer, baseline: dict[str, Any]) -> dict[str, Any]:
    """The worker's state once it has finished letting go (polled: releases run in the
    clients' own tasks, after their sockets closed)."""
    state: dict[str, Any] = {}
    for _ in range(200):
        state = await asyncio.to_thread(probe, server, "state")
        if held(state) == held(baseline):
            break
        await asyncio.sleep(0.05)
    return state


async def one_round(server: DaphneServer, env: dict[str, str], count: int) -> None:
    """``count`` streams: a socket, a plain client and a waiter on each; a chunk; a close."""
    ids = manager_call(env, f"out = [await m.create_stream() for _ in range({count})]")
    sockets = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(*(
            websockets.connect(f"{server.ws_url}/ws/streams/{sid}/",
                               additional_headers={"Origin": server.http_url})
            for sid in ids[start:start + 100]
        ))  # fmt: skip
        sockets += batch
    for ws in sockets:
        assert json.loads(await ws.recv())["type"] == "subscribed"
    assert await asyncio.to_thread(probe, server, "bridge", ids) == count
    assert await asyncio.to_thread(probe, server, "wait", ids) == count
    body = "\n".join(
        f"await m.push_chunk({sid!r}, TextDeltaChunk(stream_id={sid!r}, text_delta='x'))\n"
        f"await m.close_stream({sid!r}, 'done')"
        for sid in ids
    )
    manager_call(env, body)
    results = await asyncio.wait_for(asyncio.gather(*(read_frames(ws) for ws in sockets)), 60)
    for frames, ws in zip(results, sockets, strict=True):
        assert [f["type"] for f in frames] == ["chunk", "closed"], frames
        assert ws.close_code == CloseCode.STREAM_CLOSED
    rows = manager_call(env, "from streaming_app.models import StreamClient\n"
                             "out = await StreamClient.objects.acount()")  # fmt: skip
    assert rows == 0


@pytest.mark.timeout(240)
async def test_closed_streams_leave_nothing_behind_in_the_worker(
    env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    server = DaphneServer(env, log=tmp_path / "daphne.log", app="tests.probe_asgi:application")
    with server, redis.Redis.from_url(redis_url) as outside:
        await one_round(server, env, 5)  # warm-up: connections, the sweeper, lazy imports
        baseline = await settled(server, await asyncio.to_thread(probe, server, "state"))
        assert baseline["followers"] == baseline["watches"] == 0
        redis_channels = len(outside.pubsub_channels())
        await one_round(server, env, STREAMS)
        first = await settled(server, baseline)
        assert held(first) == held(baseline), (baseline["kinds"], first["kinds"], first)
        assert len(outside.pubsub_channels()) == redis_channels  # Redis's own view agrees
        await one_round(server, env, STREAMS)
        second = await settled(server, baseline)
        assert held(second) == held(baseline)
        assert second["rss_kib"] <= first["rss_kib"] * 1.1, (first, second)
