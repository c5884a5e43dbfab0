"""Benchmark rows of issue 14's coalescing window: a reply of text deltas at 50 tokens/s to
several WebSocket clients, without and with ``coalesce_ms``.

Each run gets a fresh Daphne worker and producer (``bench.Worker``); the producer pushes one
``text_delta`` per token at a steady pace (``tok<i> ``) and records when it pushed each, then
closes the stream. Each client acks as the JavaScript client does and records every chunk
frame it receives. Measured per run: chunk frames and their bytes per client, whether every
client got exactly the reply in order, the producer's and the Daphne worker's CPU, and the
latency of each token from its push to the receipt of the frame that carried it (p50/p99).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from .bench import Acker, Deployment, Worker, _all_ready, _connect, _subscribed
from .chunks import TextDeltaChunk

TOKEN = re.compile(r"tok(\d+) ")


@dataclass
class CoalesceRun:
    window_ms: float  # 0: off
    clients: int
    tokens: int
    rate: float  # tokens/s
    frames_per_client: float  # chunk frames
    bytes_per_client: float  # of those frames
    text_ok: bool  # every client got exactly the reply, in order
    p50_ms: float  # push to receipt, per token
    p99_ms: float
    max_ms: float
    producer_cpu_ms: float
    daphne_cpu_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reply(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


async def produce_tokens(spec: dict[str, Any]) -> dict[str, Any]:
    """(In the producer process.) Push ``tokens`` deltas to stream ``id`` at ``rate`` per
    second with a window of ``coalesce_ms``, then close it; when each was pushed, and this
    process's CPU seconds meanwhile."""
    from .manager import get_streaming_manager

    manager, stream_id = get_streaming_manager(), spec["id"]
    manager.coalescer.set_window(stream_id, spec["coalesce_ms"])
    interval, pushed = 1 / spec["rate"], []
    cpu, next_at = time.process_time(), time.perf_counter()
    for i in range(spec["tokens"]):
        pushed.append(time.time())
        await manager.push_chunk(stream_id, TextDeltaChunk(stream_id=stream_id,
                                                           text_delta=f"tok{i} "))  # fmt: skip
        next_at += interval
        await asyncio.sleep(max(0, next_at - time.perf_counter()))
    await manager.close_stream(stream_id, "benchmark done")
    return {"cpu_s": time.process_time() - cpu, "pushed": pushed}


async def _read(url: str, frames: list[tuple[float, str, int]], ready: asyncio.Event,
                gate: asyncio.Semaphore) -> None:  # fmt: skip
    """One client: (receipt time, text, frame bytes) of every chunk frame until ``closed``."""
    from websockets.exceptions import ConnectionClosed

    async with gate:
        ws = await _connect(url)
    try:
        await _subscribed(ws, False)
        ready.set()
        acker = Acker(ws)
        async for text in ws:
            now = time.time()
            frame = json.loads(text)
            if frame["type"] == "chunk":
                frames.append((now, frame["chunk"]["text_delta"], len(text.encode())))
                await acker.read(frame["seq"], len(text))
            elif frame["type"] == "closed":
                return
    except ConnectionClosed:
        return
    finally:
        await ws.close()


async def run(deployment: Deployment, layer: str, window_ms: float, clients: int, tokens: int,
              rate: float, drain: float) -> CoalesceRun:  # fmt: skip
    async with Worker(deployment, "streaming_app", layer) as worker:
        (stream_id,) = await worker.create(1)
        gate = asyncio.Semaphore(clients)
        received: list[list[tuple[float, str, int]]] = [[] for _ in range(clients)]
        ready = [asyncio.Event() for _ in range(clients)]
        tasks = [asyncio.create_task(_read(worker.url(stream_id), got, event, gate))
                 for got, event in zip(received, ready, strict=True)]  # fmt: skip
        try:
            await _all_ready(tasks, ready, within=60)
            await worker.quiet()
            cpu = worker.cpu()
            spec = {"op": "tokens", "id": stream_id, "tokens": tokens, "rate": rate,
                    "coalesce_ms": window_ms}  # fmt: skip
            produced = await worker.request(spec, within=60 + 3 * tokens / rate)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await asyncio.gather(*tasks)
            cpu = worker.cpu() - cpu
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return score(window_ms, rate, produced, received, cpu)


