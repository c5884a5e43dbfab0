"""The benchmark behind ``manage.py streaming_bench``: streaming_app against raw Channels on the
same layer, in the same run, through the same Daphne setup.

- ``in_process``: push throughput of ``push_chunk`` against raw ``group_send`` of the same
  payload to the same group members, on the configured layer.
- end to end (:func:`run_worker`): a fresh Daphne worker per measurement, a producer process
  and real WebSocket clients; delivered chunks/s, p50/p99 latency (producer timestamp to client
  receipt), lost, duplicated and reordered deliveries per client, the worker's CPU per
  delivery and the producer's CPU per push. On the primary layer also the scaling table
  (streams x clients per stream at 10 chunks/s), WebSocket connects/s and the worker's CPU with
  idle clients connected.

Raw Channels is sent the very frames streaming_app writes (the chunk's seed fields, the same
``chunk`` frame, a ``closed`` frame as its end), built as a plain dict by its producer: both
sides carry the same bytes to the same clients.

A chunk counts as lost only once its stream has ended (the producer closed it, or for raw
Channels sent its ``closed`` frame) and then nothing has arrived for the drain timeout: never while
the producer is starting or pushing, nor while a backlog is still draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from channels.layers import get_channel_layer

from .bench_procs import Children, cpu_seconds
from .chunks import TextDeltaChunk, encode_chunk, now_iso
from .layers import CHUNK, group_name
from .manager import StreamingManager

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "redis": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
PRIMARY_LAYER = "pubsub"  # the default layer: scaling, connects and idle CPU run on it
# Channels' plain consumer, the same without its per-message database hop (the honest
# baseline: the best a hand-written consumer does), and streaming_app.
SYSTEMS = ("raw", "raw-nohop", "streaming_app")
BASELINE = "raw-nohop"
SCALING_SYSTEMS = (BASELINE, "streaming_app")
RAW_PATHS = {"raw": "raw", "raw-nohop": "rawnohop", "raw-batch": "rawbatch"}
ACK_BYTES = 256 * 1024  # a quarter of the default window: when a client acks at the latest
CONNECT_CONCURRENCY = 100  # handshakes in flight at once (below Daphne's backlog of 1024)


@dataclass
class Scenario:
    name: str
    streams: int
    clients: int
    chunks: int
    rate: float  # chunks/s per stream; 0 = as fast as possible

    @property
    def phases(self) -> str:
        """How the streams' pushes line up: paced streams start at staggered offsets."""
        return "flat out" if not self.rate else "staggered"


@dataclass
class Plan:
    """What one run measures: the full benchmark, or the quick one the tests run."""

    scenarios: list[Scenario]
    scaling: list[Scenario]
    idle_clients: int
    idle_streams: int
    idle_window: float  # seconds of the worker's CPU read with the idle clients connected
    drain: float  # after the streams ended, clients give up once nothing arrived for this long
    # Each measurement on a fresh Daphne worker and producer (the figures), or all of a system's
    # measurements on a layer on one (the quick run: what the tests check is the plumbing).
    fresh_workers: bool = True


# (streams, clients per stream): clients per stream 1/10/50/200 at 10 streams, and streams
# 10/100/500 at 1 client each.
SCALING_CELLS = ((10, 1), (10, 10), (10, 50), (10, 200), (100, 1), (500, 1))
QUICK_CELLS = ((2, 1), (2, 4), (4, 1))


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            scenarios=[Scenario("a", 1, 3, 200, 0), Scenario("b", 5, 2, 20, 20)],
            scaling=[scaling_cell(streams, clients, 10) for streams, clients in QUICK_CELLS],
            idle_clients=20,
            idle_streams=4,
            idle_window=1.0,
            drain=3.0,
            fresh_workers=False,
        )
    return Plan(
        scenarios=[Scenario("a", 1, 10, 2000, 0), Scenario("b", 50, 2, 200, 20)],
        scaling=[scaling_cell(streams, clients, 50) for streams, clients in SCALING_CELLS],
        idle_clients=2000,
        idle_streams=100,
        idle_window=10.0,
        drain=10.0,
    )


