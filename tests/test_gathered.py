"""``registry.Gathered``: database calls that come together share one trip to the database's
thread, each with its own result or exception; and registrations use it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from asgiref.sync import ThreadSensitiveContext

from streaming_app import registry
from streaming_app.manager import StreamingManager
from streaming_app.registry import Gathered

from .conftest import RecordingClient

pytestmark = pytest.mark.django_db(transaction=True)


async def _trip_under_way(gathered: Gathered) -> tuple[asyncio.Future[str], threading.Event]:
    """A first call that holds the database's thread until the event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> str:
        entered.set()
        release.wait(10)
        return "first"

    first = asyncio.ensure_future(gathered(hold))
    await asyncio.to_thread(entered.wait, 10)  # the trip is in the database's thread
    return first, release


async def test_calls_made_during_a_trip_share_the_next_one() -> None:
    gathered = Gathered()
    first, release = await _trip_under_way(gathered)
    runs: list[Callable[[], int]] = [lambda i=i: i for i in range(5)]  # type: ignore[misc]
    others = [asyncio.ensure_future(gathered(run)) for run in runs]
    await asyncio.sleep(0)
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*others) == [0, 1, 2, 3, 4]
    assert (gathered.trips, gathered.calls) == (2, 6)


async def test_each_call_gets_its_own_result_or_exception() -> None:
    gathered = Gathered()
    first, release = await _trip_under_way(gathered)

    def fail() -> int:
        raise ValueError("this one")

    calls = [asyncio.ensure_future(gathered(run)) for run in (lambda: 1, fail, lambda: 3)]
    await asyncio.sleep(0)
    release.set()
    await first
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "this one"
    assert gathered.trips == 2


async def test_a_call_cancelled_before_its_trip_is_not_run() -> None:
    gathered = Gathered()
    first, release = await _trip_under_way(gathered)
    ran: list[str] = []
    cancelled = asyncio.ensure_future(gathered(lambda: ran.append("cancelled")))
    kept = asyncio.ensure_future(gathered(lambda: ran.append("kept")))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    await first
    await kept
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert ran == ["kept"]
    assert gathered.calls == 2  # the first and the kept one


async def test_a_call_alone_goes_at_once() -> None:
    gathered = Gathered()
    assert await gathered(lambda: "alone") == "alone"
    assert await gathered(lambda: "again") == "again"
    assert (gathered.trips, gathered.calls) == (2, 2)


async def test_registrations_made_together_share_trips() -> None:
    manager = StreamingManager()
    await manager.initialize()
    stream_id = await manager.create_stream()
    trips, calls = registry.gathered.trips, registry.gathered.calls
    clients = [RecordingClient(f"c{i}") for i in range(10)]  # the default limit per stream
    await asyncio.gather(*(manager.register_client(stream_id, c) for c in clients))
    assert registry.gathered.calls - calls == 10
    assert registry.gathered.trips - trips < 10
    assert await manager.get_client_count_for_stream(stream_id) == 10
    await asyncio.gather(*(manager.deregister_client(stream_id, c.id) for c in clients))
    assert await manager.get_client_count_for_stream(stream_id) == 0
    await manager.shutdown()


async def test_calls_in_thread_sensitive_contexts_keep_their_own_threads() -> None:
    """Django runs each request's database work in a thread of its own: such calls are not
    gathered with another context's."""
    gathered = Gathered()

    async def in_a_context() -> list[int]:
        async with ThreadSensitiveContext():
            return list(await asyncio.gather(*(gathered(threading.get_ident) for _ in range(3))))

    first, second = await asyncio.gather(in_a_context(), in_a_context())
    assert len(set(first)) == 1 and len(set(second)) == 1
    assert first[0] != second[0]


async def test_on_postgresql_the_row_lock_and_the_insert_go_as_one_message() -> None:
    """One round trip instead of four (``BEGIN``, lock, INSERT, ``COMMIT``); that the limit
    still holds between processes is ``test_scale_out``'s race, run on both databases."""
    from django.db import connection

    one = await registry.database_sync_to_async(registry._one_message)()
    assert one is (connection.vendor == "postgresql")
