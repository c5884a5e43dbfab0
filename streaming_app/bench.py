"""The benchmark behind ``manage.py streaming_bench``: streaming_app against raw Channels on the
same layer, in the same run.

- ``in_process``: push throughput of ``push_chunk`` against raw ``group_send`` of the same
  payload to the same group members, on the configured layer.
- ``end_to_end``: a Daphne worker, a producer process and real WebSocket clients; delivered
  chunks/s, p50/p99 latency (producer timestamp to client receipt), and lost, duplicated and
  reordered deliveries per client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from channels.layers import get_channel_layer

from .chunks import TextDeltaChunk, encode_chunk
from .layers import CHUNK, group_name
from .manager import StreamingManager

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "redis": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
# Channels' plain consumer, the same without its per-message database hop (the honest
# baseline: the best a hand-written consumer does), and streaming_app.
SYSTEMS = ("raw", "raw-nohop", "streaming_app")


@dataclass
class Scenario:
    name: str
    streams: int
    clients: int
    chunks: int
    rate: float  # chunks/s per stream; 0 = as fast as possible


@dataclass
class Result:
    system: str  # "raw", "raw-nohop" (raw without Channels' per-message hop) or "streaming_app"
    layer: str
    scenario: str
    expected: int
    delivered: int
    lost: int
    duplicated: int
    reordered: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    notes: list[str] = field(default_factory=list)


# -- in process -----------------------------------------------------------------------


async def in_process(manager: StreamingManager, chunks: int, members: int) -> dict[str, float]:
    """Chunks/s of push_chunk and of raw group_send to ``members`` drained channels."""
    layer = get_channel_layer()
    assert layer is not None
    stream_id = await manager.create_stream()
    group = group_name(stream_id)
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add(group, channel)

    async def drain(channel: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(layer.receive(channel), 0.2)
            except TimeoutError:
                continue

    async def timed(push: Any) -> float:
        stop = asyncio.Event()
        drains = [asyncio.create_task(drain(c, stop)) for c in channels]
        started = time.perf_counter()
        for i in range(chunks):
            await push(i)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*drains)
        return chunks / elapsed

    async def raw(i: int) -> None:
        text = encode_chunk(TextDeltaChunk(stream_id=stream_id, text_delta=f"tok{i} "),
                            stream_id=stream_id, max_bytes=65536)  # fmt: skip
        await layer.group_send(group, {"type": CHUNK, "seq": i + 1, "chunk": text})

    async def managed(i: int) -> None:
        await manager.push_chunk(
            stream_id, TextDeltaChunk(stream_id=stream_id, text_delta=f"tok{i} ")
        )

    raw_rate = await timed(raw)
    manager_rate = await timed(managed)
    await manager.close_stream(stream_id, "benchmark done")
    return {"raw": raw_rate, "streaming_app": manager_rate, "ratio": manager_rate / raw_rate}


# -- end to end -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """A private redis-server (unless given), a migrated SQLite file and one Daphne worker."""

    def __init__(self, redis_url: str | None, database_url: str | None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
        self.redis: subprocess.Popen[bytes] | None = None
        if redis_url is None:
            port = free_port()
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--bind", "127.0.0.1", "--dir", str(self.tmp)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            redis_url = f"redis://127.0.0.1:{port}/0"
            _wait_port(port)
        self.redis_url = redis_url
        self.database_url = database_url or f"sqlite:///{self.tmp / 'bench.sqlite3'}"
        self.run_manage("migrate", "-v0", layer="pubsub")

    def env(self, layer: str) -> dict[str, str]:
        settings = {"CAN_SUBSCRIBE": "streaming_app.bench.anyone", "SWEEP_INTERVAL_SECONDS": 1,
                    "MAX_CONCURRENT_STREAMS": 100_000, "HISTORY_MAX_CHUNKS": 5000}  # fmt: skip
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CHANNEL_LAYER_BACKEND": LAYERS[layer],
            "STREAMING_APP_JSON": json.dumps(settings),
            "STREAMING_LOG": "WARNING",
            "DJANGO_DEBUG": "0",
        }

    def run_manage(self, *args: str, layer: str) -> str:
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args], env=self.env(layer), cwd=ROOT,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
        return result.stdout

    def daphne(self, app: str, layer: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app],
            env=self.env(layer), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(port)
        return process, port

    def close(self) -> None:
        if self.redis is not None:
            stop(self.redis)


def stop(process: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM, and SIGKILL if it has not exited after ``grace`` seconds: nothing outlives us."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def anyone(user: Any, session_key: str | None, stream: Any) -> bool:
    """The benchmark's clients have no session: let them subscribe."""
    return True


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


async def _client(url: str, received: list[tuple[int, float, float]], done: asyncio.Event,
                  raw: bool, idle: float, expected: int) -> None:  # fmt: skip
    import websockets
    from websockets.exceptions import ConnectionClosed

    async with websockets.connect(url, additional_headers={"Origin": "http://127.0.0.1"},
                                  max_queue=None) as ws:  # fmt: skip
        if not raw:
            json.loads(await ws.recv())  # subscribed
        done.set()
        wait = 120.0  # the producer's process has to start first: idle counts from then on
        try:
            while True:
                text = await asyncio.wait_for(ws.recv(), wait)
                wait = idle
                now = time.time()
                frame = json.loads(text)
                if raw:
                    received.append((frame["seq"], frame["t"], now))
                    if len(received) >= expected:  # raw Channels says nothing at the end
                        return
                elif frame["type"] == "chunk":
                    sent = frame["chunk"]["metadata"]["t"]
                    received.append((frame["seq"], sent, now))
                elif frame["type"] == "closed":
                    return
        except (TimeoutError, ConnectionClosed):
            return


