"""Management commands: output and exit status, thin over the manager."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from streaming_app.manager import get_streaming_manager
from streaming_app.models import Stream, StreamClient
from streaming_app.protocol import CloseCode
from streaming_app.routing import websocket_urlpatterns

from .conftest import RecordingClient, delta, eventually
from .servers import base_env, manage, migrated_sqlite

pytestmark = pytest.mark.django_db(transaction=True)


def shared_backend(redis_url: str, **streaming: Any) -> dict[str, Any]:
    """Settings with which a command reaches the serving processes: Redis for the channel
    layer and the history."""
    return {
        "CHANNEL_LAYERS": {"default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": redis_url}]},
        }},
        "STREAMING_APP": {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                          "REDIS_URL": redis_url, **streaming},
    }  # fmt: skip


@pytest.fixture(autouse=True)
def _shared(redis_url: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """Commands that close or reap refuse on process-local backends: run them on Redis."""
    extra = request.node.get_closest_marker("streaming")
    with override_settings(**shared_backend(redis_url, **(extra.kwargs if extra else {}))):
        yield


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def create(*args: Any, **kwargs: Any) -> str:
    return async_to_sync(get_streaming_manager().create_stream)(*args, **kwargs)


def test_list_shows_active_streams_as_a_table_or_json() -> None:
    assert run("streaming_list") == "No active streams.\n"
    first = create("first", metadata={"topic": "tea"})
    async_to_sync(get_streaming_manager().push_chunk)(first, delta(first, "x"))
    async_to_sync(get_streaming_manager().close_stream)(create("second"), "done")
    table = run("streaming_list").splitlines()
    assert table[0].split()[:3] == ["id", "status", "owner"]
    assert [line.split()[0] for line in table[1:]] == ["first"]
    assert "second" in run("streaming_list", "--all")
    rows = json.loads(run("streaming_list", "--all", "--json"))
    assert [(r["id"], r["status"]) for r in rows] == [("first", "active"), ("second", "closed")]
    assert rows[0]["metadata"] == {"topic": "tea"}
    assert rows[0]["chunks"] == 1  # from the history: no sweep has copied it to the row yet
    assert Stream.objects.get(pk="first").chunk_count == 0
    assert rows[1]["close reason"] == "done"


async def test_close_closes_and_clients_see_the_reason() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("chat-1")
    client = RecordingClient("watcher")
    await manager.register_client(stream_id, client)
    out = await sync_to_async(run)("streaming_close", "chat-1", "--reason", "maintenance")
    assert out == "Closed chat-1\n"
    await eventually(lambda: client.closed_reasons == ["maintenance"])
    stream = await Stream.objects.aget(pk="chat-1")
    assert (stream.status, stream.close_reason) == ("closed", "maintenance")


def test_close_refuses_unknown_ids_before_closing_anything() -> None:
    create("real")
    with pytest.raises(CommandError, match="No such stream: ghost"):
        run("streaming_close", "real", "ghost")
    assert Stream.objects.get(pk="real").status == "active"


def test_shutdown_closes_everything_with_progress() -> None:
    ids = [create() for _ in range(3)]
    out = run("streaming_shutdown", "--reason", "deploy 42")
    assert "Closing 3 active stream(s)" in out
    assert "3/3 closed" in out
    assert "All 3 stream(s) closed." in out
    assert set(Stream.objects.values_list("close_reason", flat=True)) == {"deploy 42"}
    assert not Stream.objects.filter(pk__in=ids, status="active").exists()
    with pytest.raises(CommandError, match="positive"):
        run("streaming_shutdown", "--timeout", "0")


def test_shutdown_exits_non_zero_when_a_stream_cannot_be_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streaming_app.exceptions import GMIErrorCode, StreamError

    create("ok")
    create("stuck")
    manager = get_streaming_manager()
    original = manager.close_stream

    async def close_stream(stream_id: str, *args: Any, **kwargs: Any) -> None:
        if stream_id == "stuck":  # a backend outage for one stream
            raise StreamError(GMIErrorCode.BACKEND_UNAVAILABLE, "Redis is down", stream_id="stuck")
        await original(stream_id, *args, **kwargs)

    monkeypatch.setattr(manager, "close_stream", close_stream)
    err = StringIO()
    with pytest.raises(CommandError, match="1 stream\\(s\\) not closed: stuck"):
        call_command("streaming_shutdown", stdout=StringIO(), stderr=err)
    assert "Could not close stuck: Redis is down" in err.getvalue()
    assert Stream.objects.get(pk="ok").status == "closed"


@pytest.mark.streaming(DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS=60_000)
def test_reap_closes_idle_streams_and_dead_clients_with_dry_run() -> None:
    idle, busy, short = create("idle"), create("busy"), create("short", inactivity_timeout_ms=1)
    old = timezone.now() - timedelta(minutes=5)
    Stream.objects.filter(pk__in=[idle, busy, short]).update(last_activity_at=old)
    manager = get_streaming_manager()
    async_to_sync(manager.push_chunk)(busy, delta(busy, "still talking"))
    # idle and short have no history in this process: the database's activity counts
    async_to_sync(manager.history.forget)(idle)
    async_to_sync(manager.history.forget)(short)
    StreamClient.objects.create(
        stream_id=busy, client_id="ghost", channel_name="x", worker_id="dead-worker",
        last_seen_at=old,
    )  # fmt: skip
    dry = run("streaming_reap", "--dry-run")
    assert "Would close idle stream idle" in dry
    assert "Would close idle stream short" in dry
    assert "Would remove client ghost of stream busy (dead worker)" in dry
    assert "2 idle stream(s), 1 dead client(s) (dry run)" in dry
    assert Stream.objects.filter(status="active").count() == 3
    out = run("streaming_reap")
    assert "Closed idle stream idle" in out
    assert set(Stream.objects.filter(status="active").values_list("id", flat=True)) == {busy}
    assert Stream.objects.get(pk=idle).close_reason == "Closed after 60 s of inactivity"
    assert Stream.objects.get(pk=short).close_reason == "Closed after 0.001 s of inactivity"
    assert not StreamClient.objects.filter(client_id="ghost").exists()


def test_prune_deletes_old_closed_streams() -> None:
    manager = get_streaming_manager()
    for stream_id in ("old", "recent", "open"):
        create(stream_id)
    for stream_id in ("old", "recent"):
        async_to_sync(manager.close_stream)(stream_id, "done")
    Stream.objects.filter(pk="old").update(closed_at=timezone.now() - timedelta(days=8))
    assert run("streaming_prune", "--older-than", "7d", "--dry-run") == (
        "Would delete 1 closed stream(s).\n"
    )
    assert run("streaming_prune", "--older-than", "7d") == "Deleted 1 closed stream(s).\n"
    assert set(Stream.objects.values_list("id", flat=True)) == {"recent", "open"}
    for bad in ("7", "soon", "-1d"):
        with pytest.raises(CommandError, match="Invalid duration"):
            run("streaming_prune", f"--older-than={bad}")


async def test_shutdown_tells_websocket_clients_to_reconnect_with_their_cursor() -> None:
    manager = get_streaming_manager()
    stream_id = await manager.create_stream("chat-1")
    for text in ("a", "b"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    root = await User.objects.acreate_superuser("root", password="pw")
    communicator = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns), f"/ws/streams/{stream_id}/"
    )
    communicator.scope["user"] = root
    assert (await communicator.connect())[0]
    plain = RecordingClient("plain")
    await manager.register_client(stream_id, plain)
    try:
        frames = [await communicator.receive_json_from() for _ in range(3)]
        assert [f["type"] for f in frames] == ["subscribed", "chunk", "chunk"]
        out = await sync_to_async(run)("streaming_shutdown", "--reason", "deploy 42")
        assert "All 1 stream(s) closed." in out
        assert await communicator.receive_json_from() == {
            "type": "reconnect", "reason": "deploy 42", "last_seq": 2,
        }  # fmt: skip
        output = await communicator.receive_output()
        assert output == {"type": "websocket.close", "code": CloseCode.SERVICE_RESTART}
        await eventually(lambda: plain.closed_reasons == ["deploy 42"])
    finally:
        await communicator.disconnect()


def test_shutdown_past_its_timeout_fails_without_half_closing() -> None:
    ids = [create() for _ in range(2)]
    err = StringIO()
    # The deadline passes while the streams are being listed: nothing may be started.
    with pytest.raises(CommandError, match="2 stream\\(s\\) not closed"):
        call_command("streaming_shutdown", "--timeout", "1e-9", stdout=StringIO(), stderr=err)
    assert "Timed out with 2 stream(s) left." in err.getvalue()
    assert Stream.objects.filter(pk__in=ids, status="active").count() == 2
    with pytest.raises(CommandError, match="--reason must not be empty"):
        run("streaming_shutdown", "--reason", " ")


def test_close_says_which_were_closed_already() -> None:
    create("open")
    async_to_sync(get_streaming_manager().close_stream)(create("done"), "finished")
    out = run("streaming_close", "done", "open", "open")
    assert out == "done was closed already\nClosed open\n"
    assert Stream.objects.get(pk="done").close_reason == "finished"
    with pytest.raises(CommandError, match="--reason must not be empty"):
        run("streaming_close", "open", "--reason", "")


@pytest.mark.parametrize(
    "args", [("streaming_close", "chat-1"), ("streaming_shutdown",), ("streaming_reap",)]
)
def test_commands_refuse_on_the_embedded_default_naming_redis_url(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """On the embedded default a command runs in a process no client is connected to: it
    refuses instead of reporting a close nobody saw."""
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    env.pop("REDIS_URL", None)
    created = manage("shell", "--no-imports", "-c", "from streaming_app.models import Stream; "
                     "Stream.objects.create(id='chat-1')", env=env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    result = manage(*args, env=env)
    assert result.returncode == 1
    assert "REDIS_URL" in result.stderr
    assert "Closed" not in result.stdout
    status = manage("shell", "--no-imports", "-c", "from streaming_app.models import Stream; "
                    "print(Stream.objects.get(id='chat-1').status)", env=env)  # fmt: skip
    assert status.stdout.strip() == "active"