def scaling_cell(streams: int, clients: int, chunks: int) -> Scenario:
    return Scenario(f"{streams}x{clients}", streams, clients, chunks, 10)


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
    streams: int = 0
    clients_per_stream: int = 0
    phases: str = ""
    daphne_cpu_s: float = 0.0  # the Daphne worker's CPU from the first push to the drain
    daphne_cpu_us_per_delivery: float = 0.0
    producer_cpu_s: float = 0.0  # the producer's CPU while pushing (and closing)
    producer_cpu_us_per_push: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Connects:
    """WebSocket handshakes per second until the client can receive (streaming_app: its
    ``subscribed`` frame), ``concurrency`` at a time."""

    system: str
    layer: str
    database: str
    clients: int
    concurrency: int
    seconds: float
    per_second: float


@dataclass
class Idle:
    """CPU of the Daphne worker with ``clients`` connected and nothing pushed."""

    system: str
    layer: str
    clients: int
    window_s: float
    cpu_percent: float


@dataclass
class WorkerResults:
    end_to_end: list[Result] = field(default_factory=list)
    scaling: list[Result] = field(default_factory=list)
    connects: list[Connects] = field(default_factory=list)
    idle: list[Idle] = field(default_factory=list)


# -- in process -----------------------------------------------------------------------


async def in_process(manager: StreamingManager, chunks: int, members: int) -> dict[str, float]:
    """Chunks/s (and CPU per push, this process's, drains included) of push_chunk and of
    raw group_send to ``members`` drained channels."""
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
                async with asyncio.timeout(0.2):
                    await layer.receive(channel)
            except TimeoutError:
                continue

    async def timed(push: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
        stop = asyncio.Event()
        drains = [asyncio.create_task(drain(c, stop)) for c in channels]
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(chunks):
            await push(i)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        stop.set()
        await asyncio.gather(*drains)
        return chunks / elapsed, cpu / chunks * 1e6

    async def raw(i: int) -> None:
        text = encode_chunk(TextDeltaChunk(stream_id=stream_id, text_delta=f"tok{i} "),
                            stream_id=stream_id, max_bytes=65536)  # fmt: skip
        await layer.group_send(group, {"type": CHUNK, "seq": i + 1, "chunk": text})

    async def managed(i: int) -> None:
        await manager.push_chunk(
            stream_id, TextDeltaChunk(stream_id=stream_id, text_delta=f"tok{i} ")
        )

    raw_rate, raw_cpu = await timed(raw)
    manager_rate, manager_cpu = await timed(managed)
    await manager.close_stream(stream_id, "benchmark done")
    return {
        "raw": raw_rate,
        "streaming_app": manager_rate,
        "ratio": manager_rate / raw_rate,
        "raw_cpu_us_per_push": round(raw_cpu, 1),
        "streaming_app_cpu_us_per_push": round(manager_cpu, 1),
    }


# -- the deployment -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """A private redis-server (unless given) and a migrated database (by default a temporary
    SQLite file), shared by the Daphne workers and producers started from it. Every process
    is started through ``children``, whose owner stops them all."""

    def __init__(self, children: Children, redis_url: str | None, database_url: str | None
                 ) -> None:  # fmt: skip
        self.children = children
        self.tmp = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
        if redis_url is None:
            port = free_port()
            children.start(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--bind", "127.0.0.1", "--dir", str(self.tmp)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            redis_url = f"redis://127.0.0.1:{port}/0"
            _wait_port(port)
        self.redis_url = redis_url
        self.database_url = database_url or f"sqlite:///{self.tmp / 'bench.sqlite3'}"
        self.run_manage("migrate", "-v0", layer=PRIMARY_LAYER)

    @property
    def database(self) -> str:
        """The database's kind, as the report names it."""
        return self.database_url.split(":", 1)[0]

    def env(self, layer: str) -> dict[str, str]:
        settings = {"CAN_SUBSCRIBE": "streaming_app.bench.anyone",
                    "MAX_CONCURRENT_STREAMS": 100_000, "MAX_CLIENTS_PER_STREAM": 100_000,
                    "HISTORY_MAX_CHUNKS": 5000}  # fmt: skip
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CHANNEL_LAYER_BACKEND": LAYERS[layer],
            "STREAMING_APP_JSON": json.dumps(settings),
            "STREAMING_LOG": "WARNING",
            "DJANGO_DEBUG": "0",
            "PYTHONUNBUFFERED": "1",
        }

    def run_manage(self, *args: str, layer: str) -> str:
        log = self.tmp / "manage.log"
        with open(log, "wb") as err:
            process = self.children.start(
                [sys.executable, str(ROOT / "manage.py"), *args], env=self.env(layer),
                cwd=ROOT, stdout=err, stderr=err,
            )  # fmt: skip
            try:
                returncode = process.wait(300)
            finally:
                self.children.stop(process)
        if returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"manage.py {' '.join(args[:2])} failed: {tail}")
        return log.read_text()

    def log(self, name: str) -> IO[bytes]:
        return open(self.tmp / name, "wb")  # the caller closes it

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def anyone(user: Any, session_key: str | None, stream: Any) -> bool:
    """The benchmark's clients have no session: let them subscribe."""
    return True


