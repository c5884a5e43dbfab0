"""Many processes on Redis and one database: the guarantees hold across all of them.

Real parts only: this session's own redis-server (pytest-redis), Daphne subprocesses,
``manage.py shell`` processes as producers and operators, ``websockets`` clients. The database
is a migrated SQLite file, or a fresh PostgreSQL database when the suite runs on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import websockets

from streaming_app.protocol import CloseCode

from .conftest import eventually
from .servers import (
    SETTINGS,
    DaphneServer,
    RedisServer,
    base_env,
    create_postgres_database,
    drop_postgres_database,
    manager_call,
    read_frames,
    run_python,
    server_kinds,
    start_python,
    with_settings,
)


@pytest.fixture
def workers(
    env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[list[DaphneServer]]:
    """Two workers of one ASGI server (Daphne unless the test is parametrized)."""
    kind = getattr(request, "param", "daphne")
    servers = [DaphneServer(env, log=tmp_path / f"{kind}-{i}.log", kind=kind).start()
               for i in range(2)]  # fmt: skip
    yield servers
    for server in servers:
        server.stop()


PUSH = """
out = []
for i in range({first}, {last} + 1):
    try:
        chunk = TextDeltaChunk(stream_id={sid!r}, text_delta=str(i))
        out.append(await m.push_chunk({sid!r}, chunk))
    except StreamError as exc:
        out.append([str(exc.code), exc.details])
        break
