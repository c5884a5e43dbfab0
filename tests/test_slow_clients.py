"""Slow clients against a real Daphne: three WebSocket clients and one SSE client that open a
stream and stop reading while a producer pushes 5,000 chunks of 16 KB cost the worker at most
their bound each, a fast client on the same stream gets everything, and each slow client,
once it reads again, ends with every chunk exactly once."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from streaming_app.conf import DEFAULTS
from streaming_app.follow import follow_stream

from .servers import DaphneServer, manager_call, start_python, with_settings

# Process and memory behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent

CHUNKS, CHUNK_BYTES = 5000, 16 * 1024
MIB = 1024 * 1024
SMALL_BUFFER = 16 * 1024  # the slow clients' receive buffers: the server's writes back up


def produce(sid: str, chunks: int, chunk_bytes: int, *, close: bool = True) -> str:
    """A producer's code: ``chunks`` text deltas of ``chunk_bytes``, each starting with its
    number in 8 digits, then (with ``close``) the close."""
    return f"""
import asyncio
from streaming_app.manager import get_streaming_manager
from streaming_app.chunks import TextDeltaChunk
async def main():
    m = get_streaming_manager()
    sid = {sid!r}
    for i in range(1, {chunks} + 1):
        text = str(i).rjust(8, "0") + "x" * ({chunk_bytes} - 8)
        await m.push_chunk(sid, TextDeltaChunk(stream_id=sid, text_delta=text))
    if {close}:
        await m.close_stream(sid, "done")
asyncio.run(main())
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def small_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.connect(("127.0.0.1", port))
    return sock


def seq_of(frame: dict[str, Any]) -> int:
    return int(frame["chunk"]["text_delta"][:8])


class SlowWebSocket:
    """Opens the stream, then reads nothing (``websockets`` stops reading at a full queue)."""

    def __init__(self, server: DaphneServer, sid: str) -> None:
        self.url = f"{server.ws_url}/ws/streams/{sid}/"
        self.port = server.port
        self.seqs: list[int] = []
        self.last_frame: dict[str, Any] = {}
        self.socket: Any = None

    async def open(self) -> None:
        self.socket = await websockets.connect(
            self.url, sock=small_socket(self.port), max_queue=1, additional_headers=origin(self.url)
        )
        assert json.loads(await self.socket.recv())["type"] == "subscribed"

    async def read_all(self) -> None:
        """Read what the socket still holds, then resume (acking) to the end."""
        try:
            while True:
                frame = json.loads(await self.socket.recv())
                self.last_frame = frame
                if frame["type"] == "chunk":
                    self.seqs.append(seq_of(frame))
        except ConnectionClosed:
            pass
        last = self.seqs[-1] if self.seqs else 0
        async for frame in follow_stream(self.url, last_seq=last, headers=origin(self.url)):
            if frame["type"] == "chunk":
                self.seqs.append(seq_of(frame))


class SlowEventSource:
    """An SSE response nobody reads; later read to its end and resumed with Last-Event-ID."""

    def __init__(self, server: DaphneServer, sid: str) -> None:
        self.server, self.path = server, f"/streams/{sid}/events?replay=chunks"
        self.seqs: list[int] = []
        self.sock = small_socket(server.port)

    def open(self) -> None:
        self.sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

    def read_all(self) -> None:
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            ending = self.take(response.read())
        finally:
            response.close()
            self.sock.close()
        while ending != "closed":
            connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            connection.request("GET", self.path, headers={"Last-Event-ID": str(self.seqs[-1])})
            ending = self.take(connection.getresponse().read())
            connection.close()

    def take(self, body: bytes) -> str:
        """Record the chunks of one response; its last event's type."""
        last = ""
        for block in body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" not in fields:
                continue
            last = fields["event"]
            if last == "chunk":
                self.seqs.append(seq_of(json.loads(fields["data"])))
        return last


