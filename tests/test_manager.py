"""The seed's IStreamingManager API, end to end in one process."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from streaming_app import registry
from streaming_app.chunks import ErrorChunk, FinalResponseChunk, TextDeltaChunk
from streaming_app.conf import StreamingManagerConfig, app_settings
from streaming_app.exceptions import GMIError, GMIErrorCode, StreamError
from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.models import Stream, StreamClient, StreamWorker

from .conftest import RecordingClient, delta, eventually
from .servers import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)


async def configured(**options: object) -> StreamingManager:
    manager = StreamingManager()
    await manager.initialize(StreamingManagerConfig(**options))  # type: ignore[arg-type]
    return manager


# -- initialize and config -------------------------------------------------------------


async def test_methods_before_initialize_raise_not_initialized() -> None:
    manager = StreamingManager()
    calls = [
        manager.create_stream(),
        manager.register_client("s", RecordingClient("a")),
        manager.deregister_client("s", "a"),
        manager.push_chunk("s", delta("s", "x")),
        manager.close_stream("s"),
        manager.handle_stream_error("s", RuntimeError("x")),
        manager.get_active_stream_ids(),
        manager.get_client_count_for_stream("s"),
        manager.shutdown(),
    ]
    for call in calls:
        with pytest.raises(GMIError) as info:
            await call
        assert info.value.code is GMIErrorCode.NOT_INITIALIZED


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
        ({"max_clients_per_stream": -1}, "max_clients_per_stream"),
        ({"max_clients_per_stream": 2.5}, "max_clients_per_stream"),
        ({"default_stream_inactivity_timeout_ms": "300"}, "default_stream_inactivity_timeout_ms"),
        ({"on_client_send_error_behavior": "ignore"}, "on_client_send_error_behavior"),
    ],
)
async def test_initialize_rejects_invalid_config(options: dict[str, object], field: str) -> None:
    with pytest.raises(GMIError) as info:
        await configured(**options)
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    assert field in info.value.details


async def test_config_defaults_match_the_seed() -> None:
    config = StreamingManagerConfig()
    assert (config.max_concurrent_streams, config.default_stream_inactivity_timeout_ms) == (
        1000,
        300_000,
    )
    assert config.max_clients_per_stream == 10
    assert config.on_client_send_error_behavior == "log_and_continue"
    assert get_streaming_manager().config == config


async def test_infinite_limits_are_accepted() -> None:
    manager = await configured(max_concurrent_streams=math.inf, max_clients_per_stream=math.inf)
    stream_id = await manager.create_stream()
    assert await manager.get_active_stream_ids() == [stream_id]


async def test_accessor_follows_settings() -> None:
    with override_settings(STREAMING_APP={"MAX_CLIENTS_PER_STREAM": 3}):
        assert get_streaming_manager().config.max_clients_per_stream == 3
    assert get_streaming_manager().config.max_clients_per_stream == 10


# -- create_stream ---------------------------------------------------------------------


async def test_create_stream_generates_ids_and_stores_metadata(manager: StreamingManager) -> None:
    first = await manager.create_stream(metadata={"topic": "weather"}, gmi_instance_id="g1")
    second = await manager.create_stream()
    assert first != second
    assert len(first) == 32
    row = await Stream.objects.aget(pk=first)
    assert (row.metadata, row.gmi_instance_id, row.status) == ({"topic": "weather"}, "g1", "active")
    assert set(await manager.get_active_stream_ids()) == {first, second}


async def test_requested_id_is_used_and_a_duplicate_refused(manager: StreamingManager) -> None:
    assert await manager.create_stream("chat-42") == "chat-42"
    with pytest.raises(StreamError) as info:
        await manager.create_stream("chat-42")
    assert info.value.code is GMIErrorCode.RESOURCE_ALREADY_EXISTS
    assert info.value.stream_id == "chat-42"
    assert info.value.http_status == 409


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "slash/es", "ünï"])
async def test_invalid_requested_id_is_refused(manager: StreamingManager, bad: str) -> None:
    with pytest.raises(StreamError) as info:
        await manager.create_stream(bad)
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT


async def test_metadata_must_be_json(manager: StreamingManager) -> None:
    with pytest.raises(StreamError) as info:
        await manager.create_stream(metadata={"when": object()})
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    assert await manager.get_active_stream_ids() == []


async def test_concurrent_creates_stop_exactly_at_the_limit() -> None:
    manager = await configured(max_concurrent_streams=5)
    results = await asyncio.gather(*(manager.create_stream() for _ in range(20)),
                                   return_exceptions=True)  # fmt: skip
    created = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, StreamError)]
    assert len(created) == 5
    assert len(refused) == 15
    assert {r.code for r in refused} == {GMIErrorCode.RATE_LIMIT_EXCEEDED}
    assert await Stream.objects.filter(status="active").acount() == 5
    await manager.close_stream(created[0])
    assert await manager.create_stream()  # a closed stream frees its place


# -- register / deregister -------------------------------------------------------------


async def test_late_client_gets_the_chunks_pushed_before_it_joined(
    manager: StreamingManager,
) -> None:
    stream_id = await manager.create_stream()
    for text in ("a", "b"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    client = RecordingClient("late")
    await manager.register_client(stream_id, client)
    await manager.push_chunk(stream_id, delta(stream_id, "c"))
    assert client.texts == ["a", "b", "c"]


async def test_register_errors(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    await manager.register_client(stream_id, RecordingClient("a"))
    cases = [
        ("missing", RecordingClient("b"), GMIErrorCode.RESOURCE_NOT_FOUND),
        (stream_id, RecordingClient("a"), GMIErrorCode.RESOURCE_ALREADY_EXISTS),
        (stream_id, RecordingClient("c", active=False), GMIErrorCode.INVALID_ARGUMENT),
        (stream_id, object(), GMIErrorCode.INVALID_ARGUMENT),
    ]
    for target, client, code in cases:
        with pytest.raises(StreamError) as info:
            await manager.register_client(target, client)  # type: ignore[arg-type]
        assert info.value.code is code, (target, client)
    await manager.close_stream(stream_id)
    with pytest.raises(StreamError) as info:
        await manager.register_client(stream_id, RecordingClient("d"))
    assert info.value.code is GMIErrorCode.STREAM_CLOSED


async def test_concurrent_registrations_stop_exactly_at_the_limit() -> None:
    manager = await configured(max_clients_per_stream=3)
    stream_id = await manager.create_stream()
    clients = [RecordingClient(f"c{i}") for i in range(10)]
    results = await asyncio.gather(
        *(manager.register_client(stream_id, c) for c in clients), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, StreamError)]
    assert len(refused) == 7
    assert {r.code for r in refused} == {GMIErrorCode.RATE_LIMIT_EXCEEDED}
    assert await manager.get_client_count_for_stream(stream_id) == 3
    await manager.shutdown()


@pytest.mark.parametrize("returning", [True, False], ids=["delete-returning", "select-delete"])
async def test_deregistered_client_gets_nothing_more(
    manager: StreamingManager, returning: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not returning:  # a database whose DELETE cannot return the row (MySQL, old SQLite)
        monkeypatch.setattr(registry, "_deletes_returning", lambda db: False)
    stream_id = await manager.create_stream()
    stays, leaves = RecordingClient("stays"), RecordingClient("leaves")
    await manager.register_client(stream_id, stays)
    await manager.register_client(stream_id, leaves)
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    await manager.deregister_client(stream_id, "leaves")
    await manager.push_chunk(stream_id, delta(stream_id, "2"))
    assert stays.texts == ["1", "2"]
    assert leaves.texts == ["1"]
    assert await manager.get_client_count_for_stream(stream_id) == 1
    assert leaves.close_calls == []  # deregistering is not closing
    for target, client_id in (("missing", "stays"), (stream_id, "leaves")):
        with pytest.raises(StreamError) as info:
            await manager.deregister_client(target, client_id)
        assert info.value.code is GMIErrorCode.RESOURCE_NOT_FOUND


# -- push_chunk ------------------------------------------------------------------------


async def test_push_reaches_every_client_in_order(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    clients = [RecordingClient(f"c{i}") for i in range(3)]
    for client in clients:
        await manager.register_client(stream_id, client)
    seqs = [await manager.push_chunk(stream_id, delta(stream_id, str(i))) for i in range(50)]
    assert seqs == list(range(1, 51))
    for client in clients:
        assert client.texts == [str(i) for i in range(50)]


async def test_push_accepts_wire_mappings(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    await manager.push_chunk(
        stream_id, {"type": "final_response", "stream_id": stream_id, "final_response_text": "ok"}
    )
    assert isinstance(client.chunks[0], FinalResponseChunk)
    assert client.chunks[0].final_response_text == "ok"


@pytest.mark.parametrize(
    "chunk",
    [
        {"type": "shout", "stream_id": "S"},
        {"type": "text_delta", "stream_id": "S"},
        {"type": "text_delta", "stream_id": "S", "text_delta": 1},
        {"type": "text_delta", "stream_id": "other", "text_delta": "x"},
        {"type": "tool_result_emission", "stream_id": "S", "tool_call_id": "1",
         "tool_name": "t", "tool_result": {1, 2}},
        {"type": "text_delta", "stream_id": "S", "text_delta": "x" * 70_000},
        "not a mapping",
    ],
)  # fmt: skip
async def test_bad_chunks_are_refused_before_anything_is_sent(
    manager: StreamingManager, chunk: object
) -> None:
    stream_id = await manager.create_stream("S")
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(stream_id, chunk)  # type: ignore[arg-type]
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    assert await manager.push_chunk(stream_id, delta(stream_id, "next")) == 1
    assert client.texts == ["next"]


async def test_push_to_unknown_stream_raises(manager: StreamingManager) -> None:
    with pytest.raises(StreamError) as info:
        await manager.push_chunk("nope", delta("nope", "x"))
    assert info.value.code is GMIErrorCode.RESOURCE_NOT_FOUND


# -- send-error policies -----------------------------------------------------------------


async def test_log_and_continue_keeps_the_failing_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = await configured(on_client_send_error_behavior="log_and_continue")
    stream_id = await manager.create_stream()
    good, bad = RecordingClient("good"), RecordingClient("bad", fail=True)
    await manager.register_client(stream_id, good)
    await manager.register_client(stream_id, bad)
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    bad.fail = False
    await manager.push_chunk(stream_id, delta(stream_id, "2"))
    assert good.texts == ["1", "2"]
    assert bad.texts == ["2"]
    assert await manager.get_client_count_for_stream(stream_id) == 2
    row = await StreamClient.objects.aget(stream_id=stream_id, client_id="bad")
    assert row.send_failures == 1
    assert any("bad" in r.getMessage() and stream_id in r.getMessage() for r in caplog.records)
    await manager.shutdown()


async def test_deregister_client_removes_and_closes_the_failing_client() -> None:
    manager = await configured(on_client_send_error_behavior="deregister_client")
    stream_id = await manager.create_stream()
    good, bad = RecordingClient("good"), RecordingClient("bad", fail=True)
    await manager.register_client(stream_id, good)
    await manager.register_client(stream_id, bad)
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    assert await manager.get_client_count_for_stream(stream_id) == 1
    assert bad.close_calls == ["send failed"]
    bad.fail = False
    await manager.push_chunk(stream_id, delta(stream_id, "2"))
    assert good.texts == ["1", "2"]
    assert bad.texts == []
    await manager.shutdown()


async def test_throw_raises_naming_the_failed_clients_after_trying_all() -> None:
    manager = await configured(on_client_send_error_behavior="throw")
    stream_id = await manager.create_stream()
    good = RecordingClient("good")
    bad1, bad2 = RecordingClient("bad1", fail=True), RecordingClient("bad2", fail=True)
    for client in (bad1, good, bad2):
        await manager.register_client(stream_id, client)
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(stream_id, delta(stream_id, "1"))
    assert info.value.code is GMIErrorCode.CLIENT_SEND_FAILED
    assert set(info.value.details["failed_clients"]) == {"bad1", "bad2"}
    assert info.value.client_id == "bad1"
    assert good.texts == ["1"]  # every client was tried
    assert await manager.get_client_count_for_stream(stream_id) == 3
    bad1.fail = bad2.fail = False
    assert await manager.push_chunk(stream_id, delta(stream_id, "2")) == 2  # raised once only
    await manager.shutdown()


async def test_throw_reports_failures_seen_after_the_push_at_the_next_push() -> None:
    manager = await configured(on_client_send_error_behavior="throw")
    stream_id = await manager.create_stream()
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    # A consumer in another process reports its failure through the history.
    await manager.report_send_failure(stream_id, "ws-remote", ConnectionError("gone"))
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(stream_id, delta(stream_id, "2"))
    assert info.value.details == {
        "failed_clients": {"ws-remote": "ConnectionError: gone"}, "pushed": False, "seq": None,
    }  # fmt: skip
    assert await manager.push_chunk(stream_id, delta(stream_id, "2")) == 2
    await manager.shutdown()


# -- close / errors ----------------------------------------------------------------------


async def test_close_notifies_every_client_once(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    clients = [RecordingClient("a"), RecordingClient("b")]
    for client in clients:
        await manager.register_client(stream_id, client)
    await manager.close_stream(stream_id, "done")
    await manager.close_stream(stream_id, "again")
    await eventually(lambda: all(c.closed_reasons for c in clients))
    await asyncio.sleep(0.05)
    for client in clients:
        assert client.closed_reasons == ["done"]
        assert client.close_calls == ["done"]
    row = await Stream.objects.aget(pk=stream_id)
    assert (row.status, row.close_reason) == ("closed", "done")
    assert await manager.get_client_count_for_stream(stream_id) == 0
    assert await manager.get_active_stream_ids() == []
    with pytest.raises(StreamError) as info:
        await manager.close_stream("missing")
    assert info.value.code is GMIErrorCode.RESOURCE_NOT_FOUND


async def test_push_after_close_raises_and_reaches_nobody(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    await manager.push_chunk(stream_id, delta(stream_id, "before"))
    await manager.close_stream(stream_id, "done")
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(stream_id, delta(stream_id, "after"))
    assert info.value.code is GMIErrorCode.STREAM_CLOSED
    await eventually(lambda: client.closed_reasons)
    assert client.texts == ["before"]


async def test_close_during_pushes_loses_nothing_and_delivers_nothing_after(
    manager: StreamingManager,
) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    accepted: list[int] = []
    refusals: list[StreamError] = []

    async def producer() -> None:
        for i in range(1000):
            try:
                accepted.append(await manager.push_chunk(stream_id, delta(stream_id, str(i))))
            except StreamError as exc:
                refusals.append(exc)
                return

    async def closer() -> None:
        await asyncio.sleep(0.02)
        await manager.close_stream(stream_id, "stop")

    await asyncio.gather(producer(), closer())
    await eventually(lambda: client.closed_reasons)
    assert [r.code for r in refusals] == [GMIErrorCode.STREAM_CLOSED]
    assert 0 < len(accepted) < 1000
    assert client.texts == [str(i) for i in range(len(accepted))]


async def test_handle_stream_error_sends_one_error_chunk_then_closes(
    manager: StreamingManager,
) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    await manager.handle_stream_error(stream_id, RuntimeError("GMI processing failed"))
    await eventually(lambda: client.closed_reasons)
    errors = [c for c in client.chunks if isinstance(c, ErrorChunk)]
    assert len(errors) == 1
    assert (errors[0].code, errors[0].message) == ("RuntimeError", "GMI processing failed")
    assert client.closed_reasons == ["Error: GMI processing failed"]
    with pytest.raises(StreamError):
        await manager.handle_stream_error("missing", RuntimeError("x"))


async def test_handle_stream_error_can_keep_the_stream_open(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    client = RecordingClient("a")
    await manager.register_client(stream_id, client)
    await manager.handle_stream_error(
        stream_id, StreamError(GMIErrorCode.STREAM_ERROR, "tool timed out"), terminate_stream=False
    )
    await manager.push_chunk(stream_id, delta(stream_id, "recovered"))
    assert [type(c) for c in client.chunks] == [ErrorChunk, TextDeltaChunk]
    assert client.chunks[0].is_final is False
    assert await manager.get_active_stream_ids() == [stream_id]


async def test_shutdown_closes_every_stream(manager: StreamingManager) -> None:
    ids = [await manager.create_stream() for _ in range(3)]
    client = RecordingClient("a")
    await manager.register_client(ids[0], client)
    await manager.shutdown()
    assert not manager.is_initialized
    assert await Stream.objects.filter(status="closed").acount() == 3
    assert {s.close_reason async for s in Stream.objects.all()} == {"Server shutting down"}
    await eventually(lambda: client.closed_reasons == ["Server shutting down"])


async def test_sync_facade_serves_sync_code(manager: StreamingManager) -> None:
    from asgiref.sync import sync_to_async

    from streaming_app.manager import get_sync_streaming_manager

    def produce() -> tuple[str, int]:
        sync = get_sync_streaming_manager()
        stream_id = sync.create_stream(metadata={"from": "celery"})
        seq = sync.push_chunk(stream_id, delta(stream_id, "hi"))
        sync.close_stream(stream_id, "done")
        return stream_id, seq

    stream_id, seq = await sync_to_async(produce)()
    assert seq == 1
    assert (await Stream.objects.aget(pk=stream_id)).close_reason == "done"


async def test_wait_closed_tells_the_producer_at_once(manager: StreamingManager) -> None:
    stream_id = await manager.create_stream()
    waiters = [asyncio.create_task(manager.wait_closed(stream_id)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    await manager.close_stream(stream_id, "cancelled")
    assert await asyncio.wait_for(asyncio.gather(*waiters), 2) == ["cancelled", "cancelled"]
    assert await manager.wait_closed(stream_id) == "cancelled"  # already closed: at once
    with pytest.raises(StreamError) as info:
        await manager.wait_closed("missing")
    assert info.value.code is GMIErrorCode.RESOURCE_NOT_FOUND


@override_settings(STREAMING_APP={"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 50})
async def test_idle_streams_are_closed_once_by_racing_sweepers() -> None:
    first = get_streaming_manager()
    second = StreamingManager()  # another process's manager, on the same database and layer
    await second.initialize()
    second._history = first.history  # one process here: the history they would share in Redis
    stream_id = await first.create_stream()
    busy = await first.create_stream(inactivity_timeout_ms=60_000)
    client = RecordingClient("watcher")
    await first.register_client(stream_id, client)
    await asyncio.sleep(0.1)
    reports = await asyncio.gather(*(m.sweep() for m in (first, second, first, second)))
    assert any(stream_id in report.closed_idle for report in reports)
    await eventually(lambda: client.closed_reasons)
    await asyncio.sleep(0.05)
    assert client.closed_reasons == ["Closed after 0.05 s of inactivity"]
    assert await first.get_active_stream_ids() == [busy]
    await first.shutdown()


# -- a close that fails part-way -----------------------------------------------------------


async def test_a_close_that_fails_half_way_is_a_stream_error_and_can_be_finished(
    private_redis: RedisServer,
) -> None:
    settings = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                "REDIS_URL": private_redis.url}  # fmt: skip
    with override_settings(STREAMING_APP=settings):
        manager = get_streaming_manager()
        stream_id = await manager.create_stream()
        client = RecordingClient("watcher")
        await manager.register_client(stream_id, client)
        await manager.push_chunk(stream_id, delta(stream_id, "1"))
        private_redis.stop()  # the history's Redis goes away
        with pytest.raises(StreamError) as info:
            await manager.close_stream(stream_id, "done")
        assert info.value.code is GMIErrorCode.BACKEND_UNAVAILABLE
        with pytest.raises(StreamError) as info:
            await manager.push_chunk(stream_id, delta(stream_id, "2"))
        assert info.value.code is GMIErrorCode.BACKEND_UNAVAILABLE
        assert (await Stream.objects.aget(pk=stream_id)).is_active  # nothing half-done
        private_redis.start()  # back, empty
        await manager.close_stream(stream_id, "done")  # a retry finishes the close
        await eventually(lambda: client.closed_reasons == ["done"])
        assert not (await Stream.objects.aget(pk=stream_id)).is_active
        assert client.texts == ["1"]
        await manager.shutdown()


async def test_a_close_stopped_after_the_history_is_finished_by_a_retry_or_the_sweeper(
    manager: StreamingManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await manager.create_stream("first"), await manager.create_stream("second")
    clients = {sid: RecordingClient(f"on-{sid}") for sid in (first, second)}
    for sid, client in clients.items():
        await manager.register_client(sid, client)

    async def database_down(*args: Any, **kwargs: Any) -> None:
        from django.db import OperationalError

        raise OperationalError("connection refused")  # the outage a test cannot stage here

    with monkeypatch.context() as patch:
        patch.setattr(manager.registry, "close_stream", database_down)
        for sid in (first, second):
            with pytest.raises(StreamError) as info:
                await manager.close_stream(sid, f"{sid} done")
            assert info.value.code is GMIErrorCode.BACKEND_UNAVAILABLE
    for sid in (first, second):  # closed in the history: no push gets through any more
        with pytest.raises(StreamError) as info:
            await manager.push_chunk(sid, delta(sid, "late"))
        assert info.value.code is GMIErrorCode.STREAM_CLOSED
    await manager.close_stream(first, "retried")  # a retry is not a silent no-op
    assert (await manager.sweep()).finished_closes == []  # its closer may still be at it
    later = time.time() + app_settings.CLIENT_TIMEOUT_SECONDS + 1
    monkeypatch.setattr("streaming_app.sweeper.time.time", lambda: later)
    report = await manager.sweep()  # the sweeper finishes the other one
    assert report.finished_closes == [second]
    await eventually(lambda: all(c.closed_reasons for c in clients.values()))
    assert clients[first].closed_reasons == ["first done"]  # the reason the history kept
    assert clients[second].closed_reasons == ["second done"]
    assert await manager.get_active_stream_ids() == []


@override_settings(STREAMING_APP={"MAX_CLIENTS_PER_STREAM": 2, "CLIENT_TIMEOUT_SECONDS": 30})
async def test_clients_of_a_worker_known_dead_do_not_hold_places() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream()
    now = timezone.now()
    await StreamWorker.objects.acreate(id="killed", last_seen_at=now - timedelta(seconds=40))
    await StreamWorker.objects.acreate(id="alive", last_seen_at=now)
    for client_id in ("lost-1", "lost-2"):  # a worker killed with -9, not yet reaped
        await StreamClient.objects.acreate(
            stream_id=stream_id, client_id=client_id, channel_name="x", worker_id="killed"
        )
    await StreamClient.objects.acreate(
        stream_id=stream_id, client_id="elsewhere", channel_name="y", worker_id="alive"
    )
    await manager.register_client(stream_id, RecordingClient("back"))  # 1 live + 1: fits
    with pytest.raises(StreamError) as info:
        await manager.register_client(stream_id, RecordingClient("one-too-many"))
    assert info.value.code is GMIErrorCode.RATE_LIMIT_EXCEEDED
    report = await manager.sweep()
    assert sorted(report.reaped_clients) == [(stream_id, "lost-1"), (stream_id, "lost-2")]
    assert not await StreamWorker.objects.filter(id="killed").aexists()
    await manager.shutdown()


def test_the_row_a_subscription_reads_is_the_orms_model() -> None:
    """``stream_row`` builds the model from its own compiled SELECT: every field as the ORM
    reads it (the database's converters: dates, JSON), and nothing for an unknown id."""
    from streaming_app.registry import stream_row

    created = Stream.objects.create(
        id="row-1", metadata={"a": [1, 2], "b": None}, closed_at=timezone.now(),
        inactivity_timeout_ms=5000, close_reason="done", status=Stream.Status.CLOSED,
    )  # fmt: skip
    row, orm = stream_row(created.pk), Stream.objects.get(pk=created.pk)
    assert row is not None and not row._state.adding
    assert [getattr(row, f.attname) for f in Stream._meta.concrete_fields] == [
        getattr(orm, f.attname) for f in Stream._meta.concrete_fields
    ]
    assert not row.is_active
    assert stream_row("no-such-stream") is None
