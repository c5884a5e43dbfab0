"""Coalescing text deltas (``COALESCE_TEXT_MS``, ``create_stream(coalesce_ms=...)``): fewer
chunks, the exact text in order, other chunks in place and never merged, nothing lost."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
import redis
from django.test import override_settings

from streaming_app.checks import check_settings
from streaming_app.chunks import (
    AgentOSResponse,
    ErrorChunk,
    FinalResponseChunk,
    SystemProgressChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    encode_chunk,
)
from streaming_app.conf import app_settings
from streaming_app.exceptions import GMIError, GMIErrorCode, StreamError
from streaming_app.manager import (
    StreamingManager,
    get_streaming_manager,
    get_sync_streaming_manager,
)
from streaming_app.metrics import ManagerCollector, Snapshot

from .conftest import RecordingClient, delta, eventually
from .servers import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)

WINDOW = 1000  # ms: longer than any of these tests' pushes take, so merging is theirs to see


def segments(chunks: list[AgentOSResponse]) -> list[str | tuple[str, ...]]:
    """What a reader sees: the text between non-delta chunks (concatenated), and those
    chunks' types in place."""
    out: list[str | tuple[str, ...]] = []
    for chunk in chunks:
        if isinstance(chunk, TextDeltaChunk):
            if out and isinstance(out[-1], str):
                out[-1] += chunk.text_delta
            else:
                out.append(chunk.text_delta)
        else:
            out.append((str(chunk.type),))
    return out


async def reader(manager: StreamingManager, stream_id: str) -> RecordingClient:
    client = RecordingClient(f"reader-{stream_id}")
    await manager.register_client(stream_id, client)
    return client


