"""A 32-second agent turn with long silences, through a real Daphne on each channels_redis
layer: nothing times out, nothing is lost, nothing is left behind.

Each silence outlasts redis-py 8's default socket timeout (5 s, which channels_redis's core
layer used to hit in its 5 s blocking pop: "Timeout reading from ...", close 1011), the
project's ``socket_timeout`` (15 s) and this session's redis-server's idle-client timeout
(pytest-redis starts it with ``--timeout 15``); the second comes after the first's reconnects.
Both layers run at the same time, so the test takes about as long as one turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from streaming_app.protocol import CloseCode

from .servers import (
    DaphneServer,
    base_env,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    migrated_sqlite,
    read_frames,
    run_python,
    start_python,
)
from .slow_agent import part
from .test_daphne import start_turn
from .test_sse import parse

LAYERS = {
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "core": "channels_redis.core.RedisChannelLayer",
}
# 32 s in all: two silences over the 15 s socket and idle-client timeouts.
GAPS = "16 16"
TURN_SECONDS = sum(float(gap) for gap in GAPS.split())


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh, migrated database for each layer's worker (PostgreSQL when the suite runs on
    it), so the two workers' sweepers never meet."""
    url = os.environ.get("DATABASE_URL", "")
    with ExitStack() as stack:
        urls = {}
        for name in LAYERS:
            if url.startswith("postgres"):
                urls[name] = create_postgres_database(url)
                stack.callback(drop_postgres_database, urls[name])
            else:
                (tmp_path / name).mkdir()
                urls[name] = migrated_sqlite(tmp_path / name)
        yield urls


def redis_database(redis_url: str, index: int) -> str:
    """Database ``index`` of the session's redis-server, emptied."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{index}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def read_events(server: DaphneServer, stream_id: str, cookie: str) -> list[dict[str, Any]]:
    """Every Server-Sent Event of the stream until the response ends."""
    request = urllib.request.Request(
        f"{server.http_url}/streams/{stream_id}/events", headers={"Cookie": cookie}
    )
    # Each read waits at most one silence plus a keep-alive interval.
    with urllib.request.urlopen(request, timeout=60) as response:
        return parse(response.read())


def client_rows(env: dict[str, str]) -> int:
    """The StreamClient rows left, once the rows of clients that just went are gone (an SSE
    response ends a moment before its client's row goes); waits at most 10 s."""
    out = run_python(
        "import time\n"
        "from streaming_app.models import StreamClient\n"
        "deadline = time.monotonic() + 10\n"
        "while StreamClient.objects.exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "print('ROWS=%d' % StreamClient.objects.count())\n",
        env=env,
    )
    return int(out.split("ROWS=", 1)[1])


async def follow_a_slow_turn(
    env: dict[str, str], log: Path
) -> tuple[list[dict[str, Any]], int | None, list[dict[str, Any]], int, str]:
    """Start a slow turn on a Daphne of its own; what a WebSocket and an SSE client saw, and
    the client rows left while the worker still runs."""
    with DaphneServer(env, log=log) as server:
        stream_id, cookie = await asyncio.to_thread(start_turn, server, GAPS)
        sse = asyncio.create_task(asyncio.to_thread(read_events, server, stream_id, cookie))
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.http_url},
            ping_interval=None,  # the server must keep an idle socket open by itself
        ) as ws:
            frames = await read_frames(ws)
        events = await sse
        rows = await asyncio.to_thread(client_rows, env)
        return frames, ws.close_code, events, rows, server.log()


@pytest.mark.database_independent  # the layers and processes, on any database
@pytest.mark.timeout(TURN_SECONDS + 90)
async def test_a_long_turn_with_long_silences_on_both_layers(
    databases: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    envs = {
        name: base_env(
            DATABASE_URL=databases[name],
            REDIS_URL=redis_database(redis_url, index),
            CHANNEL_LAYER_BACKEND=backend,
            STREAMING_APP_JSON=json.dumps({"AGENT": "tests.slow_agent.agent"}),
        )
        for index, (name, backend) in enumerate(LAYERS.items())
    }
    runs = await asyncio.gather(
        *(follow_a_slow_turn(env, tmp_path / f"daphne-{name}.log") for name, env in envs.items())
    )
    parts = len(GAPS.split())
    texts = [part(index) for index in range(parts)]
    for name, (frames, close_code, events, rows, log) in zip(envs, runs, strict=True):
        assert frames[0]["type"] == "subscribed", (name, frames, log)
        chunks = [f for f in frames if f["type"] == "chunk"]
        assert [f["seq"] for f in chunks] == list(range(1, parts + 2)), (name, frames, log)
        assert [f["chunk"].get("text_delta") for f in chunks[:-1]] == texts, name
        assert chunks[-1]["chunk"]["type"] == "final_response", name
        assert chunks[-1]["chunk"]["final_response_text"] == "".join(texts), name
        closed = {"type": "closed", "reason": "Interaction complete.", "last_seq": parts + 1}
        assert frames[-1] == closed, (name, frames, log)
        assert close_code == CloseCode.STREAM_CLOSED, (name, log)
        sse_chunks = [e for e in events if e["event"] == "chunk"]
        assert [int(e["id"]) for e in sse_chunks] == list(range(1, parts + 2)), (name, events, log)
        assert events[-1]["event"] == "closed", (name, events, log)
        assert events[-1]["data"] == closed, name
        assert "Timeout reading" not in log, (name, log)
        assert rows == 0, (name, log)


# -- connections that Redis closes while idle -----------------------------------------------

IDLE_TIMEOUT = 1  # the redis-server's `timeout`: it closes connections idle for longer
LAYER_ROUND_TRIPS = """
import asyncio
from channels.layers import get_channel_layer

async def main():
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("idle", channel)
    got = []
    for i in range(2):
        if i:
            await asyncio.sleep({idle})  # every pooled connection idles past the timeout
        await layer.group_send("idle", {{"type": "group", "i": i}})
        await layer.send(channel, {{"type": "direct", "i": i}})
        got += sorted(f"{{m['type']}}-{{m['i']}}" for m in
                      [await asyncio.wait_for(layer.receive(channel), 10) for _ in range(2)])
    print("GOT=" + ",".join(got))

asyncio.run(main())
"""


@pytest.fixture
def idle_closing_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own that closes connections idle for 1 s; its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--timeout", str(IDLE_TIMEOUT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(10)


async def test_both_layers_send_again_after_redis_closed_their_idle_connections(
    idle_closing_redis: str,
) -> None:
    """channels_redis's pools retry nothing: without the project's ``retry_on_error`` the
    first send after an idle period failed with "Connection closed by server"."""
    code = LAYER_ROUND_TRIPS.format(idle=IDLE_TIMEOUT * 3)
    processes = {}
    for name, backend in LAYERS.items():
        env = base_env(REDIS_URL=idle_closing_redis, CHANNEL_LAYER_BACKEND=backend)
        processes[name] = start_python(code, env=env)
    for name, process in processes.items():
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
        assert process.returncode == 0, (name, stderr)
        assert "GOT=direct-0,group-0,direct-1,group-1" in stdout, (name, stdout, stderr)
