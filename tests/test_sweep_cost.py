"""What a sweep pass costs the database: with four workers on a shared history, the
statements of one pass of every worker, for 600 active streams with two clients each.

The pass is the steady state of a busy site: every stream got a chunk since the last pass.
Per-worker work (heartbeat, nudges) is a handful of bulk statements per worker; the cluster's
(activity, idle streams, dead workers) is done by one worker, the lease holder, in bulk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings

from streaming_app.manager import StreamingManager

from .conftest import RecordingClient, delta

# Statements, not time: the count is the same on any database (SQLite pass only; 90 s on PG).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.database_independent]

WORKERS, STREAMS, CLIENTS = 4, 600, 2  # over STATES_BATCH (500): two batches of state reads


class Statements:
    """Counts the statements run on the connection of the thread ORM calls run in."""

    def __init__(self) -> None:
        self.sql: list[str] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool,
                 context: Any) -> Any:  # fmt: skip
        self.sql.append(sql)
        return execute(sql, params, many, context)

    async def install(self) -> None:
        await sync_to_async(lambda: connection.execute_wrappers.append(self))()

    async def remove(self) -> None:
        await sync_to_async(lambda: connection.execute_wrappers.remove(self))()


async def test_statements_per_sweep_pass_do_not_grow_with_workers_times_streams(
    redis_url: str,
) -> None:
    settings = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                "REDIS_URL": redis_url, "MAX_CONCURRENT_STREAMS": STREAMS,
                "MAX_CLIENTS_PER_STREAM": CLIENTS,
                # The passes counted are the test's: the background loops wait an hour.
                "SWEEP_INTERVAL_SECONDS": 3600, "CLIENT_TIMEOUT_SECONDS": 7200}  # fmt: skip
    with override_settings(STREAMING_APP=settings):
        workers = [StreamingManager() for _ in range(WORKERS)]
        for worker in workers:
            await worker.initialize()
        try:
            ids = [await workers[0].create_stream() for _ in range(STREAMS)]
            for n, stream_id in enumerate(ids):
                for c in range(CLIENTS):
                    worker = workers[(n * CLIENTS + c) % WORKERS]
                    await worker.register_client(stream_id, RecordingClient(f"c-{n}-{c}"))
            for worker in workers:  # the first pass after start-up: leases, first heartbeats
                await worker.sweep(background=True)
            for stream_id in ids:  # a busy site: every stream moved since the last pass
                await workers[0].push_chunk(stream_id, delta(stream_id, "x"))
            counted = Statements()
            await counted.install()
            try:
                reports = [await worker.sweep(background=True) for worker in workers]
            finally:
                await counted.remove()
        finally:
            for worker in workers:
                await worker.shutdown()
    statements = len(counted.sql)
    print(f"\nstatements per sweep pass, {WORKERS} workers x {STREAMS} streams x {CLIENTS} "
          f"clients: {statements}")  # fmt: skip
    assert sum(r.cluster for r in reports) == 1  # one worker did the cluster's work
    assert statements <= 12 * WORKERS + 4 * (STREAMS // 500 + 1), "\n".join(
        s[:90] for s in counted.sql
    )
