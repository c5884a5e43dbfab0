"""Conversations: turns in order, the agent sees the earlier ones, the page restores them all,
each visitor sees only their own, and they follow the visitor through login."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient

from streaming_app.agents import _running

pytestmark = pytest.mark.django_db(transaction=True)


async def say(client: AsyncClient, message: str, conversation: str | None = None) -> Any:
    body: dict[str, Any] = {"message": message}
    if conversation is not None:
        body["conversation"] = conversation
    return await client.post("/api/turns/", body, content_type="application/json")


async def test_a_conversation_keeps_its_turns_and_the_agent_sees_the_earlier_ones() -> None:
    client = AsyncClient()
    await client.get("/")
    first = (await say(client, "what is the weather")).json()
    await asyncio.gather(*_running)
    second = (await say(client, "and tomorrow", first["conversation"])).json()
    assert second["conversation"] == first["conversation"]
    restored = (await client.get(f"/api/conversations/{first['conversation']}/")).json()
    assert restored["title"] == "what is the weather"
    turns = restored["turns"]
    assert [t["message"] for t in turns] == ["what is the weather", "and tomorrow"]
    assert turns[0]["stream_id"] == first["stream_id"] and not turns[0]["active"]
    assert turns[0]["reply"].startswith("You said 4 words.")  # from its transcript
    assert turns[1]["stream_id"] == second["stream_id"]
    await asyncio.gather(*_running)
    done = (await client.get(f"/api/conversations/{first['conversation']}/")).json()["turns"]
    assert (
        "This is turn 2 of our conversation; you first asked: what is the weather"
        in (done[1]["reply"])
    )
    listed = (await client.get("/api/conversations/")).json()["conversations"]
    assert [c["id"] for c in listed] == [first["conversation"]]


async def test_a_conversation_is_only_its_visitors() -> None:
    owner, stranger = AsyncClient(), AsyncClient()
    await owner.get("/")
    await stranger.get("/")
    started = (await say(owner, "private")).json()
    await asyncio.gather(*_running)
    url = f"/api/conversations/{started['conversation']}/"
    assert (await stranger.get(url)).status_code == 404
    assert (await stranger.get("/api/conversations/nope/")).status_code == 404
    taken = await say(stranger, "mine now", started["conversation"])
    assert taken.status_code == 404  # as for an id that does not exist
    assert (await stranger.get("/api/conversations/")).json() == {"conversations": []}
    assert (await say(owner, "x", conversation=5)).status_code == 400  # type: ignore[arg-type]


async def test_conversations_follow_the_visitor_through_login() -> None:
    await User.objects.acreate_user("ada", password="s3cret-pw", is_staff=True)
    client = AsyncClient()
    await client.get("/")
    started = (await say(client, "before login")).json()
    await asyncio.gather(*_running)
    await client.get("/admin/login/")
    await client.post("/admin/login/", {"username": "ada", "password": "s3cret-pw"})
    listed = (await client.get("/api/conversations/")).json()["conversations"]
    assert [c["id"] for c in listed] == [started["conversation"]]
    continued = await say(client, "after login", started["conversation"])
    assert continued.status_code == 201
    await asyncio.gather(*_running)


async def test_the_conversations_admin_searches_by_what_was_said_with_the_permission() -> None:
    client = AsyncClient()
    await client.get("/")
    started = (await say(client, "tell me about aurora borealis")).json()
    await asyncio.gather(*_running)
    root, staff = AsyncClient(), AsyncClient()
    await root.aforce_login(await User.objects.acreate_superuser("root", password="pw"))
    await staff.aforce_login(await User.objects.acreate_user("ops", is_staff=True))
    url = "/admin/streaming_app/conversation/"
    found = (await root.get(url, {"q": "borealis"})).content.decode()
    assert started["conversation"] in found
    assert started["conversation"] not in (await root.get(url, {"q": "zebra"})).content.decode()
    page = (await root.get(f"{url}{started['conversation']}/change/")).content.decode()
    assert "You said 5 words." in page  # the reply, from the transcript
    assert (await staff.get(url)).status_code == 403  # is_staff is not enough


def test_prune_keeps_a_conversations_streams_until_the_conversation_goes() -> None:
    from datetime import timedelta

    from asgiref.sync import async_to_sync
    from django.core.management import call_command
    from django.utils import timezone

    from streaming_app.conversations import conversation_for, record_turn
    from streaming_app.manager import get_streaming_manager
    from streaming_app.models import Conversation, Stream, StreamTranscript, Turn

    manager = get_streaming_manager()

    def closed_stream(stream_id: str) -> str:
        async_to_sync(manager.create_stream)(stream_id)
        async_to_sync(manager.close_stream)(stream_id, "done")
        return stream_id

    loose, kept = closed_stream("loose"), closed_stream("answered")
    chat = async_to_sync(conversation_for)(None, "a-session-key", None, "old chat")
    assert chat is not None
    async_to_sync(record_turn)(chat, "hello", kept)
    long_ago = timezone.now() - timedelta(days=100)
    Stream.objects.update(closed_at=long_ago)
    Conversation.objects.update(created_at=long_ago)
    Turn.objects.update(created_at=long_ago)

    def prune(*args: str) -> str:
        from io import StringIO

        out = StringIO()
        call_command("streaming_prune", *args, stdout=out)
        return out.getvalue()

    assert prune("--older-than", "7d") == "Deleted 1 closed stream(s).\n"
    assert set(Stream.objects.values_list("pk", flat=True)) == {kept}  # the loose one went
    assert StreamTranscript.objects.filter(stream_id=kept).exists()
    assert prune("--older-than", "7d", "--conversations-older-than", "90d", "--dry-run") == (
        "Would delete 1 closed stream(s) and 1 conversation(s).\n"
    )
    prune("--older-than", "7d", "--conversations-older-than", "90d")
    assert not Stream.objects.exists() and not Conversation.objects.exists()
    assert not Turn.objects.exists() and not StreamTranscript.objects.exists()
    assert loose == "loose"
