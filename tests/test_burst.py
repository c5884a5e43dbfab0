"""A burst of WebSocket handshakes to one real Daphne worker: every one is served.

Daphne's ``-b``/``-p`` listen with Twisted's default backlog of 50: in a burst of 300 the
handshakes past a full accept queue were dropped by the kernel (``TcpExtListenOverflows``) and
came back only with TCP's retransmissions, 1 s, 3 s, 7 s later; a client that gave up sooner, or
whose request then reached Daphne too late for its 5 s opening-handshake timeout, lost it. The
README runs Daphne with ``-e tcp:port=...:backlog=1024``, as these tests do.

The whole burst then follows one stream until it is cancelled: on Redis, the 300 clients read
the history at once when it closes (a pool that waits for a connection, not "Too many
connections"), and the worker stops cleanly afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from streaming_app.protocol import CloseCode

from .servers import SETTINGS, DaphneServer, base_env, read_frames
from .test_daphne import start_turn

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent

BURST = 300
BACKLOG = 1024  # the README's; the kernel caps it at net.core.somaxconn (4096 by default)


@pytest.fixture(params=["memory", "redis"])
def burst_env(request: pytest.FixtureRequest, database_url: str) -> dict[str, str]:
    """Anyone may follow, one stream holds the whole burst; the in-memory default or Redis."""
    settings = {**SETTINGS, "MAX_CLIENTS_PER_STREAM": BURST, "AGENT": "tests.slow_agent.agent"}
    extra = {"REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    return base_env(DATABASE_URL=database_url, STREAMING_APP_JSON=json.dumps(settings), **extra)


def listen_backlog(port: int) -> int:
    """The accept-queue length the socket listening on ``port`` was given (``ss``'s Send-Q)."""
    assert shutil.which("ss"), "ss (iproute2) is needed to read the listen backlog"
    line = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip
    return int(line[2])


def subscriptions(env: dict[str, str]) -> int:
    """Redis pub/sub channels subscribed to (0 on the in-memory default)."""
    if not env.get("REDIS_URL"):
        return 0
    with redis.Redis.from_url(env["REDIS_URL"]) as client:
        return len(client.pubsub_channels())


async def settled(env: dict[str, str], baseline: int) -> None:
    """Wait until the worker's consumers have let go of their channels: their tasks end after
    the sockets closed, and a worker stopped before that cancels them mid-unsubscribe."""
    for _ in range(600):
        if await asyncio.to_thread(subscriptions, env) <= baseline:
            return
        await asyncio.sleep(0.1)


async def open_and_subscribe(server: DaphneServer, stream_id: str) -> tuple[Any, dict[str, Any]]:
    """A handshake and the first frame (generous time limits: they only prevent a hang)."""
    ws = await websockets.connect(
        f"{server.ws_url}/ws/streams/{stream_id}/",
        additional_headers={"Origin": server.http_url},
        open_timeout=60,
    )
    try:
        return ws, json.loads(await asyncio.wait_for(ws.recv(), 60))
    except BaseException:
        await ws.close()
        raise


async def test_a_burst_of_handshakes_to_one_worker_is_served_in_full(
    burst_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "daphne.log"
    with DaphneServer(burst_env, log=log, backlog=BACKLOG) as server:
        assert listen_backlog(server.port) == BACKLOG
        stream_id, _ = start_turn(server, "60")  # one chunk, then a minute of silence
        baseline = subscriptions(burst_env)
        opened = await asyncio.gather(
            *(open_and_subscribe(server, stream_id) for _ in range(BURST)),
            return_exceptions=True,
        )
        served = [result for result in opened if not isinstance(result, BaseException)]
        sockets = [ws for ws, _ in served]
        try:
            failed = [repr(result) for result in opened if isinstance(result, BaseException)]
            assert not failed, f"{len(failed)} of {BURST} handshakes failed: {failed[:3]}"
            firsts = [first for _, first in served]
            assert [f["type"] for f in firsts] == ["subscribed"] * BURST
            assert len({f["client_id"] for f in firsts}) == BURST
            await sockets[0].send(json.dumps({"type": "cancel"}))  # all of them learn it
            rests = await asyncio.wait_for(
                asyncio.gather(*(read_frames(ws) for ws in sockets)), 120
            )
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        for ws, rest in zip(sockets, rests, strict=True):
            assert [f["seq"] for f in rest if f["type"] == "chunk"] == [1]
            assert rest[-1] == {"type": "closed", "reason": "cancelled", "last_seq": 1}
            assert ws.close_code == CloseCode.STREAM_CLOSED
        await settled(burst_env, baseline)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[text.find("Traceback") - 1000 :][:5000]
    assert text.count("registered to stream") == BURST
