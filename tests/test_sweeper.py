"""The sweeper: idle streams are closed without anyone calling anything, with the config
default or a per-stream timeout, once however many sweepers race; dead workers' clients go."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.models import ClusterLease, Stream, StreamClient, StreamWorker
from streaming_app.worker import ROWS_READ_PASSES

from .conftest import RecordingClient, delta, eventually

pytestmark = pytest.mark.django_db(transaction=True)


async def reasons() -> dict[str, str]:
    return {s.id: s.close_reason async for s in Stream.objects.filter(status="closed")}


@override_settings(
    STREAMING_APP={"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 100, "SWEEP_INTERVAL_SECONDS": 0.05}
)
async def test_background_sweeper_closes_an_idle_stream_and_tells_its_clients() -> None:
    manager = get_streaming_manager()
    idle = await manager.create_stream("idle")
    patient = await manager.create_stream("patient", inactivity_timeout_ms=60_000)
    watcher, other = RecordingClient("watcher"), RecordingClient("other")
    await manager.register_client(idle, watcher)  # starts this process's sweeper
    await manager.register_client(patient, other)
    await eventually(lambda: watcher.closed_reasons)  # nobody calls close or sweep
    assert watcher.closed_reasons == ["Closed after 0.1 s of inactivity"]
    assert await reasons() == {idle: "Closed after 0.1 s of inactivity"}
    assert await manager.get_active_stream_ids() == [patient]
    assert other.closed_reasons == []
    await manager.shutdown()


@override_settings(STREAMING_APP={"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 60_000})
async def test_a_shorter_per_stream_timeout_wins_over_the_default() -> None:
    manager = get_streaming_manager()
    quick = await manager.create_stream("quick", inactivity_timeout_ms=50)
    normal = await manager.create_stream("normal")
    await asyncio.sleep(0.1)
    report = await manager.sweep()
    assert report.closed_idle == [quick]
    assert await reasons() == {quick: "Closed after 0.05 s of inactivity"}
    assert await manager.get_active_stream_ids() == [normal]


@override_settings(STREAMING_APP={"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 50})
async def test_a_longer_per_stream_timeout_and_pushes_keep_a_stream_open() -> None:
    manager = get_streaming_manager()
    idle = await manager.create_stream("idle")
    patient = await manager.create_stream("patient", inactivity_timeout_ms=60_000)
    quiet = await manager.create_stream("quiet", inactivity_timeout_ms=500)
    busy = await manager.create_stream("busy", inactivity_timeout_ms=500)
    await asyncio.sleep(0.6)  # every stream but patient is past its timeout...
    await manager.push_chunk(busy, delta(busy, "still here"))  # ...until busy speaks
    report = await manager.sweep()
    assert sorted(report.closed_idle) == [idle, quiet]
    assert await reasons() == {
        idle: "Closed after 0.05 s of inactivity",
        quiet: "Closed after 0.5 s of inactivity",
    }
    assert sorted(await manager.get_active_stream_ids()) == [busy, patient]
    row = await Stream.objects.aget(pk=busy)
    assert row.chunk_count == 1  # the sweep copied the activity to the row


@override_settings(STREAMING_APP={"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 50})
async def test_racing_sweepers_close_each_stream_once() -> None:
    first = get_streaming_manager()
    others = [StreamingManager() for _ in range(2)]  # other processes' managers
    for other in others:
        await other.initialize()
        other._history = first.history  # what they would share through Redis
    ids = [await first.create_stream(f"s-{i}") for i in range(3)]
    clients = [RecordingClient(f"tab-{i}") for i in range(3)]
    for stream_id, client in zip(ids, clients, strict=True):
        await first.register_client(stream_id, client)
    await asyncio.sleep(0.1)
    sweepers = [first, *others]
    await asyncio.gather(*(m.sweep() for m in sweepers * 2))
    await eventually(lambda: all(c.closed_reasons for c in clients))
    await asyncio.sleep(0.05)  # a second notice would have arrived by now
    assert [c.closed_reasons for c in clients] == [["Closed after 0.05 s of inactivity"]] * 3
    assert sum(m.stats["streams_closed"] for m in sweepers) == 3  # one close per stream
    assert await first.get_active_stream_ids() == []
    await first.shutdown()


@override_settings(STREAMING_APP={"CLIENT_TIMEOUT_SECONDS": 1.0})
async def test_sweep_keeps_its_own_clients_and_reaps_a_dead_workers() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("s-1")
    await manager.register_client(stream_id, RecordingClient("mine"))
    old = timezone.now() - timedelta(minutes=1)
    await StreamClient.objects.acreate(
        stream_id=stream_id, client_id="ghost", channel_name="gone", worker_id="dead:1:x",
        last_seen_at=old,
    )  # fmt: skip
    await StreamClient.objects.filter(client_id="mine").aupdate(last_seen_at=old)
    assert await manager.get_client_count_for_stream(stream_id) == 2
    dry = await manager.sweep(dry_run=True)
    assert dry.reaped_clients == [(stream_id, "ghost")]  # as the real sweep will say
    assert await manager.get_client_count_for_stream(stream_id) == 2  # a dry run changes nothing
    report = await manager.sweep()  # heartbeats its own client first
    assert report.reaped_clients == [(stream_id, "ghost")]
    assert await manager.get_client_count_for_stream(stream_id) == 1
    await manager.shutdown()


async def test_one_worker_at_a_time_does_the_clusters_part_and_another_takes_over(
    redis_url: str,
) -> None:
    shared = {
        "HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
        "REDIS_URL": redis_url,
        "SWEEP_INTERVAL_SECONDS": 3600,
        "CLIENT_TIMEOUT_SECONDS": 7200,
    }  # fmt: skip  (no background passes)
    with override_settings(STREAMING_APP=shared):
        first, second, third = StreamingManager(), StreamingManager(), StreamingManager()
        for worker in (first, second, third):
            await worker.initialize()

        async def cluster(worker: StreamingManager) -> bool:
            return (await worker.sweep(background=True)).cluster

        assert [await cluster(first), await cluster(second), await cluster(first)] == [
            True, False, True,
        ]  # fmt: skip
        assert (await second.sweep()).cluster  # an explicit pass (a command's): always
        await first.detach_worker()  # a worker that stops gives the lease up at once
        assert [await cluster(second), await cluster(third)] == [True, False]
        # The holder dies without a word: once its lease runs out (LEASE_PASSES passes
        # without renewing it), the next worker to sweep takes it.
        await ClusterLease.objects.filter(holder=second.worker_id).aupdate(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert [await cluster(third), await cluster(second)] == [True, False]
        for worker in (second, third):
            await worker.shutdown()


class Statements:
    """The SQL run on the connection of the thread the ORM's calls run in."""

    def __init__(self) -> None:
        self.sql: list[str] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.sql.append(sql)
        return execute(sql, params, many, context)

    async def __aenter__(self) -> Statements:
        await sync_to_async(lambda: connection.execute_wrappers.append(self))()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await sync_to_async(lambda: connection.execute_wrappers.remove(self))()


