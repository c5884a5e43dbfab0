"""Wiring agents into streams: run_agent, stream_text (async and sync) and the local agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from streaming_app.agents import (
    COMPLETE_REASON,
    get_agent,
    local_agent,
    run_agent,
    stream_text,
    stream_text_sync,
)
from streaming_app.chunks import (
    AgentOSResponse,
    ChunkType,
    ErrorChunk,
    FinalResponseChunk,
    TextDeltaChunk,
)
from streaming_app.manager import StreamingManager
from streaming_app.models import Stream

from .conftest import RecordingClient, eventually

pytestmark = pytest.mark.django_db(transaction=True)


async def tokens(*texts: str, fail_after: int | None = None) -> AsyncIterator[str]:
    for index, text in enumerate(texts):
        if fail_after is not None and index == fail_after:
            raise TimeoutError("the model stopped answering")
        await asyncio.sleep(0)
        yield text


async def watched(manager: StreamingManager) -> tuple[str, RecordingClient]:
    stream_id = await manager.create_stream()
    client = RecordingClient("tab")
    await manager.register_client(stream_id, client)
    return stream_id, client


async def test_stream_text_pipes_tokens_then_a_final_response_then_closes(
    manager: StreamingManager,
) -> None:
    stream_id, client = await watched(manager)
    assert await stream_text(stream_id, tokens("Hel", "lo", "!"), persona_id="p1") is True
    await eventually(lambda: client.closed_reasons == [COMPLETE_REASON])
    assert client.texts == ["Hel", "lo", "!"]
    final = client.chunks[-1]
    assert isinstance(final, FinalResponseChunk)
    assert (final.final_response_text, final.persona_id) == ("Hello!", "p1")


async def test_an_agent_error_becomes_one_error_chunk_and_a_close(
    manager: StreamingManager,
) -> None:
    stream_id, client = await watched(manager)
    assert await stream_text(stream_id, tokens("a", "b", "c", fail_after=2)) is False
    await eventually(lambda: client.closed_reasons)
    assert client.texts == ["a", "b"]
    errors = [c for c in client.chunks if isinstance(c, ErrorChunk)]
    assert [(e.code, e.message) for e in errors] == [
        ("TimeoutError", "the model stopped answering")
    ]
    assert client.closed_reasons == ["Error: the model stopped answering"]


async def test_a_close_stops_the_agent_at_once_even_while_it_waits(
    manager: StreamingManager,
) -> None:
    stream_id, client = await watched(manager)
    stopped = asyncio.Event()

    async def slow_model() -> AsyncIterator[AgentOSResponse]:
        try:
            yield TextDeltaChunk(stream_id=stream_id, text_delta="thinking")
            await asyncio.Event().wait()  # a model that never answers again
            yield TextDeltaChunk(stream_id=stream_id, text_delta="never")
        finally:
            stopped.set()

    agent = asyncio.create_task(run_agent(stream_id, slow_model()))
    await eventually(lambda: client.texts == ["thinking"])
    await manager.close_stream(stream_id, "cancelled")
    assert await asyncio.wait_for(agent, 2) is False
    assert stopped.is_set()
    assert (await Stream.objects.aget(pk=stream_id)).close_reason == "cancelled"


async def test_stream_text_sync_serves_synchronous_producers(manager: StreamingManager) -> None:
    stream_id, client = await watched(manager)
    done = await sync_to_async(stream_text_sync)(stream_id, iter(["x", "y"]))
    assert done is True
    await eventually(lambda: client.closed_reasons == [COMPLETE_REASON])
    assert client.texts == ["x", "y"]


async def test_the_local_agent_exercises_the_chunk_types(manager: StreamingManager) -> None:
    stream_id, client = await watched(manager)
    assert await run_agent(stream_id, local_agent("one two", stream_id, delay=0)) is True
    await eventually(lambda: client.closed_reasons)
    kinds = {c.type for c in client.chunks}
    assert kinds == set(ChunkType) - {ChunkType.ERROR}  # errors come from run_agent
    final = client.chunks[-1]
    assert isinstance(final, FinalResponseChunk)
    assert "".join(client.texts) == final.final_response_text


def fixed_agent(message: str, stream_id: str) -> AsyncIterator[AgentOSResponse]:
    return local_agent(message.upper(), stream_id, delay=0)


def test_the_agent_is_pluggable_by_setting() -> None:
    assert get_agent() is local_agent
    with override_settings(STREAMING_APP={"AGENT": "tests.test_agents.fixed_agent"}):
        assert get_agent() is fixed_agent