def _wait_port(port: int, timeout: float = 30, process: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Worker:
    """One Daphne worker serving ``system`` on ``layer`` (listening as the README runs it,
    ``backlog=1024``), and one producer process that creates streams and pushes into them on
    request (JSON lines on its stdin and stdout)."""

    def __init__(self, deployment: Deployment, system: str, layer: str) -> None:
        self.deployment = deployment
        self.system = system
        self.layer = layer
        self.raw = system.startswith("raw")
        self.port = free_port()
        self.tag = f"{system}-{layer}"
        self.daphne: subprocess.Popen[bytes] | None = None
        self.producer: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.ReadTransport | None = None

    async def __aenter__(self) -> Worker:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _start(self) -> None:
        children, env = self.deployment.children, self.deployment.env(self.layer)
        app = "streaming_app.bench_raw:application" if self.raw else "project.asgi:application"
        with self.deployment.log(f"daphne-{self.tag}.log") as log:
            self.daphne = children.start(
                [sys.executable, "-m", "daphne", "-e",
                 f"tcp:port={self.port}:interface=127.0.0.1:backlog=1024", app],
                env=env, cwd=ROOT, stdout=log, stderr=log,
            )  # fmt: skip
        with self.deployment.log(f"producer-{self.tag}.log") as log:
            self.producer = children.start(
                [sys.executable, str(ROOT / "manage.py"), "streaming_bench", "--agent",
                 self.system],
                env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        self.replies = asyncio.StreamReader(limit=2**24)
        protocol = asyncio.StreamReaderProtocol(self.replies)
        self.transport, _ = await loop.connect_read_pipe(lambda: protocol, self.producer.stdout)
        await asyncio.to_thread(_wait_port, self.port, 30, self.daphne)
        await self.request({"op": "ping"}, within=60)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self.transport is not None:
                self.transport.close()
        finally:
            try:
                if self.producer is not None:
                    self.deployment.children.stop(self.producer)
            finally:
                if self.daphne is not None:
                    self.deployment.children.stop(self.daphne)

    async def request(self, spec: dict[str, Any], within: float) -> dict[str, Any]:
        """Send the producer one request; its answer. Raises RuntimeError if it failed."""
        assert self.producer is not None and self.producer.stdin is not None
        try:
            self.producer.stdin.write((json.dumps(spec) + "\n").encode())
            self.producer.stdin.flush()
        except BrokenPipeError:
            line = b""
        else:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a result that
            # came with a cancel (Ctrl-C's), and the benchmark would go on.
            async with asyncio.timeout(within):
                line = await self.replies.readline()
        if not line:
            log = (self.deployment.tmp / f"producer-{self.tag}.log").read_text(errors="replace")
            raise RuntimeError(f"the producer exited: {log[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the producer failed: {reply['error']}")
        return reply

    async def create(self, count: int) -> list[str]:
        reply = await self.request({"op": "create", "count": count}, within=60 + count / 5)
        return list(reply["ids"])

    async def close(self, ids: list[str]) -> None:
        """Close streams that nothing pushed into (the connects row's): left open, they would
        be closed for inactivity by the sweeper of whatever runs five minutes later."""
        await self.request({"op": "close", "ids": ids}, within=60 + len(ids) / 5)

    def url(self, stream_id: str) -> str:
        # streaming_app's clients ack what they read, as its JavaScript client does.
        path = (f"{RAW_PATHS[self.system]}/{stream_id}/" if self.raw
                else f"ws/streams/{stream_id}/?ack=1")  # fmt: skip
        return f"ws://127.0.0.1:{self.port}/{path}"

    def cpu(self) -> float:
        assert self.daphne is not None
        return cpu_seconds(self.daphne.pid)

    async def quiet(self, limit: float = 10.0) -> None:
        """Wait (up to ``limit`` s) until the worker is done with the last run's aftermath
        (disconnects, releases): under 5% of a core over a quarter of a second."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = self.cpu()
            await asyncio.sleep(0.25)
            if self.cpu() - before < 0.0125:
                return


# -- WebSocket clients ----------------------------------------------------------------


async def _connect(url: str) -> Any:
    import websockets

    # No keepalive pings (a browser sends none): the worker's own cost is what is measured.
    headers = {"Origin": "http://127.0.0.1"}
    return await websockets.connect(url, additional_headers=headers, max_queue=None,
                                    ping_interval=None, open_timeout=60)  # fmt: skip


async def _subscribed(ws: Any, raw: bool) -> None:
    """Wait until the socket receives: raw Channels joined its group before accepting;
    streaming_app says ``subscribed``."""
    if not raw:
        frame = json.loads(await ws.recv())
        if frame.get("type") != "subscribed":
            raise RuntimeError(f"not subscribed: {frame}")


class Acker:
    """A benchmark client's acks, as the JavaScript client sends them: after 64 chunks or a
    quarter of the window's bytes read since the last one."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.acked = self.unacked_bytes = 0

    async def read(self, seq: int, size: int) -> None:
        self.unacked_bytes += size
        if seq - self.acked >= 64 or self.unacked_bytes >= ACK_BYTES:
            from websockets.exceptions import ConnectionClosed

            self.acked, self.unacked_bytes = seq, 0
            # The server may have written the rest and closed meanwhile: an ack that finds
            # the socket closed is dropped, as a browser drops it, and reading goes on (what
            # arrived before the close is still to be read).
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(json.dumps({"type": "ack", "seq": seq}))


async def _follow(url: str, raw: bool, received: list[tuple[int, float, float]],
                  ready: asyncio.Event, gate: asyncio.Semaphore) -> None:  # fmt: skip
    """One client: every chunk it receives (seq, producer's stamp, receipt) until its stream
    ends (``closed`` frame; raw Channels: the producer's, as the last frame) or it is cancelled."""
    from websockets.exceptions import ConnectionClosed

    async with gate:
        ws = await _connect(url)
    try:
        await _subscribed(ws, raw)
        ready.set()
        acker = Acker(ws)
        async for text in ws:
            now = time.time()
            frame = json.loads(text)
            # The same frames from both; raw Channels may batch them (bench_batch).
            for item in frame if isinstance(frame, list) else [frame]:
                if item["type"] == "chunk":
                    received.append((item["seq"], item["chunk"]["metadata"]["t"], now))
                    if not raw:
                        await acker.read(item["seq"], len(text))
                elif item["type"] == "closed":
                    return
    except ConnectionClosed:
        return
    finally:
        await ws.close()


async def run_scenario(worker: Worker, scenario: Scenario, drain: float) -> Result:
    """Connect every client, have the producer push, wait for the streams to end and then at
    most ``drain`` seconds for the clients still missing chunks; score what they received."""
    ids = await worker.create(scenario.streams)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    received: list[list[tuple[int, float, float]]] = []
    tasks, ready = [], []
    for stream_id in ids:
        for _ in range(scenario.clients):
            got: list[tuple[int, float, float]] = []
            received.append(got)
            event = asyncio.Event()
            ready.append(event)
            tasks.append(asyncio.create_task(_follow(worker.url(stream_id), worker.raw, got,
                                                     event, gate)))  # fmt: skip
    try:
        await _all_ready(tasks, ready, within=120 + len(tasks) / 20)
        await worker.quiet()
        cpu = worker.cpu()
        spec = {"op": "produce", "ids": ids, "chunks": scenario.chunks, "rate": scenario.rate}
        pace = scenario.chunks / scenario.rate if scenario.rate else 0
        produced = await worker.request(spec, within=120 + 3 * pace)
        pending = await _drain(tasks, received, drain)
        cpu = worker.cpu() - cpu
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, Exception)]
    if failures:
        raise RuntimeError(f"{len(failures)} client(s) failed: {failures[0]!r}")
    result = _score(worker.system, worker.layer, scenario, received)
    result.daphne_cpu_s = round(cpu, 2)
    result.daphne_cpu_us_per_delivery = round(cpu / max(result.delivered, 1) * 1e6, 1)
    result.producer_cpu_s = round(produced["cpu_s"], 3)
    pushes = scenario.streams * scenario.chunks
    result.producer_cpu_us_per_push = round(produced["cpu_s"] / pushes * 1e6, 1)
    if pending:
        result.notes.append(f"{len(pending)} client(s) gave up: nothing arrived for {drain:g} s "
                            "after the end")  # fmt: skip
    await worker.quiet()
    return result


