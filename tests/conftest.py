"""Shared fixtures: a fresh manager and channel layer per test, and plain StreamClients."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.layers import channel_layers
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore
from playwright.sync_api import Browser, sync_playwright

from streaming_app import manager as manager_module
from streaming_app.chunks import AgentOSResponse, TextDeltaChunk
from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.routing import websocket_urlpatterns

from .servers import (
    SETTINGS,
    RedisServer,
    base_env,
    create_postgres_database,
    drop_postgres_database,
    migrated_sqlite,
)


@pytest.fixture(autouse=True)
def _fresh_layers_and_manager() -> Iterator[None]:
    """Each test gets its own channel layers and its own manager singleton."""
    channel_layers.backends = {}
    manager_module._manager = None
    yield
    if manager_module._manager is not None:
        manager_module._manager.cancel_background()
    manager_module._manager = None
    channel_layers.backends = {}


@pytest.fixture
async def manager(transactional_db: None) -> AsyncIterator[StreamingManager]:
    """The process's manager, initialized from settings, shut down after the test."""
    mgr = get_streaming_manager()
    yield mgr
    if mgr.is_initialized:
        await mgr.shutdown()


class RecordingClient:
    """A plain StreamClient that records what it is sent; ``fail`` makes sends raise."""

    def __init__(self, client_id: str, *, fail: bool = False, active: bool = True) -> None:
        self._id = client_id
        self.fail = fail
        self.active = active
        self.chunks: list[AgentOSResponse] = []
        self.closed_reasons: list[str | None] = []
        self.close_calls: list[str | None] = []
        self.received = asyncio.Event()

    @property
    def id(self) -> str:
        return self._id

    async def send_chunk(self, chunk: AgentOSResponse) -> None:
        if self.fail:
            raise ConnectionError(f"{self._id} is unreachable")
        self.chunks.append(chunk)
        self.received.set()

    async def notify_stream_closed(self, reason: str | None = None) -> None:
        self.closed_reasons.append(reason)

    def is_active(self) -> bool:
        return self.active

    async def close(self, reason: str | None = None) -> None:
        self.close_calls.append(reason)
        self.active = False

    @property
    def texts(self) -> list[str]:
        return [c.text_delta for c in self.chunks if isinstance(c, TextDeltaChunk)]


def delta(stream_id: str, text: str, **fields: Any) -> TextDeltaChunk:
    return TextDeltaChunk(stream_id=stream_id, text_delta=text, **fields)


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` (sync or async) is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def session_key(transactional_db: None) -> str:
    """The key of a real (database) session, as a browser's cookie would carry."""
    from asgiref.sync import sync_to_async
    from django.contrib.sessions.backends.db import SessionStore

    store = SessionStore()
    await sync_to_async(store.create)()
    assert store.session_key is not None
    return store.session_key


@pytest.fixture
def redis_url(redis_proc: Any) -> str:
    """A URL of this test session's own redis-server (pytest-redis, a free port), emptied."""
    import redis

    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgres"):
        fresh = create_postgres_database(url)
        yield fresh
        drop_postgres_database(fresh)
    else:
        yield migrated_sqlite(tmp_path)


@pytest.fixture
def env(database_url: str, redis_url: str) -> dict[str, str]:
    return base_env(
        DATABASE_URL=database_url, REDIS_URL=redis_url, STREAMING_APP_JSON=json.dumps(SETTINGS)
    )


@pytest.fixture(scope="session", autouse=True)
def _no_lingering_connections(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """At the end, end this process's idle PostgreSQL sessions on the test database (the
    threads ``sync_to_async`` ran ORM calls in keep theirs), so it can be dropped."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND application_name = ''",
            [connection.settings_dict["NAME"]],
        )
    connection.close()


class Peer:
    """A connected WebSocket peer and what it has received."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator

    async def frame(self, timeout: float = 2) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            raise AssertionError(f"socket closed with {output.get('code')}")
        return json.loads(output["text"])  # type: ignore[no-any-return]

    async def frames_until_close(self, timeout: float = 2) -> tuple[list[dict[str, Any]], int]:
        frames: list[dict[str, Any]] = []
        while True:
            output = await self.communicator.receive_output(timeout)
            if output["type"] == "websocket.close":
                return frames, output.get("code", 1000)
            frames.append(json.loads(output["text"]))

    async def send(self, data: Any) -> None:
        await self.communicator.send_to(
            text_data=data if isinstance(data, str) else json.dumps(data)
        )

    async def silent(self) -> bool:
        return bool(await self.communicator.receive_nothing(timeout=0.1))


@pytest.fixture
async def peers() -> AsyncIterator[list[WebsocketCommunicator]]:
    opened: list[WebsocketCommunicator] = []
    yield opened
    for communicator in opened:
        await communicator.disconnect()


@pytest.fixture
def connect(peers: list[WebsocketCommunicator], session_key: str) -> Any:
    async def connect(
        stream_id: str, *, query: str = "", user: Any = None, session: str | None = None
    ) -> Peer:
        path = f"/ws/streams/{stream_id}/" + (f"?{query}" if query else "")
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
        communicator.scope["user"] = user or AnonymousUser()
        communicator.scope["session"] = SessionStore(session_key=session or session_key)
        connected, _ = await communicator.connect()
        assert connected
        peers.append(communicator)
        return Peer(communicator)

    return connect


# Debian's Chromium, headless, as every browser test runs it.
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start again (empty) mid-test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