async def test_slow_clients_cost_a_bounded_amount_and_still_get_every_chunk(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = with_settings(env)
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        assert server.process is not None
        pid = server.process.pid
        sid = manager_call(env, "out = await m.create_stream()")
        slow = [SlowWebSocket(server, sid) for _ in range(3)]
        for client in slow:
            await client.open()
        sse = SlowEventSource(server, sid)
        sse.open()
        fast: list[int] = []
        following = asyncio.create_task(collect(f"{server.ws_url}/ws/streams/{sid}/", fast))
        await asyncio.sleep(0.5)  # let the subscriptions land before the first push
        before = peak = rss(pid)
        producer = start_python(produce(sid, CHUNKS, CHUNK_BYTES), env=env)
        try:
            while not following.done():
                peak = max(peak, rss(pid))
                await asyncio.sleep(0.02)
            await following
            assert producer.wait(60) == 0, producer.communicate()[1]
        finally:
            producer.kill()
            producer.communicate()
        growth = peak - before
        bound = 4 * DEFAULTS["CLIENT_MAX_UNREAD_BYTES"] + 20 * MIB
        print(f"\nDaphne RSS {before / MIB:.0f} MiB -> peak {peak / MIB:.0f} MiB "
              f"(+{growth / MIB:.1f} MiB; bound {bound / MIB:.0f} MiB)")  # fmt: skip
        assert fast == list(range(1, CHUNKS + 1))
        assert growth <= bound, f"RSS grew {growth / MIB:.1f} MiB, bound {bound / MIB:.0f} MiB"
        for client in slow:
            await client.read_all()
        await asyncio.to_thread(sse.read_all)
        log = server.log()
    for client in slow:
        assert client.seqs == list(range(1, CHUNKS + 1))
    assert sse.seqs == list(range(1, CHUNKS + 1))
    assert log.count("too far behind") >= 4, log[-3000:]
    assert "Traceback" not in log, log


def origin(url: str) -> dict[str, str]:
    """The Origin header a browser on the site would send (the origin check wants one)."""
    return {"Origin": "http" + url.removeprefix("ws").split("/ws/", 1)[0]}


async def collect(url: str, seqs: list[int]) -> None:
    async for frame in follow_stream(url, headers=origin(url)):
        if frame["type"] == "chunk":
            seqs.append(seq_of(frame))


async def test_follow_stream_pauses_a_reader_that_stops_and_resumes_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The Python client acks only what the caller took: a caller that stops is paused by the
    server (its lag and row show it), and goes on exactly once when it takes frames again."""
    # Paused for as long as the test takes to look (starting processes), not sent off.
    env = with_settings(env, CLIENT_WINDOW_CHUNKS=20, CLIENT_TIMEOUT_SECONDS=120)
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        url = f"{server.ws_url}/ws/streams/{sid}/"
        frames = follow_stream(url, ack_every=5, headers=origin(url))
        first = asyncio.ensure_future(anext(frames))  # subscribes, waits for seq 1
        await asyncio.sleep(0.5)
        pushed = start_python(produce(sid, 200, CHUNK_BYTES, close=False), env=env)
        try:
            assert await asyncio.to_thread(pushed.wait, 60) == 0, pushed.communicate()[1]
        finally:
            pushed.kill()
            pushed.communicate()
        assert (await first)["seq"] == 1  # and the caller takes nothing more for now
        state = (
            "out = [await m.get_client_lags(sid), [p async for p in "
            "StreamClient.objects.filter(stream_id=sid).values_list('paused', flat=True)]]"
        )
        code = f"from streaming_app.models import StreamClient\nsid = {sid!r}\n{state}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the sweeper stores the position it was paused at
            lags, paused = manager_call(env, code)
            if paused == [True]:
                break
            await asyncio.sleep(0.2)
        assert paused == [True] and min(lags.values()) >= 200 - 20, (lags, paused)
        seqs = [1]
        async for frame in frames:
            seqs.append(frame["seq"])
            if frame["seq"] == 200:
                break
        await frames.aclose()
        log = server.log()
    assert seqs == list(range(1, 201))
    assert "paused at seq" in log
    assert "Traceback" not in log, log
