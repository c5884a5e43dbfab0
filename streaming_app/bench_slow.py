"""Benchmark rows of issue 15: a fast client's latency beside clients that stop reading.

One stream on a fresh Daphne worker, one client that reads (and acks, as the JavaScript client
does), and ``slow`` WebSocket clients that subscribe and then read nothing (their receive
buffers are small, so the worker's writes to them back up). The producer pushes chunks of
16 KB at a steady pace. Measured: the fast client's p50/p99 latency, what it lost, and how much
the worker's memory grew, with and without the slow clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench import Deployment, Scenario, Worker, _follow, _score

CHUNK_PAD = 16 * 1024
MIB = 1024 * 1024


@dataclass
class SlowRun:
    slow_clients: int
    chunks: int
    rate: float
    delivered: int
    lost: int
    p50_ms: float
    p99_ms: float
    rss_growth_mib: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _stalled(url: str) -> Any:
    """A client that subscribes and then reads nothing."""
    import websockets

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    ws = await websockets.connect(url.replace("?ack=1", ""), sock=sock, max_queue=1,
                                  additional_headers={"Origin": "http://127.0.0.1"},
                                  ping_interval=None, open_timeout=60)  # fmt: skip
    if json.loads(await ws.recv()).get("type") != "subscribed":
        raise RuntimeError("a slow client was not subscribed")
    return ws


async def run(deployment: Deployment, layer: str, slow: int, chunks: int, rate: float,
              drain: float) -> SlowRun:  # fmt: skip
    async with Worker(deployment, "streaming_app", layer) as worker:
        assert worker.daphne is not None
        (stream_id,) = await worker.create(1)
        url = worker.url(stream_id)
        got: list[tuple[int, float, float]] = []
        ready = asyncio.Event()
        fast = asyncio.create_task(_follow(url, False, got, ready, asyncio.Semaphore(1)))
        stalled = [await _stalled(url) for _ in range(slow)]
        try:
            async with asyncio.timeout(60):
                await ready.wait()
            await worker.quiet()
            before = peak = rss(worker.daphne.pid)
            spec = {"op": "produce", "ids": [stream_id], "chunks": chunks, "rate": rate,
                    "pad": CHUNK_PAD}  # fmt: skip
            producing = asyncio.create_task(worker.request(spec, within=120 + 3 * chunks / rate))
            while not producing.done():
                peak = max(peak, rss(worker.daphne.pid))
                await asyncio.sleep(0.05)
            await producing
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await asyncio.shield(fast)
            peak = max(peak, rss(worker.daphne.pid))
        finally:
            fast.cancel()
            await asyncio.gather(fast, return_exceptions=True)
            for ws in stalled:
                ws.transport.abort()  # gone without reading: what a dead mobile link does
    result = _score("streaming_app", layer, Scenario(f"slow x{slow}", 1, 1, chunks, rate), [got])
    return SlowRun(slow, chunks, rate, result.delivered, result.lost, result.p50_ms,
                   result.p99_ms, round((peak - before) / MIB, 1))  # fmt: skip


async def compare(deployment: Deployment, layer: str, quick: bool, drain: float
                  ) -> list[SlowRun]:  # fmt: skip
    """The same run without and with slow clients."""
    chunks, rate, slow = (60, 30.0, 2) if quick else (500, 50.0, 4)
    return [await run(deployment, layer, n, chunks, rate, drain) for n in (0, slow)]


def goal(runs: list[dict[str, Any]], layer: str) -> dict[str, Any]:
    """The fast client's p99 beside the slow clients against its p99 alone (<= 1.5x)."""
    alone, beside = runs
    value = round(beside["p99_ms"] / alone["p99_ms"], 2) if alone["p99_ms"] else None
    return {
        "goal": "fast client p99 beside slow ones", "layer": layer,
        "where": f"{beside['slow_clients']} slow vs none", "streaming_app": beside["p99_ms"],
        "baseline": alone["p99_ms"], "ratio": value, "target": "<= 1.5",
        "met": value is not None and value <= 1.5,
    }  # fmt: skip


def render(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"Slow clients (1 stream, 16 KB chunks at {runs[0]['rate']:g}/s; the fast client "
             "acks, the slow ones read nothing)"]  # fmt: skip
    for r in runs:
        lines.append(f"  {r['slow_clients']} slow: fast client delivered {r['delivered']} of "
                     f"{r['chunks']}, lost {r['lost']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} "
                     f"ms; worker RSS +{r['rss_growth_mib']} MiB")  # fmt: skip
    return lines