async def _drain(tasks: list[asyncio.Task[None]], received: list[list[Any]], drain: float,
                 limit: float = 300.0) -> set[asyncio.Task[None]]:  # fmt: skip
    """After the streams ended: wait for the clients while chunks still arrive (a backlog
    draining is late, not lost), until none arrived for ``drain`` seconds or ``limit`` passed;
    the clients still waiting then (whatever they miss is lost)."""
    deadline = time.monotonic() + limit
    pending, count = set(tasks), -1
    while pending and time.monotonic() < deadline:
        arrived = sum(len(got) for got in received)
        if arrived == count:
            break
        count = arrived
        _, pending = await asyncio.wait(pending, timeout=drain)
    return pending


async def _all_ready(tasks: list[asyncio.Task[None]], ready: list[asyncio.Event], within: float
                     ) -> None:  # fmt: skip
    """Wait until every client is ready; raise at once if one failed to connect."""
    waiting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in ready)))
    futures: list[asyncio.Future[Any]] = [waiting, *tasks]
    try:
        done, _ = await asyncio.wait(futures, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            return
        for task in done:
            task.result()  # a client that ended before it was ready: its error
            raise RuntimeError("a client ended before it subscribed")
        raise TimeoutError(f"clients not connected within {within:.0f} s")
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


def _score(system: str, layer: str, scenario: Scenario,
           received: list[list[tuple[int, float, float]]]) -> Result:  # fmt: skip
    expected = scenario.chunks * scenario.clients * scenario.streams
    lost = duplicated = reordered = delivered = 0
    latencies: list[float] = []
    # From the first push (the producer's own clock stamp), not from starting its process.
    started = min((sent for got in received for _, sent, _ in got), default=0.0)
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
                  p50_ms=round(quantiles[49], 2), p99_ms=round(quantiles[98], 2),
                  streams=scenario.streams, clients_per_stream=scenario.clients,
                  phases=scenario.phases)  # fmt: skip