"""


async def subscribe(stack: AsyncExitStack, server: DaphneServer, stream_id: str) -> Any:
    ws = await stack.enter_async_context(
        websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Origin": server.http_url},
        )
    )
    assert json.loads(await ws.recv())["type"] == "subscribed"
    return ws


def chunk_seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "chunk"]


@pytest.mark.parametrize("workers", server_kinds(), indirect=True)
async def test_every_operation_crosses_processes(
    env: dict[str, str], workers: list[DaphneServer]
) -> None:
    sid = manager_call(env, "out = await m.create_stream('mp-1')")
    async with AsyncExitStack() as stack:
        clients = [await subscribe(stack, w, sid) for w in workers for _ in range(2)]
        state = manager_call(env, f"out = [await m.get_client_count_for_stream({sid!r}), "
                                  "await m.get_active_stream_ids()]")  # fmt: skip
        assert state == [4, [sid]]
        assert manager_call(env, PUSH.format(first=1, last=150, sid=sid)) == list(range(1, 151))
        manager_call(env, f"await m.handle_stream_error({sid!r}, RuntimeError('tool down'), "
                          "terminate_stream=False)")  # fmt: skip
        manager_call(env, f"await m.close_stream({sid!r}, 'closed by ops')")  # a third process
        after = manager_call(env, PUSH.format(first=1, last=1, sid=sid))
        results = await asyncio.wait_for(asyncio.gather(*(read_frames(ws) for ws in clients)), 20)
    assert after[0][0] == "STREAM_CLOSED"
    for frames, ws in zip(results, clients, strict=True):
        assert chunk_seqs(frames) == list(range(1, 152))  # 150 deltas + the error chunk
        assert frames[-2]["chunk"]["type"] == "error"
        assert frames[-2]["chunk"]["message"] == "tool down"
        assert frames[-1] == {"type": "closed", "reason": "closed by ops", "last_seq": 151}
        assert ws.close_code == CloseCode.STREAM_CLOSED
    assert manager_call(env, f"out = await m.get_client_count_for_stream({sid!r})") == 0


async def test_deregister_reaches_a_client_in_another_worker(
    env: dict[str, str], workers: list[DaphneServer]
) -> None:
    sid = manager_call(env, "out = await m.create_stream()")
    async with AsyncExitStack() as stack:
        ws = await subscribe(stack, workers[1], sid)
        query = f"StreamClient.objects.filter(stream_id={sid!r})"
        client_id = manager_call(
            env, f"from streaming_app.models import StreamClient\n"
                 f"out = [c.client_id async for c in {query}]"
        )[0]  # fmt: skip
        manager_call(env, f"await m.deregister_client({sid!r}, {client_id!r})")
        frames = await asyncio.wait_for(read_frames(ws), 10)
    assert ws.close_code == CloseCode.DEREGISTERED
    assert frames[-1]["reason"] == "deregistered"


def race(code: str, *, env: dict[str, str], processes: int = 4) -> int:
    """Run ``code`` in several processes at once; the sum of the numbers they print last."""
    started = [start_python(code, env=env) for _ in range(processes)]
    outputs = [p.communicate(timeout=60) for p in started]
    assert all(p.returncode == 0 for p in started), [err for _, err in outputs]
    return sum(int(out.strip().splitlines()[-1]) for out, _ in outputs)


def test_global_limits_hold_across_racing_processes(env: dict[str, str]) -> None:
    racing = with_settings(env, MAX_CONCURRENT_STREAMS=7)
    create = (
        "import asyncio\n"
        "from streaming_app.manager import get_streaming_manager\n"
        "async def main():\n"
        "    m = get_streaming_manager()\n"
        "    results = await asyncio.gather(*(m.create_stream() for _ in range(6)),\n"
        "                                   return_exceptions=True)\n"
        "    print(sum(isinstance(r, str) for r in results))\n"
        "asyncio.run(main())\n"
    )
    assert race(create, env=racing) == 7
    assert manager_call(racing, "out = len(await m.get_active_stream_ids())") == 7


def test_fair_shares_hold_across_racing_processes(env: dict[str, str]) -> None:
    racing = with_settings(env, MAX_STREAMS_PER_OWNER=5, MAX_STREAMS_PER_SESSION=3)
    uid = int(run_python(
        "from django.contrib.auth.models import User\n"
        "print(User.objects.create(username='racer').pk)\n", env=racing,
    ).strip())  # fmt: skip
    create = (
        "import asyncio\n"
        "from streaming_app.manager import get_streaming_manager\n"
        "async def main():\n"
        "    m = get_streaming_manager()\n"
        f"    calls = [m.create_stream(owner={uid}) for _ in range(6)]\n"
        "    calls += [m.create_stream(session_key='visitor-key') for _ in range(6)]\n"
        "    results = await asyncio.gather(*calls, return_exceptions=True)\n"
        "    # owner's streams count in hundreds, the session's in ones\n"
        "    print(sum(100 if i < 6 else 1 for i, r in enumerate(results) if isinstance(r, str)))\n"
        "asyncio.run(main())\n"
    )
    assert race(create, env=racing) == 503  # 4 processes x 6 tries each: exactly 5 and 3
    assert manager_call(racing, "out = len(await m.get_active_stream_ids())") == 8


def test_client_limit_holds_across_racing_processes(env: dict[str, str]) -> None:
    racing = with_settings(
        env, MAX_CLIENTS_PER_STREAM=5, SWEEP_INTERVAL_SECONDS=3600, CLIENT_TIMEOUT_SECONDS=3600
    )  # no heartbeats in these processes: their clients must not count as dead
    sid = manager_call(racing, "out = await m.create_stream('crowded')")
    register = (
        "import asyncio, os\n"
        "from streaming_app.manager import get_streaming_manager\n"
        "from tests.conftest import RecordingClient\n"
        "async def main():\n"
        "    m = get_streaming_manager()\n"
        "    clients = [RecordingClient(f'{os.getpid()}-{i}') for i in range(4)]\n"
        f"    results = await asyncio.gather(*(m.register_client({sid!r}, c) for c in clients),\n"
        "                                   return_exceptions=True)\n"
        "    print(sum(r is None for r in results), flush=True)\n"
        "    os._exit(0)  # the clients die with this process, their rows stay (as on kill -9)\n"
        "asyncio.run(main())\n"
    )
    assert race(register, env=racing) == 5
    assert manager_call(racing, f"out = await m.get_client_count_for_stream({sid!r})") == 5


async def test_clients_of_a_killed_worker_are_reaped(
    env: dict[str, str], workers: list[DaphneServer]
) -> None:
    sid = manager_call(env, "out = await m.create_stream()")
    async with AsyncExitStack() as stack:
        for worker in workers:
            await subscribe(stack, worker, sid)
        await subscribe(stack, workers[0], sid)
        assert manager_call(env, f"out = await m.get_client_count_for_stream({sid!r})") == 3
        workers[0].kill()  # kill -9: no clean-up at all
        count = 3
        for _ in range(40):  # the live worker's sweeper reaps within the client timeout
            await asyncio.sleep(0.25)
            count = manager_call(env, f"out = await m.get_client_count_for_stream({sid!r})")
            if count == 1:
                break
        assert count == 1


async def test_throw_raises_for_a_failing_client_in_another_process(
    env: dict[str, str], tmp_path: Path
) -> None:
    throwing = with_settings(env, ON_CLIENT_SEND_ERROR_BEHAVIOR="throw")
    failing = DaphneServer(
        throwing, log=tmp_path / "failing.log", app="tests.failing_asgi:application"
    )
    with failing:
        sid = manager_call(throwing, "out = await m.create_stream()")
        async with AsyncExitStack() as stack:
            await subscribe(stack, failing, sid)
            first = manager_call(throwing, PUSH.format(first=1, last=1, sid=sid))
            assert first == [1]
            failure: Any = None
            for _ in range(40):  # the failure reaches the producer's next push
                result = manager_call(throwing, PUSH.format(first=2, last=2, sid=sid))
                if result != [2] and isinstance(result[0], list):
                    failure = result[0]
                    break
                await asyncio.sleep(0.1)
    assert failure is not None
    code, details = failure
    assert code == "CLIENT_SEND_FAILED"
    assert len(details["failed_clients"]) == 1
    assert next(iter(details["failed_clients"])).startswith("ws-")
    assert details["pushed"] is False


PRODUCE_THROUGH_OUTAGE = """
import time
codes = []
for i in range(1, 101):  # 5 s of pushes: the outage (1 s) falls well inside them
    try:
        chunk = TextDeltaChunk(stream_id={sid!r}, text_delta=str(i))
        codes.append(await m.push_chunk({sid!r}, chunk))
    except StreamError as exc:
        codes.append(str(exc.code))
    await asyncio.sleep(0.05)