def score(window_ms: float, rate: float, produced: dict[str, Any],
          received: list[list[tuple[float, str, int]]], daphne_cpu: float
          ) -> CoalesceRun:  # fmt: skip
    pushed: list[float] = produced["pushed"]
    expected = reply(len(pushed))
    latencies = [
        (now - pushed[int(index)]) * 1000
        for got in received
        for now, text, _ in got
        for index in TOKEN.findall(text)
    ]
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    clients = len(received)
    return CoalesceRun(
        window_ms=window_ms, clients=clients, tokens=len(pushed), rate=rate,
        frames_per_client=round(sum(len(got) for got in received) / clients, 1),
        bytes_per_client=round(sum(size for got in received for *_, size in got) / clients),
        text_ok=all("".join(text for _, text, _ in got) == expected for got in received),
        p50_ms=round(cuts[49], 2), p99_ms=round(cuts[98], 2),
        max_ms=round(max(latencies, default=0.0), 2),
        producer_cpu_ms=round(produced["cpu_s"] * 1000, 1),
        daphne_cpu_ms=round(daphne_cpu * 1000, 1),
    )  # fmt: skip


async def compare(deployment: Deployment, layer: str, quick: bool, drain: float
                  ) -> list[CoalesceRun]:  # fmt: skip
    """The same reply without a window, with 20 ms (what agent UIs use) and with 100 ms."""
    tokens, clients = (50, 3) if quick else (400, 10)
    return [await run(deployment, layer, window, clients, tokens, 50.0, drain)
            for window in (0, 20, 100)]  # fmt: skip


def render(runs: list[dict[str, Any]]) -> list[str]:
    """The rows (``CoalesceRun.to_dict()``) as printed lines."""
    first = runs[0]
    lines = ["", f"Coalescing text deltas ({first['tokens']} tokens at {first['rate']:g}/s to "
             f"{first['clients']} clients; latency from push to receipt, per token)",
             f"  {'window':>8}{'frames/client':>15}{'bytes/client':>14}{'p50 ms':>9}"
             f"{'p99 ms':>9}{'max ms':>9}{'producer CPU':>14}{'Daphne CPU':>12}"
             "  whole"]  # fmt: skip
    for r in runs:
        window = f"{r['window_ms']:g} ms" if r["window_ms"] else "off"
        lines.append(f"  {window:>8}{r['frames_per_client']:>15,}{r['bytes_per_client']:>14,}"
                     f"{r['p50_ms']:>9}{r['p99_ms']:>9}{r['max_ms']:>9}"
                     f"{r['producer_cpu_ms']:>11} ms{r['daphne_cpu_ms']:>9} ms  "
                     f"{'yes' if r['text_ok'] else 'NO'}")  # fmt: skip
    for r in runs[1:]:
        p50, p99 = r["p50_ms"] - first["p50_ms"], r["p99_ms"] - first["p99_ms"]
        lines.append(
            f"  {r['window_ms']:g} ms against off: frames "
            f"{_ratio(r['frames_per_client'], first['frames_per_client'])}, bytes "
            f"{_ratio(r['bytes_per_client'], first['bytes_per_client'])}, Daphne CPU "
            f"{_ratio(r['daphne_cpu_ms'], first['daphne_cpu_ms'])}, producer CPU "
            f"{_ratio(r['producer_cpu_ms'], first['producer_cpu_ms'])}; latency added "
            f"p50 {p50:+.2f} ms, p99 {p99:+.2f} ms"
        )
    return lines


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"