async def connects_and_idle(worker: Worker, clients: int, streams: int, window: float
                            ) -> tuple[Connects, Idle]:  # fmt: skip
    """Open ``clients`` sockets over ``streams`` streams, timed until each can receive; then
    the worker's CPU over ``window`` seconds with all of them connected and idle."""
    ids = await worker.create(streams)
    urls = [worker.url(ids[i % streams]) for i in range(clients)]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    sockets: list[Any] = []

    async def hold(url: str, ready: asyncio.Event, release: asyncio.Event) -> None:
        async with gate:
            ws = await _connect(url)
            sockets.append(ws)
            await _subscribed(ws, worker.raw)
        ready.set()
        await release.wait()
        await ws.close()

    # Warm up (imports, first database and Redis connections) before timing.
    warm, warm_done = [asyncio.Event() for _ in range(min(5, clients))], asyncio.Event()
    events, release = [asyncio.Event() for _ in urls], asyncio.Event()
    tasks = [asyncio.create_task(hold(urls[0], event, warm_done)) for event in warm]
    try:
        await _all_ready(tasks, warm, within=60)
        warm_done.set()
        await asyncio.gather(*tasks)
        await worker.quiet()
        started = time.perf_counter()
        tasks = [asyncio.create_task(hold(url, event, release))
                 for url, event in zip(urls, events, strict=True)]  # fmt: skip
        await _all_ready(tasks, events, within=120 + clients / 10)
        seconds = time.perf_counter() - started
        await worker.quiet()
        cpu = worker.cpu()
        await asyncio.sleep(window)
        cpu = worker.cpu() - cpu
        release.set()
        async with asyncio.timeout(120):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    await worker.close(ids)
    await worker.quiet()
    connects = Connects(system=worker.system, layer=worker.layer,
                        database=worker.deployment.database, clients=clients,
                        concurrency=CONNECT_CONCURRENCY, seconds=round(seconds, 2),
                        per_second=round(clients / seconds, 1))  # fmt: skip
    idle = Idle(system=worker.system, layer=worker.layer, clients=clients, window_s=window,
                cpu_percent=round(cpu / window * 100, 2))  # fmt: skip
    return connects, idle