out = codes
"""


async def test_a_redis_restart_mid_stream_is_a_clear_error_never_a_silent_hole(
    database_url: str, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    env = base_env(DATABASE_URL=database_url, REDIS_URL=redis_server.url,
                   STREAMING_APP_JSON=json.dumps(SETTINGS))  # fmt: skip
    worker = DaphneServer(env, log=tmp_path / "daphne.log").start()
    try:
        sid = manager_call(env, "out = await m.create_stream()")
        async with AsyncExitStack() as stack:
            ws = await subscribe(stack, worker, sid)
            producer = asyncio.create_task(
                asyncio.to_thread(manager_call, env, PRODUCE_THROUGH_OUTAGE.format(sid=sid))
            )
            frames: list[dict[str, Any]] = []
            frames_task = asyncio.create_task(read_frames(ws, frames))
            # the producer is under way (its process can take seconds to start)
            await eventually(lambda: len(chunk_seqs(frames)) >= 5, timeout=60)
            redis_server.stop()
            await asyncio.sleep(1.0)
            redis_server.start()  # empty: Redis keeps nothing on disk here
            codes = await producer
            await asyncio.wait_for(frames_task, 30)
    finally:
        worker.stop()
        redis_server.stop()
    pushed = [c for c in codes if isinstance(c, int)]
    errors = [c for c in codes if isinstance(c, str)]
    assert pushed[:5] == [1, 2, 3, 4, 5]
    assert errors  # the outage reached the producer as StreamErrors, not as anything else
    # during the outage: unavailable; after the empty restart: the stream was closed for it
    assert set(errors) <= {"BACKEND_UNAVAILABLE", "STREAM_CLOSED"}
    assert errors[-1] == "STREAM_CLOSED"
    seqs = chunk_seqs(frames)
    assert seqs == list(range(1, len(seqs) + 1))  # what arrived has no hole
    # ... and the client was told how it ended instead of being left waiting
    assert frames[-1]["type"] in ("closed", "error", "gap", "reconnect"), frames[-3:]
    assert ws.close_code is not None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server (DATABASE_URL's, or 127.0.0.1:5432)."""
    url = os.environ.get("DATABASE_URL", "")
    server = url if url.startswith("postgres") else "postgres://postgres@127.0.0.1:5432/postgres"
    fresh = create_postgres_database(server)
    yield fresh
    drop_postgres_database(fresh)


