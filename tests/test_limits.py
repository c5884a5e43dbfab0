"""Fair shares: one visitor cannot take every stream, and a refusal tells nothing of others."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, override_settings

from streaming_app.agents import _running
from streaming_app.exceptions import GMIErrorCode, StreamError
from streaming_app.manager import get_streaming_manager
from streaming_app.models import Stream

pytestmark = pytest.mark.django_db(transaction=True)

# Turns that stay open (a 60 s silence) until the test closes them.
SLOW = {"AGENT": "tests.slow_agent.agent"}


async def start(client: AsyncClient) -> Any:
    return await client.post("/api/turns/", {"message": "60"}, content_type="application/json")


async def close_all() -> None:
    """Close whatever the test left open (while its settings hold: the manager is the
    views'), and wait for the agents to stop."""
    manager = get_streaming_manager()
    for stream_id in await manager.get_active_stream_ids():
        await manager.close_stream(stream_id, "test over")
    await asyncio.gather(*_running)


async def visitor() -> AsyncClient:
    client = AsyncClient()
    await client.get("/")
    return client


async def signed_in(username: str, **fields: Any) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(await User.objects.acreate(username=username, **fields))
    return client


@override_settings(
    STREAMING_APP={
        **SLOW,
        "MAX_CONCURRENT_STREAMS": 7,
        "MAX_STREAMS_PER_SESSION": 2,
        "MAX_STREAMS_PER_OWNER": 3,
    }
)
async def test_one_visitor_cannot_take_every_stream() -> None:
    try:
        await one_visitor_cannot_take_every_stream()
    finally:
        await close_all()


async def one_visitor_cannot_take_every_stream() -> None:
    attacker = await visitor()
    answers = [await start(attacker) for _ in range(45)]
    assert [a.status_code for a in answers] == [201, 201] + [429] * 43
    refusal = answers[2].json()
    assert refusal["code"] == "RATE_LIMIT_EXCEEDED"
    assert refusal["details"] == {"limit": "max_streams_per_session", "active": 2, "max": 2}
    # Everyone else still gets their share: another visitor, a superuser, a user.
    assert (await start(await visitor())).status_code == 201
    admin = await signed_in("root", is_superuser=True, is_staff=True)
    assert [(await start(admin)).status_code for _ in range(4)] == [201, 201, 201, 429]
    assert (await start(admin)).json()["details"]["limit"] == "max_streams_per_owner"
    assert (await start(await signed_in("ada"))).status_code == 201
    # Now the site is full (2 + 1 + 3 + 1): the refusal reveals no count, no one's streams.
    full = await start(await visitor())
    assert full.status_code == 429
    body = full.json()
    assert body["details"] == {"limit": "max_concurrent_streams", "retry_after": 5}
    assert full["Retry-After"] == "5"
    assert not re.search(r"\d", body["message"]), body["message"]
    assert await Stream.objects.filter(status="active").acount() == 7


@override_settings(STREAMING_APP={**SLOW, "MAX_NEW_STREAMS_PER_MINUTE": 3})
async def test_starting_turns_is_rate_limited() -> None:
    try:
        await starting_turns_is_rate_limited()
    finally:
        await close_all()


async def starting_turns_is_rate_limited() -> None:
    client = await visitor()
    manager = get_streaming_manager()
    for _ in range(3):  # each ends before the next: the active limit is never the reason
        answer = await start(client)
        assert answer.status_code == 201
        await manager.close_stream(answer.json()["stream_id"], "done")
    refused = await start(client)
    assert refused.status_code == 429
    assert refused.json()["details"]["limit"] == "max_new_streams_per_minute"
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert (await start(await visitor())).status_code == 201  # per visitor, not per site


@override_settings(
    STREAMING_APP={
        "MAX_STREAMS_PER_OWNER": 1,
        "MAX_STREAMS_PER_SESSION": 1,
        "MAX_NEW_STREAMS_PER_MINUTE": 1,
    }
)
async def test_streams_of_the_application_meet_only_the_global_limit() -> None:
    manager = get_streaming_manager()
    ids = [await manager.create_stream() for _ in range(3)]  # a task's, a script's: no owner
    assert len(set(ids)) == 3
    await manager.create_stream(session_key="visitor-one")
    with pytest.raises(StreamError) as info:
        await manager.create_stream(session_key="visitor-one")
    assert info.value.code is GMIErrorCode.RATE_LIMIT_EXCEEDED
    await manager.create_stream(session_key="visitor-two")
    await manager.shutdown()


@override_settings(STREAMING_APP={"MAX_STREAMS_PER_OWNER": 4})
async def test_concurrent_creates_of_one_owner_stop_exactly_at_its_limit() -> None:
    user = await User.objects.acreate(username="eager")
    manager = get_streaming_manager()
    results = await asyncio.gather(*(manager.create_stream(owner=user) for _ in range(12)),
                                   return_exceptions=True)  # fmt: skip
    assert sum(isinstance(r, str) for r in results) == 4
    assert {r.code for r in results if isinstance(r, StreamError)} == {
        GMIErrorCode.RATE_LIMIT_EXCEEDED
    }
    await manager.shutdown()
