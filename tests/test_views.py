"""The demo site's views: the chat page and starting a turn."""

from __future__ import annotations

import asyncio

import pytest
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.test import AsyncClient, override_settings

from streaming_app.agents import _running
from streaming_app.auth import default_can_cancel, default_can_subscribe, session_hash
from streaming_app.manager import get_streaming_manager
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
    key = client.session.session_key
    assert key is not None
    assert stream.session_hash == session_hash(key)  # a keyed hash: the key is stored nowhere
    assert key not in str(await Stream.objects.filter(pk=stream.pk).values().aget())
    assert stream.metadata == {"message": "hi there", "conversation": body["conversation"]}
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


# -- whose stream: sessions are hashed, follow the visitor through login and stale cookies --


async def test_logging_in_keeps_the_visitors_streams_theirs() -> None:
    # Staff only because the demo's one login view is the admin's: any login view does it.
    await User.objects.acreate_user("ada", password="s3cret-pw", is_staff=True)
    client = AsyncClient()
    await client.get("/")
    anonymous_key = client.session.session_key
    started = await client.post("/api/turns/", {"message": "hi"}, content_type="application/json")
    stream_id = started.json()["stream_id"]
    # The real login view: Django gives the visitor a new session key.
    page = await client.get("/admin/login/")
    assert page.status_code == 200
    login = await client.post("/admin/login/", {"username": "ada", "password": "s3cret-pw"})
    assert login.status_code == 302
    new_key = client.session.session_key
    assert new_key != anonymous_key
    stream = await Stream.objects.select_related("owner").aget(pk=stream_id)
    assert stream.owner is not None and stream.owner.username == "ada"
    assert stream.session_hash == ""
    user = await User.objects.aget(username="ada")
    assert default_can_subscribe(user, new_key, stream)
    assert default_can_cancel(user, new_key, stream)
    # The old session key is worth nothing now (it was deleted, and owns nothing).
    assert not default_can_subscribe(AnonymousUser(), anonymous_key, stream)
    await finish_turns()


async def test_a_stale_session_cookie_gets_a_new_session_that_owns_its_turn() -> None:
    client = AsyncClient()
    client.cookies["sessionid"] = "stale0000000000000000000000000000"  # no such session
    page = await client.get("/")
    fresh = page.cookies["sessionid"].value
    assert fresh and fresh != "stale0000000000000000000000000000"
    started = await client.post("/api/turns/", {"message": "hi"}, content_type="application/json")
    stream = await Stream.objects.aget(pk=started.json()["stream_id"])
    assert stream.session_hash == session_hash(fresh)
    assert default_can_subscribe(AnonymousUser(), fresh, stream)
    await finish_turns()


async def test_the_admin_never_shows_a_visitors_session() -> None:
    client = AsyncClient()
    await client.get("/")
    key = client.session.session_key
    assert key is not None
    started = await client.post("/api/turns/", {"message": "hi"}, content_type="application/json")
    stream_id = started.json()["stream_id"]
    await finish_turns()
    staff = AsyncClient()
    await staff.aforce_login(await User.objects.acreate_superuser("root", password="pw"))
    for url in (f"/admin/streaming_app/stream/{stream_id}/change/",
                "/admin/streaming_app/stream/"):  # fmt: skip
        page = (await staff.get(url)).content.decode()
        assert key not in page and session_hash(key) not in page


async def test_a_rotated_secret_key_keeps_anonymous_streams_theirs() -> None:
    stream_id = await get_streaming_manager().create_stream(session_key="visitor-session-key")
    stream = await Stream.objects.aget(pk=stream_id)
    old = settings.SECRET_KEY
    with override_settings(SECRET_KEY="rotated-" + old, SECRET_KEY_FALLBACKS=[old]):
        assert default_can_subscribe(AnonymousUser(), "visitor-session-key", stream)
    with override_settings(SECRET_KEY="rotated-" + old, SECRET_KEY_FALLBACKS=[]):
        assert not default_can_subscribe(AnonymousUser(), "visitor-session-key", stream)