async def run_worker(deployment: Deployment, system: str, layer: str, plan: Plan,
                     primary: bool) -> WorkerResults:  # fmt: skip
    """Everything one system measures on one layer, each measurement on a fresh Daphne worker
    and producer (nothing carries over from the one before) unless the plan shares one."""
    out = WorkerResults()

    async def scenario(worker: Worker, scenario: Scenario, into: list[Result]) -> None:
        into.append(await run_scenario(worker, scenario, plan.drain))

    async def connects(worker: Worker) -> None:
        row, idle = await connects_and_idle(
            worker, plan.idle_clients, plan.idle_streams, plan.idle_window
        )
        out.connects.append(row)
        out.idle.append(idle)

    steps: list[Callable[[Worker], Awaitable[None]]] = [
        functools.partial(scenario, scenario=s, into=out.end_to_end) for s in plan.scenarios
    ]
    if primary and system in SCALING_SYSTEMS:
        steps += [functools.partial(scenario, scenario=c, into=out.scaling) for c in plan.scaling]
    if primary:
        steps.append(connects)
    for group in [[step] for step in steps] if plan.fresh_workers else [steps]:
        async with Worker(deployment, system, layer) as worker:
            for step in group:
                await step(worker)
    return out


# -- the producer process -------------------------------------------------------------


