"""The demo site's views: the chat page and starting a turn."""

from __future__ import annotations

import asyncio

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, override_settings

from streaming_app.agents import _running
from streaming_app.models import Stream

pytestmark = pytest.mark.django_db(transaction=True)


async def finish_turns() -> None:
    await asyncio.gather(*_running)


async def test_the_chat_page_gives_every_visitor_a_session() -> None:
    client = AsyncClient()
    response = await client.get("/")
    assert response.status_code == 200
    assert b'id="composer"' in response.content
    assert b"streaming-client.js" in response.content
    assert "sessionid" in response.cookies


async def test_a_turn_creates_a_stream_owned_by_the_session_and_runs_the_agent() -> None:
    client = AsyncClient()
    await client.get("/")
    response = await client.post("/api/turns/", {"message": "hi there"},
                                 content_type="application/json")  # fmt: skip
    assert response.status_code == 201
    body = response.json()
    assert body["ws_path"] == f"/ws/streams/{body['stream_id']}/"
    stream = await Stream.objects.aget(pk=body["stream_id"])
    assert stream.session_key == client.session.session_key
    assert stream.metadata == {"message": "hi there"}
    await finish_turns()
    stream = await Stream.objects.aget(pk=body["stream_id"])
    assert (stream.status, stream.close_reason) == ("closed", "Interaction complete.")
    assert stream.chunk_count > 10


async def test_a_signed_in_user_owns_the_stream() -> None:
    user = await User.objects.acreate(username="ada")
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.post("/api/turns/", {"message": "x"}, content_type="application/json")
    assert (await Stream.objects.aget(pk=response.json()["stream_id"])).owner_id == user.pk
    await finish_turns()


TOO_LONG = '{"message": "' + "x" * 4001 + '"}'


BAD_BODIES = ["not json", '{"message": ""}', '{"message": 5}', '["x"]', TOO_LONG]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_requests_are_refused(body: str) -> None:
    response = await AsyncClient().post("/api/turns/", body, content_type="application/json")
    assert response.status_code == 400
    assert "error" in response.json()
    assert await Stream.objects.acount() == 0


@override_settings(STREAMING_APP={"MAX_CONCURRENT_STREAMS": 1})
async def test_a_full_site_answers_429() -> None:
    client = AsyncClient()
    first = await client.post("/api/turns/", {"message": "a"}, content_type="application/json")
    second = await client.post("/api/turns/", {"message": "b"}, content_type="application/json")
    assert (first.status_code, second.status_code) == (201, 429)
    assert second.json()["code"] == "RATE_LIMIT_EXCEEDED"
    await finish_turns()


@pytest.mark.parametrize(
    "body",
    [
        b'{"message": "hi\\u0000"}',  # NUL: PostgreSQL's jsonb refuses it
        b'{"message": "hi \\ud800"}',  # a lone surrogate
        b'{"message": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested too deep to parse
    ],
)
async def test_malformed_turns_are_a_400_not_a_500(body: bytes) -> None:
    client = AsyncClient()
    await client.get("/")
    response = await client.post("/api/turns/", body, content_type="application/json")
    assert response.status_code == 400
    assert "error" in response.json()
    assert not await Stream.objects.aexists()