async def test_consecutive_deltas_merge_into_fewer_chunks_with_the_exact_text(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    words = [f"w{i} " for i in range(20)]
    seqs = [await manager.push_chunk(sid, delta(sid, w)) for w in words]
    # Nothing went out for a window before the first: it goes at once; the rest are held.
    assert seqs == [1] + [0] * 19
    assert client.texts == ["w0 "]
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    assert "".join(client.texts) == "".join(words)
    assert len(client.chunks) < len(words)
    assert manager.stats["text_deltas_held"] == 19


async def test_other_chunks_are_never_merged_and_take_held_text_with_them_in_order(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    call = {"id": "c1", "name": "search", "arguments": {"q": "x"}}
    script: list[AgentOSResponse] = [
        *(delta(sid, t) for t in "abc"),
        ToolCallRequestChunk(stream_id=sid, tool_calls=[call]),
        *(delta(sid, t) for t in "de"),
        SystemProgressChunk(stream_id=sid, message="working"),
        delta(sid, "f"),
        FinalResponseChunk(stream_id=sid, final_response_text="abcdef"),
    ]
    returned = [await manager.push_chunk(sid, chunk) for chunk in script]
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    assert segments(client.chunks) == [
        "abc", ("tool_call_request",), "de", ("system_progress",), "f", ("final_response",)
    ]  # fmt: skip
    # Each non-delta chunk's seq is its own; held deltas said 0.
    seqs = (await manager.history.read_after(sid, 0)).entries
    by_type = {json.loads(text)["type"]: seq for seq, text in seqs}
    assert [returned[3], returned[6], returned[8]] == [
        by_type["tool_call_request"], by_type["system_progress"], by_type["final_response"]
    ]  # fmt: skip
    assert returned[1] == returned[2] == returned[4] == returned[5] == returned[7] == 0
    assert len(client.chunks) == len(seqs) < len(script)


async def test_deltas_of_another_kind_and_final_deltas_are_not_merged(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    await manager.push_chunk(sid, delta(sid, "a"))
    await manager.push_chunk(sid, delta(sid, "b", metadata={"part": 1}))
    await manager.push_chunk(sid, delta(sid, "c", metadata={"part": 1}))
    await manager.push_chunk(sid, delta(sid, "d", metadata={"part": 2}))
    await manager.push_chunk(sid, delta(sid, "e", metadata={"part": 2}, persona_id="other"))
    assert await manager.push_chunk(sid, delta(sid, "f", is_final=True)) > 0  # never held
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    got = [(c.text_delta, c.metadata, c.persona_id, c.is_final)
           for c in client.chunks if isinstance(c, TextDeltaChunk)]  # fmt: skip
    assert got == [
        ("a", None, "", False),
        ("bc", {"part": 1}, "", False),
        ("d", {"part": 2}, "", False),
        ("e", {"part": 2}, "other", False),
        ("f", None, "", True),
    ]


async def test_the_window_end_sends_held_text_without_any_other_call(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=20)
    client = await reader(manager, sid)
    assert await manager.push_chunk(sid, delta(sid, "a")) == 1
    # No await between these two: they are held together, whatever the clock says.
    held = delta(sid, "b")
    assert await manager.push_chunk(sid, held) == 0
    assert await manager.push_chunk(sid, delta(sid, "c")) == 0
    await eventually(lambda: len(client.chunks) == 2)  # no push, flush or close meanwhile
    assert client.texts == ["a", "bc"]
    assert client.chunks[1].timestamp == held.timestamp  # the merged chunk keeps the first's
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    assert client.texts == ["a", "bc"]


async def test_flush_sends_what_is_held_and_returns_its_seq(manager: StreamingManager) -> None:
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    assert await manager.coalescer.flush(sid) is None  # nothing held
    await manager.push_chunk(sid, delta(sid, "x"))
    await manager.push_chunk(sid, delta(sid, "y"))
    await manager.push_chunk(sid, delta(sid, "z"))
    assert await manager.coalescer.flush(sid) == 2
    await eventually(lambda: client.texts == ["x", "yz"])
    assert await manager.coalescer.flush(sid) is None
    assert await manager.push_chunks(sid, [delta(sid, "1"), delta(sid, "2")]) == [3, 4]


async def test_push_chunks_and_handle_stream_error_send_held_text_first(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    for text in ("a", "b", "c"):
        await manager.push_chunk(sid, delta(sid, text))
    # Its own chunks are not merged, and their seqs are theirs (after the held "bc": 2).
    assert await manager.push_chunks(sid, [delta(sid, "d"), delta(sid, "e")]) == [3, 4]
    await manager.push_chunk(sid, delta(sid, "f"))  # held: text went out just now
    await manager.handle_stream_error(sid, RuntimeError("model failed"))
    await eventually(lambda: client.closed_reasons == ["Error: model failed"])
    assert client.texts == ["a", "bc", "d", "e", "f"]
    assert isinstance(client.chunks[-1], ErrorChunk)


async def test_a_bad_chunk_is_refused_at_once_and_held_text_keeps_its_deadline(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream(coalesce_ms=50)
    client = await reader(manager, sid)
    await manager.push_chunk(sid, delta(sid, "a"))
    await manager.push_chunk(sid, delta(sid, "b"))
    limit = app_settings.MAX_CHUNK_BYTES
    for bad in (
        delta("another-stream", "c"),
        delta(sid, "x" * limit),
        {"type": "text_delta", "stream_id": sid},  # no text_delta
        delta(sid, "c", metadata={"not json": object()}),
    ):
        with pytest.raises(StreamError) as info:
            await manager.push_chunk(sid, bad)
        assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    with pytest.raises(StreamError) as info:  # nor a bad chunk of another type
        await manager.push_chunk(sid, {"type": "system_progress", "stream_id": sid})
    with pytest.raises(StreamError) as info:
        await manager.push_chunks(sid, [delta(sid, "c"), delta("another-stream", "d")])
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    await eventually(lambda: client.texts == ["a", "b"])  # held "b": still sent at its deadline
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    assert client.texts == ["a", "b"]


@override_settings(STREAMING_APP={"MAX_CHUNK_BYTES": 600})
async def test_a_merged_chunk_is_never_over_max_chunk_bytes() -> None:
    manager = get_streaming_manager()
    sid = await manager.create_stream(coalesce_ms=WINDOW)
    client = await reader(manager, sid)
    words = [f'{i:02d}é"{"x" * 40} ' for i in range(60)]  # escaped and multi-byte characters
    for word in words:
        await manager.push_chunk(sid, delta(sid, word))
    await manager.close_stream(sid, "done")
    await eventually(lambda: client.closed_reasons == ["done"])
    assert "".join(client.texts) == "".join(words)
    sizes = [len(encode_chunk(c, stream_id=sid, max_bytes=10**6).encode()) for c in client.chunks]
    assert max(sizes) <= 600
    assert 5 < len(client.chunks) < len(words)  # merged up to the limit, not beyond
    await manager.shutdown()


async def test_coalescing_is_off_by_default_and_push_chunk_keeps_its_seqs(
    manager: StreamingManager,
) -> None:
    sid = await manager.create_stream()
    assert not manager.coalescer.enabled  # push_chunk takes the seed's path untouched
    client = await reader(manager, sid)
    assert [await manager.push_chunk(sid, delta(sid, t)) for t in "abc"] == [1, 2, 3]
    assert client.texts == ["a", "b", "c"]
    other = await manager.create_stream(coalesce_ms=WINDOW)
    assert manager.coalescer.enabled
    assert await manager.push_chunk(sid, delta(sid, "d")) == 4  # a stream without a window
    await manager.close_stream(other, "done")
    assert not manager.coalescer.enabled  # forgotten with its stream


@override_settings(STREAMING_APP={"COALESCE_TEXT_MS": WINDOW})
async def test_the_setting_is_the_window_of_streams_without_their_own() -> None:
    manager = get_streaming_manager()
    by_default, off = await manager.create_stream(), await manager.create_stream(coalesce_ms=0)
    for sid in (by_default, off):
        assert [await manager.push_chunk(sid, delta(sid, t)) for t in "ab"][1] == (
            0 if sid == by_default else 2
        )
    history = manager.history
    await manager.shutdown()  # closing every stream sends what they hold
    replay = await history.read_after(by_default, 0)
    assert [json.loads(t)["text_delta"] for _, t in replay.entries] == ["a", "b"]


@pytest.mark.parametrize("value", [-1, 1001, "20", True, math.nan, math.inf, None])
async def test_bad_windows_are_refused(manager: StreamingManager, value: Any) -> None:
    if value is not None:
        with pytest.raises(StreamError) as info:
            await manager.create_stream(coalesce_ms=value)
        assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
        assert "coalesce_ms must be a number of ms from 0 (off) to 1000" in info.value.message
        sid = await manager.create_stream()
        with pytest.raises(StreamError) as info:
            manager.coalescer.set_window(sid, value)
        assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    with override_settings(STREAMING_APP={"COALESCE_TEXT_MS": value}):
        assert "streaming_app.E032" in [m.id for m in check_settings()]
        with pytest.raises(GMIError) as error:
            await StreamingManager().initialize()
        assert error.value.code is GMIErrorCode.INVALID_ARGUMENT
        assert "COALESCE_TEXT_MS" in error.value.message


def test_the_sync_facade_never_holds_a_delta(transactional_db: None) -> None:
    manager = get_sync_streaming_manager()
    sid = manager.create_stream(coalesce_ms=WINDOW)
    assert [manager.push_chunk(sid, delta(sid, t)) for t in "abc"] == [1, 2, 3]
    manager.close_stream(sid, "done")
    manager.shutdown()


# -- a push of held text that fails ----------------------------------------------------


async def test_a_window_end_that_fails_is_logged_counted_raised_and_sent_again(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses writes (out of memory) when the window ends: nothing is lost. The
    failure is logged with the stream id, counted, raised by the next push (which sends
    nothing), and the held text goes first with the push after it."""
    settings = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                "REDIS_URL": private_redis.url}  # fmt: skip
    admin = redis.Redis.from_url(private_redis.url)
    with override_settings(STREAMING_APP=settings):
        manager = get_streaming_manager()
        sid = await manager.create_stream(coalesce_ms=20)
        client = await reader(manager, sid)
        await manager.push_chunk(sid, delta(sid, "a"))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write refused from now on
        with caplog.at_level(logging.WARNING, logger="streaming_app.coalesce"):
            await manager.push_chunk(sid, delta(sid, "b"))
            await manager.push_chunk(sid, delta(sid, "c"))
            await eventually(lambda: manager.stats["coalesce_flush_failures"] == 1)
        assert any(sid in r.getMessage() and "not pushed" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        admin.config_set("maxmemory", 0)
        with pytest.raises(StreamError) as info:
            await manager.push_chunk(sid, delta(sid, "d"))  # the failure, raised once
        assert info.value.code is GMIErrorCode.BACKEND_UNAVAILABLE
        await manager.push_chunk(sid, FinalResponseChunk(stream_id=sid, final_response_text="x"))
        await manager.close_stream(sid, "done")
        await eventually(lambda: client.closed_reasons == ["done"])
        assert segments(client.chunks) == ["abc", ("final_response",)]  # "d" was refused
        assert manager.stats["coalesce_flush_failures"] == 1
        await manager.shutdown()
    admin.close()


async def test_held_text_of_a_stream_closed_meanwhile_is_logged_and_counted(
    manager: StreamingManager, caplog: pytest.LogCaptureFixture
) -> None:
    sid = await manager.create_stream(coalesce_ms=20)
    await manager.push_chunk(sid, delta(sid, "a"))
    await manager.push_chunk(sid, delta(sid, "b"))
    await manager.history.close(sid, "cancelled")  # as a client's cancel in another process
    with caplog.at_level(logging.WARNING, logger="streaming_app.coalesce"):
        await eventually(lambda: manager.stats["coalesce_flush_failures"] == 1)
    assert any(sid in r.getMessage() for r in caplog.records)
    with pytest.raises(StreamError) as info:
        await manager.push_chunk(sid, delta(sid, "c"))
    assert info.value.code is GMIErrorCode.STREAM_CLOSED
    assert sid not in manager.coalescer.streams  # nothing kept for a closed stream
    scraped = {f.name: f for f in ManagerCollector(manager, Snapshot(0, {}, [])).collect()}
    assert scraped["streaming_coalesce_flush_failures"].samples[0].value == 1
    assert scraped["streaming_text_deltas_held"].samples[0].value == 1