async def serve_producer(system: str) -> None:
    """The producer's loop: one JSON request per line on stdin (``create``, ``close``,
    ``produce``, ``tokens``, ``ping``), one JSON answer per line on stdout, until stdin ends."""
    loop = asyncio.get_running_loop()
    requests = asyncio.StreamReader(limit=2**24)
    protocol = asyncio.StreamReaderProtocol(requests)
    await loop.connect_read_pipe(lambda: protocol, sys.stdin)
    while line := await requests.readline():
        spec = json.loads(line)
        try:
            if spec["op"] == "create":
                reply: dict[str, Any] = {"ids": await create(system, spec["count"])}
            elif spec["op"] == "close":
                reply = {"closed": await close(system, spec["ids"])}
            elif spec["op"] == "produce":
                reply = await produce({**spec, "system": system})
            elif spec["op"] == "tokens":  # the coalescing rows (bench_coalesce)
                from .bench_coalesce import produce_tokens

                reply = await produce_tokens(spec)
            else:
                reply = {"ok": True}
        except Exception as exc:  # reported to the benchmark, which stops
            reply = {"error": repr(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


async def create(system: str, count: int) -> list[str]:
    """``count`` new stream ids: streaming_app streams, or fresh group names for raw."""
    if system.startswith("raw"):
        prefix = uuid.uuid4().hex[:8]
        return [f"{prefix}-{i}" for i in range(count)]
    from .manager import get_streaming_manager

    manager = get_streaming_manager()
    return [await manager.create_stream() for _ in range(count)]


async def close(system: str, ids: list[str]) -> int:
    """Close streaming_app streams (raw groups need nothing); how many were closed."""
    if system.startswith("raw"):
        return 0
    from .manager import get_streaming_manager

    manager = get_streaming_manager()
    for stream_id in ids:
        await manager.close_stream(stream_id, "benchmark done")
    return len(ids)


async def produce(spec: dict[str, Any]) -> dict[str, Any]:
    """Push ``chunks`` to every stream at ``rate`` per stream (0: as fast as possible), then
    end each stream (close it; raw: a ``closed`` frame); this process's CPU seconds meanwhile."""
    raw = spec["system"].startswith("raw")
    layer = get_channel_layer()
    assert layer is not None
    if not raw:
        from .manager import get_streaming_manager

        manager = get_streaming_manager()

    interval = 1 / spec["rate"] if spec["rate"] else 0
    count = len(spec["ids"])
    padding = "x" * spec.get("pad", 0)  # bigger chunks (the slow-client run)
    cpu, start = time.process_time(), time.perf_counter()

    async def one(index: int, stream_id: str) -> None:
        # Paced streams start in staggered phases over one interval, as independent
        # conversations would, not in bursts of all streams at once.
        next_at = start + interval * index / count
        await asyncio.sleep(max(0, next_at - time.perf_counter()))
        for seq in range(1, spec["chunks"] + 1):
            if raw:  # the same frame streaming_app writes, built as plainly as it can be
                fields = {
                    "type": "text_delta",
                    "stream_id": stream_id,
                    "gmi_instance_id": "",
                    "persona_id": "",
                    "is_final": False,
                    "timestamp": now_iso(),
                    "metadata": {"t": time.time()},
                    "text_delta": f"tok{seq} " + padding,
                }
                text = json.dumps(
                    {"type": "chunk", "seq": seq, "chunk": fields},
                    separators=(",", ":"),
                    ensure_ascii=False,
                )
                await layer.group_send("rawbench." + stream_id, {"type": "raw.chunk", "text": text})
            else:
                typed = TextDeltaChunk(stream_id=stream_id, text_delta=f"tok{seq} " + padding,
                                       metadata={"t": time.time()})  # fmt: skip
                await manager.push_chunk(stream_id, typed)
            if interval:
                next_at += interval
                await asyncio.sleep(max(0, next_at - time.perf_counter()))
        if raw:
            end = json.dumps({"type": "closed", "reason": "benchmark done",
                              "last_seq": spec["chunks"]}, separators=(",", ":"))  # fmt: skip
            await layer.group_send("rawbench." + stream_id, {"type": "raw.chunk", "text": end})
        else:
            await manager.close_stream(stream_id, "benchmark done")

    await asyncio.gather(*(one(index, stream_id) for index, stream_id in enumerate(spec["ids"])))
    return {"cpu_s": time.process_time() - cpu, "seconds": time.perf_counter() - start}


def result_row(result: Any) -> dict[str, Any]:
    return asdict(result)