def end_to_end(deployment: Deployment, system: str, layer: str, scenario: Scenario) -> Result:
    """Run one scenario through one Daphne worker; what the clients received."""
    raw = system.startswith("raw")
    app = "streaming_app.bench_raw:application" if raw else "project.asgi:application"
    server, port = deployment.daphne(app, layer)
    try:
        return asyncio.run(_end_to_end(deployment, system, layer, scenario, port))
    finally:
        stop(server)


async def _end_to_end(deployment: Deployment, system: str, layer: str, scenario: Scenario,
                      port: int) -> Result:  # fmt: skip
    raw = system.startswith("raw")
    if raw:
        ids = [f"s{i}" for i in range(scenario.streams)]
    else:
        out = deployment.run_manage("streaming_bench", "--create", str(scenario.streams),
                                    layer=layer)  # fmt: skip
        ids = json.loads(out)
    received: list[list[tuple[int, float, float]]] = []
    tasks, ready = [], []
    idle = 3.0 if scenario.chunks <= 200 else 8.0  # how long a client waits for more
    for stream_id in ids:
        path = {"raw": f"raw/{stream_id}/", "raw-nohop": f"rawnohop/{stream_id}/"}.get(
            system, f"ws/streams/{stream_id}/"
        )
        for _ in range(scenario.clients):
            got: list[tuple[int, float, float]] = []
            received.append(got)
            event = asyncio.Event()
            ready.append(event)
            tasks.append(asyncio.create_task(
                _client(f"ws://127.0.0.1:{port}/{path}", got, event, raw, idle=idle,
                        expected=scenario.chunks)))  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)
    spec = {"system": system, "ids": ids, "chunks": scenario.chunks, "rate": scenario.rate}
    started = time.time()
    producer = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "manage.py"), "streaming_bench", "--produce", json.dumps(spec),
        env=deployment.env(layer), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await producer.communicate()
    if producer.returncode != 0:
        raise RuntimeError(f"producer failed: {err.decode()[-2000:]}")
    await asyncio.gather(*tasks)
    return _score(system, layer, scenario, received, started)


def _score(system: str, layer: str, scenario: Scenario,
           received: list[list[tuple[int, float, float]]], started: float) -> Result:  # fmt: skip
    expected = scenario.chunks * scenario.clients * scenario.streams
    lost = duplicated = reordered = delivered = 0
    latencies: list[float] = []
    # From the first push (the producer's own clock stamp), not from starting its process.
    started = min((sent for got in received for _, sent, _ in got), default=started)
    last = started
    for got in received:
        seqs = [seq for seq, _, _ in got]
        unique = set(seqs)
        delivered += len(unique)
        lost += scenario.chunks - len(unique & set(range(1, scenario.chunks + 1)))
        duplicated += len(seqs) - len(unique)
        reordered += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
        latencies.extend((now - sent) * 1000 for _, sent, now in got)
        if got:
            last = max(last, got[-1][2])
    seconds = max(last - started, 1e-9)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Result(system=system, layer=layer, scenario=scenario.name, expected=expected,
                  delivered=delivered, lost=lost, duplicated=duplicated, reordered=reordered,
                  seconds=round(seconds, 2), rate=round(delivered / seconds, 1),
                  p50_ms=round(quantiles[49], 2), p99_ms=round(quantiles[98], 2))  # fmt: skip


# -- the producer process -------------------------------------------------------------


async def produce(spec: dict[str, Any]) -> None:
    """Push ``chunks`` to every stream at ``rate`` per stream (0: as fast as possible)."""
    raw = spec["system"].startswith("raw")
    layer = get_channel_layer()
    assert layer is not None
    if not raw:
        from .manager import get_streaming_manager

        manager = get_streaming_manager()

    interval = 1 / spec["rate"] if spec["rate"] else 0
    start = time.perf_counter()
    count = len(spec["ids"])

    async def one(index: int, stream_id: str) -> None:
        # Paced streams start in staggered phases over one interval, as independent
        # conversations would, not in bursts of all streams at once.
        next_at = start + interval * index / count
        await asyncio.sleep(max(0, next_at - time.perf_counter()))
        for seq in range(1, spec["chunks"] + 1):
            if raw:
                text = json.dumps({"seq": seq, "t": time.time(), "text": f"tok{seq} "})
                await layer.group_send("rawbench." + stream_id, {"type": "raw.chunk", "text": text})
            else:
                chunk = TextDeltaChunk(
                    stream_id=stream_id, text_delta=f"tok{seq} ", metadata={"t": time.time()}
                )
                await manager.push_chunk(stream_id, chunk)
            if interval:
                next_at += interval
                await asyncio.sleep(max(0, next_at - time.perf_counter()))
        if not raw:
            await manager.close_stream(stream_id, "benchmark done")

    await asyncio.gather(*(one(index, stream_id) for index, stream_id in enumerate(spec["ids"])))


def result_row(result: Result) -> dict[str, Any]:
    return asdict(result)