async def test_a_worker_cut_off_from_the_database_sends_its_clients_to_reconnect(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Worker A loses the database for longer than the client timeout; worker B reaps A's
    (live) client meanwhile. When A is back it notices and sends the client off with 4012 and
    its cursor instead of serving a ghost; the client resumes on B."""
    import uuid

    import psycopg

    role = f"cut_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(postgres_url, autocommit=True)
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
    admin.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    server_url, name = postgres_url.rsplit("/", 1)
    cut_url = f"postgres://{role}@{server_url.rsplit('@', 1)[1]}/{name}"
    env_b = base_env(DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                     STREAMING_APP_JSON=json.dumps(SETTINGS))  # fmt: skip
    env_a = {**env_b, "DATABASE_URL": cut_url}
    a = DaphneServer(env_a, log=tmp_path / "a.log").start()
    b = DaphneServer(env_b, log=tmp_path / "b.log").start()
    try:
        sid = manager_call(env_b, "out = await m.create_stream()")
        async with AsyncExitStack() as stack:
            ws = await subscribe(stack, a, sid)
            assert manager_call(env_b, PUSH.format(first=1, last=3, sid=sid)) == [1, 2, 3]
            assert chunk_seqs([json.loads(await ws.recv()) for _ in range(3)]) == [1, 2, 3]
            admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = %s", [role])  # fmt: skip
            rows = "SELECT count(*) FROM streaming_app_streamclient WHERE stream_id = %s"
            for _ in range(100):  # B reaps A's client once A's heartbeat is 2 s old
                count = admin.execute(rows, [sid]).fetchone()
                if count is not None and count[0] == 0:
                    break
                await asyncio.sleep(0.1)
            assert count == (0,), a.log()[-3000:] + b.log()[-3000:]
            admin.execute(f'ALTER ROLE "{role}" LOGIN')  # A is back
            frames = await asyncio.wait_for(read_frames(ws), 20)
            assert ws.close_code == CloseCode.SERVICE_RESTART, a.log()
            assert frames[-1]["type"] == "reconnect"
            assert frames[-1]["last_seq"] == 3
            back = await stack.enter_async_context(websockets.connect(
                f"{b.ws_url}/ws/streams/{sid}/?last_seq=3",
                additional_headers={"Origin": b.http_url},
            ))  # fmt: skip
            assert json.loads(await back.recv())["type"] == "subscribed"
            assert manager_call(env_b, PUSH.format(first=4, last=5, sid=sid)) == [4, 5]
            assert chunk_seqs([json.loads(await back.recv()) for _ in range(2)]) == [4, 5]
            assert manager_call(env_b, f"out = await m.get_client_count_for_stream({sid!r})") == 1
    finally:
        a.stop()
        b.stop()
        admin.close()
        drop_postgres_database(postgres_url)
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


async def resume(server: DaphneServer, stream_id: str, last_seq: int) -> Any:
    """Reconnect as the JavaScript client does: 4429 while resuming is retried with back-off
    (a dead worker's clients stop holding places within CLIENT_TIMEOUT_SECONDS)."""
    for attempt in range(12):
        ws = await websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/?last_seq={last_seq}",
            additional_headers={"Origin": server.http_url},
        )
        first = json.loads(await ws.recv())
        if first["type"] == "subscribed":
            return ws
        await read_frames(ws)
        assert ws.close_code == CloseCode.STREAM_FULL, first
        await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
    raise AssertionError("still full after the dead worker's clients expired")


async def test_clients_of_a_killed_worker_resume_on_the_survivor_without_losing_the_reply(
    env: dict[str, str], workers: list[DaphneServer]
) -> None:
    full = with_settings(env, MAX_CLIENTS_PER_STREAM=8)
    sid = manager_call(full, "out = await m.create_stream()")
    producer = start_python(
        "import asyncio\n"
        "from streaming_app.manager import get_streaming_manager\n"
        "from streaming_app.chunks import TextDeltaChunk\n"
        "async def main():\n"
        "    m = get_streaming_manager()\n"
        "    for i in range(1, 201):\n"
        f"        chunk = TextDeltaChunk(stream_id={sid!r}, text_delta=str(i))\n"
        f"        await m.push_chunk({sid!r}, chunk)\n"
        "        await asyncio.sleep(0.03)\n"
        f"    await m.close_stream({sid!r}, 'done')\n"
        "asyncio.run(main())\n",
        env=full,
    )
    async with AsyncExitStack() as stack:
        on_a = [await subscribe(stack, workers[0], sid) for _ in range(8)]
        seen: list[list[int]] = [[] for _ in on_a]
        for index, ws in enumerate(on_a):  # a few chunks each before the crash
            while len(seen[index]) < 3:
                frame = json.loads(await ws.recv())
                if frame["type"] == "chunk":
                    seen[index].append(frame["seq"])
        workers[0].kill()  # kill -9 mid-reply
        for ws in on_a:
            await read_frames(ws)  # the line drops (no close frame from a dead worker)
        resumed = await asyncio.gather(*(resume(workers[1], sid, s[-1]) for s in seen))
        rest = await asyncio.wait_for(asyncio.gather(*(read_frames(ws) for ws in resumed)), 30)
    _out, err = producer.communicate(timeout=30)
    assert producer.returncode == 0, err
    for before, frames, ws in zip(seen, rest, resumed, strict=True):
        assert before + chunk_seqs(frames) == list(range(before[0], 201))  # none lost or twice
        assert frames[-1]["type"] == "closed"
        assert ws.close_code == CloseCode.STREAM_CLOSED
    assert manager_call(full, f"out = await m.get_client_count_for_stream({sid!r})") == 0


# -- several rows in one transaction: the same order everywhere --------------------------

SEED_CLIENTS = """
import uuid
from streaming_app.models import Stream, StreamClient
ids = [uuid.uuid4().hex for _ in range({streams})]
Stream.objects.bulk_create([Stream(id=sid) for sid in ids])
StreamClient.objects.bulk_create([
    StreamClient(stream_id=sid, client_id=f"c{{n}}", channel_name=f"ch-{{sid}}-{{n}}",
                 worker_id="w-racing")
    for sid in ids for n in range({clients})
])
print("IDS=" + ",".join(ids))
"""

HEARTBEATS = """
import os, random
from django.utils import timezone
from streaming_app.models import Stream, StreamClient
from streaming_app.registry import Registry
heartbeat, registry = Registry.__dict__["heartbeat"].func, Registry()  # the sync function
keys = list(StreamClient.objects.values_list("stream_id", "client_id"))
beats = 0
while not os.path.exists({done!r}):  # until the closes are over, however they ended
    beats += 1
    random.shuffle(keys)  # the order of a worker's clients is any order
    heartbeat(registry, "w-racing", set(keys), {{k: (beats, beats, False) for k in keys}},
              timezone.now())
    if beats == 1:
        open({ready!r}, "w").close()
print(f"BEATS={{beats}}")
"""

CLOSES = """
import os, time
from streaming_app.registry import Registry
close, registry = Registry.__dict__["close_stream"].func, Registry()
while not os.path.exists({ready!r}):
    time.sleep(0.01)
try:
    for sid in {ids!r}:
        close(registry, sid, "closed while its worker sends heartbeats")
    print("CLOSED")
finally:
    open({done!r}, "w").close()
"""


def test_closes_racing_a_heartbeat_never_deadlock(postgres_url: str, tmp_path: Path) -> None:
    """A close deletes its stream's client rows while their worker's heartbeat stores their
    positions, each in one transaction: on PostgreSQL, two transactions that lock the same
    rows in opposite orders deadlock, and one of them fails ("deadlock detected": the close
    would fail as BACKEND_UNAVAILABLE). Every transaction that changes several client rows
    locks them in the same order, so neither waits for the other in a cycle."""
    env = base_env(DATABASE_URL=postgres_url)
    out = run_python(SEED_CLIENTS.format(streams=300, clients=3), env=env)
    ids = out.split("IDS=", 1)[1].split()[0].split(",")
    ready, done = str(tmp_path / "beating"), str(tmp_path / "closed")
    beating = start_python(HEARTBEATS.format(ready=ready, done=done), env=env)
    closing = start_python(CLOSES.format(ready=ready, done=done, ids=ids), env=env)
    closed, close_errors = closing.communicate(timeout=120)
    beats, beat_errors = beating.communicate(timeout=120)
    assert "deadlock" not in close_errors + beat_errors, close_errors + beat_errors
    assert closing.returncode == 0 and "CLOSED" in closed, close_errors
    assert beating.returncode == 0, beat_errors
    assert int(beats.split("BEATS=", 1)[1]) > 1  # the heartbeats ran during the closes
