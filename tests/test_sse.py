"""Server-Sent Events: the WebSocket's frames as events, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import ApplicationCommunicator
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore
from django.test import override_settings

from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.routing import sse_urlpatterns

from .conftest import delta
from .servers import DaphneServer, base_env, migrated_sqlite, server_kinds
from .test_daphne import start_turn

pytestmark = pytest.mark.django_db(transaction=True)

application = URLRouter(sse_urlpatterns)


def parse(body: bytes) -> list[dict[str, Any]]:
    """SSE events as dicts of their fields (``data`` decoded from JSON)."""
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


class Listener:
    def __init__(self, stream_id: str, session_key: str, headers: list[Any], query: str) -> None:
        scope = {
            "type": "http", "method": "GET", "path": f"/streams/{stream_id}/events",
            "query_string": query.encode(), "headers": headers,
            "user": AnonymousUser(), "session": SessionStore(session_key=session_key),
        }  # fmt: skip
        self.app = ApplicationCommunicator(application, scope)
        self.body = b""

    async def start(self) -> int:
        await self.app.send_input({"type": "http.request", "body": b""})
        start = await self.app.receive_output(2)
        return int(start["status"])

    async def read_until(self, kind: str, timeout: float = 3) -> list[dict[str, Any]]:
        while True:
            message = await self.app.receive_output(timeout)
            self.body += message.get("body", b"")
            events = parse(self.body)
            if any(e["event"] == kind for e in events) or not message.get("more_body"):
                return events


async def listen(
    stream_id: str, session_key: str, *, headers: list[Any] | None = None, query: str = ""
) -> Listener:
    listener = Listener(stream_id, session_key, headers or [], query)
    assert await listener.start() == 200
    return listener


async def test_events_carry_the_websocket_frames_with_seq_ids(
    manager: StreamingManager, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    listener = await listen(stream_id, session_key)
    assert (await listener.read_until("subscribed"))[0]["data"]["seq"] == 0
    assert await manager.get_client_count_for_stream(stream_id) == 1
    for text in ("a", "b"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    await manager.close_stream(stream_id, "done")
    events = await listener.read_until("closed")
    assert [(e["event"], e.get("id")) for e in events] == [
        ("subscribed", None), ("chunk", "1"), ("chunk", "2"), ("closed", None),
    ]  # fmt: skip
    assert events[1]["data"]["chunk"]["text_delta"] == "a"
    assert events[-1]["data"] == {"type": "closed", "reason": "done", "last_seq": 2}
    assert await manager.get_client_count_for_stream(stream_id) == 0


async def test_last_event_id_resumes_without_gap_or_duplicate(
    manager: StreamingManager, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(1, 6):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    listener = await listen(stream_id, session_key, headers=[(b"last-event-id", b"3")])
    await manager.push_chunk(stream_id, delta(stream_id, "6"))
    await manager.close_stream(stream_id, "done")
    events = await listener.read_until("closed")
    assert [e["id"] for e in events if e["event"] == "chunk"] == ["4", "5", "6"]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("unknown", 404, "RESOURCE_NOT_FOUND"),
        ("forbidden", 404, "RESOURCE_NOT_FOUND"),  # ids cannot be probed
        ("bad_last_seq", 400, "INVALID_ARGUMENT"),
        ("full", 429, "RATE_LIMIT_EXCEEDED"),
    ],
)
@override_settings(STREAMING_APP={"MAX_CLIENTS_PER_STREAM": 1})
async def test_refusals_answer_with_the_error_status(
    session_key: str, case: str, status: int, code: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    session, query, first = session_key, "", None
    if case == "unknown":
        stream_id = "nope"
    elif case == "forbidden":
        other = SessionStore()
        await sync_to_async(other.create)()
        session = other.session_key or ""
    elif case == "bad_last_seq":
        query = "last_seq=x"
    elif case == "full":
        first = await listen(stream_id, session_key)  # the stream's one place
        await first.read_until("subscribed")
    listener = Listener(stream_id, session, [], query)
    assert await listener.start() == status
    body = await listener.app.receive_output(2)
    assert json.loads(body["body"])["code"] == code
    if first is not None:
        await first.app.send_input({"type": "http.disconnect"})


async def test_a_closed_stream_replays_then_ends(
    manager: StreamingManager, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    await manager.push_chunk(stream_id, delta(stream_id, "x"))
    await manager.close_stream(stream_id, "over")
    events = await (await listen(stream_id, session_key)).read_until("closed")
    assert [e["event"] for e in events] == ["chunk", "closed"]


@pytest.mark.parametrize("kind", server_kinds())
async def test_sse_follows_a_demo_turn_through_each_server(tmp_path: Path, kind: str) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / f"{kind}.log", kind=kind) as server:
        stream_id, cookie = start_turn(server, "one two three")
        url = f"{server.http_url}/streams/{stream_id}/events"

        def read(headers: dict[str, str]) -> list[dict[str, Any]]:
            request = urllib.request.Request(url, headers={"Cookie": cookie, **headers})
            with urllib.request.urlopen(request, timeout=20) as response:
                assert response.headers["Content-Type"] == "text/event-stream"
                return parse(response.read())

        events = await asyncio.to_thread(read, {})
        resumed = await asyncio.to_thread(read, {"Last-Event-ID": "30"})
    chunks = [e for e in events if e["event"] == "chunk"]
    assert [int(e["id"]) for e in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[-1]["data"]["chunk"]["type"] == "final_response"
    assert events[-1]["data"]["reason"] == "Interaction complete."
    assert [int(e["id"]) for e in resumed if e["event"] == "chunk"] == list(
        range(31, len(chunks) + 1)
    )


@override_settings(STREAMING_APP={"ON_CLIENT_SEND_ERROR_BEHAVIOR": "deregister_client"})
async def test_a_failed_write_follows_the_send_error_policy(session_key: str) -> None:
    from streaming_app.models import StreamClient
    from streaming_app.sse import stream_events

    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if b'"type":"chunk"' in message.get("body", b""):  # a peer whose line broke
            raise ConnectionResetError("write failed")
        sent.append(message)

    disconnect = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": b""}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http", "method": "GET", "path": f"/streams/{stream_id}/events",
        "query_string": b"", "headers": [], "user": AnonymousUser(),
        "session": SessionStore(session_key=session_key),
        "url_route": {"kwargs": {"stream_id": stream_id}},
    }  # fmt: skip
    serving = asyncio.create_task(stream_events(scope, receive, send))
    while await manager.get_client_count_for_stream(stream_id) == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await manager.push_chunk(stream_id, delta(stream_id, "lost"))
    await asyncio.wait_for(serving, 3)  # deregistered: the response ends
    assert await manager.get_client_count_for_stream(stream_id) == 0
    assert manager.stats["send_failures"] == 1
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not await StreamClient.objects.filter(stream_id=stream_id).aexists()
    disconnect.set()


def test_a_host_outside_allowed_hosts_is_refused_like_everywhere_else(tmp_path: Path) -> None:
    """The SSE route is served before Django: it applies ALLOWED_HOSTS itself (real Daphne)."""
    import urllib.error

    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        statuses = {}
        for host in ("evil.example", "127.0.0.1"):
            request = urllib.request.Request(f"{server.http_url}/streams/s-1/events",
                                             headers={"Host": host})  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            statuses[host] = (info.value.code, json.loads(info.value.read())["code"])
            info.value.close()
        page = urllib.request.Request(f"{server.http_url}/", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as django_says:
            urllib.request.urlopen(page, timeout=10)
        django_says.value.close()
    assert statuses == {"evil.example": (400, "INVALID_ARGUMENT"),
                        "127.0.0.1": (404, "RESOURCE_NOT_FOUND")}  # fmt: skip
    assert django_says.value.code == 400  # the same answer as Django's own views
    assert "Host 'evil.example' is not in ALLOWED_HOSTS" in server.log()