async def hold_clients(manager: StreamingManager, count: int) -> str:
    stream_id = await manager.create_stream()
    for n in range(count):
        await manager.register_client(stream_id, RecordingClient(f"c-{n}"))
    await manager.worker.heartbeat()  # the first reads the rows
    return stream_id


async def test_an_idle_workers_heartbeat_counts_its_client_rows_instead_of_reading_them() -> None:
    manager = get_streaming_manager()
    await hold_clients(manager, 10)  # MAX_CLIENTS_PER_STREAM
    async with Statements() as counted:
        await manager.worker.heartbeat()
    table = StreamClient._meta.db_table
    reads = [sql for sql in counted.sql if table in sql and "COUNT(*)" not in sql]
    assert reads == [], reads
    assert any(table in sql and "COUNT(*)" in sql for sql in counted.sql), counted.sql
    row = await StreamWorker.objects.aget(pk=manager.worker_id)
    assert timezone.now() - row.last_seen_at < timedelta(seconds=5)  # and it did beat
    await manager.shutdown()


async def test_a_row_the_worker_does_not_hold_goes_at_its_next_heartbeat() -> None:
    manager = get_streaming_manager()
    stream_id = await hold_clients(manager, 3)
    await StreamClient.objects.acreate(  # e.g. a release whose DELETE failed
        stream_id=stream_id, client_id="left-behind", worker_id=manager.worker_id,
        connected_at=timezone.now() - timedelta(minutes=1),
    )  # fmt: skip
    await manager.worker.heartbeat()
    assert not await StreamClient.objects.filter(client_id="left-behind").aexists()
    assert await manager.get_client_count_for_stream(stream_id) == 3
    await manager.shutdown()


async def test_a_row_gone_and_one_left_behind_in_one_pass_are_found_within_a_few_passes() -> None:
    """The count alone cannot tell them apart from nothing: the rows are read every
    ``ROWS_READ_PASSES`` heartbeats anyway."""
    manager = get_streaming_manager()
    stream_id = await hold_clients(manager, 3)
    await StreamClient.objects.filter(client_id="c-0").adelete()  # as another worker's reap
    await StreamClient.objects.acreate(
        stream_id=stream_id, client_id="left-behind", worker_id=manager.worker_id,
        connected_at=timezone.now() - timedelta(minutes=1),
    )  # fmt: skip
    for _ in range(ROWS_READ_PASSES):
        await manager.worker.heartbeat()
    assert not await StreamClient.objects.filter(client_id="left-behind").aexists()
    assert manager.stats["clients_resent"] == 1  # c-0 was told to reconnect
    await manager.shutdown()
