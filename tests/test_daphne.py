"""The demo streams through a real Daphne process to a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from http.cookiejar import Cookie, CookieJar
from pathlib import Path
from typing import Any

import pytest
import websockets

from streaming_app.protocol import CloseCode

from .servers import DaphneServer, base_env, manage, migrated_sqlite, read_frames, server_kinds


def start_turn(server: DaphneServer, message: str, *, stale: str = "") -> tuple[str, str]:
    """Open the chat page, post a message; the stream id and the session cookie. ``stale``:
    come with a session cookie of that value (a session that does not exist)."""
    jar = CookieJar()
    if stale:
        jar.set_cookie(Cookie(
            0, "sessionid", stale, None, False, "127.0.0.1", False, False, "/", True, False,
            None, False, None, None, {},
        ))  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(server.http_url + "/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    request = urllib.request.Request(
        server.http_url + "/api/turns/",
        data=json.dumps({"message": message}).encode(),
        headers={"Content-Type": "application/json", "X-CSRFToken": token.group(1),
                 "Referer": server.http_url + "/"},
    )  # fmt: skip
    body = json.loads(opener.open(request).read())
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
    return body["stream_id"], cookie


async def test_reply_streams_token_by_token_through_daphne(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        stream_id, cookie = start_turn(server, "one two three")
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.http_url},
        ) as ws:
            frames = await read_frames(ws)
        assert ws.close_code == 4000, server.log()
    assert frames[0]["type"] == "subscribed"
    chunks = [f for f in frames if f["type"] == "chunk"]
    assert [f["seq"] for f in chunks] == list(range(1, len(chunks) + 1))
    text = "".join(f["chunk"]["text_delta"] for f in chunks if f["chunk"]["type"] == "text_delta")
    final = chunks[-1]["chunk"]
    assert final["type"] == "final_response"
    assert text == final["final_response_text"]
    assert "one two three" in text
    assert frames[-1] == {
        "type": "closed",
        "reason": "Interaction complete.",
        "last_seq": len(chunks),
    }


async def test_a_stale_session_cookie_still_follows_its_own_reply(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    stale = "x" * 32  # e.g. a session that expired, or a cookie from before a database reset
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        stream_id, cookie = start_turn(server, "hello again", stale=stale)
        assert stale not in cookie  # the page gave the visitor a new session
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.http_url},
        ) as ws:
            frames = await read_frames(ws)
        assert ws.close_code == 4000, server.log()
    assert frames[0]["type"] == "subscribed"
    assert frames[-1]["reason"] == "Interaction complete."


async def test_other_session_is_refused(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        stream_id, _ = start_turn(server, "secret")
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Origin": server.http_url},
        ) as ws:
            frames = await read_frames(ws)
        assert ws.close_code == 4404  # as for an id that does not exist: nothing to probe
    assert frames == [{"type": "error", "code": "RESOURCE_NOT_FOUND",
                       "message": f"stream {stream_id!r} does not exist"}]  # fmt: skip


@pytest.mark.parametrize("kind", server_kinds())
async def test_stopping_a_worker_tells_its_clients_to_reconnect(tmp_path: Path, kind: str) -> None:
    """SIGTERM to a worker that has served only WebSockets for a while (no HTTP request for
    more than 3 s): every client gets ``reconnect`` with its cursor and 4012, no row stays.
    Under each ASGI server the README gives a command for."""
    database_url = migrated_sqlite(tmp_path)
    env = base_env(DATABASE_URL=database_url)
    server = DaphneServer(env, log=tmp_path / f"{kind}.log", kind=kind).start()
    try:
        stream_id, cookie = start_turn(server, " ".join(["word"] * 400))  # a long reply
        headers = {"Cookie": cookie, "Origin": server.http_url}
        url = f"{server.ws_url}/ws/streams/{stream_id}/"
        async with (
            websockets.connect(url, additional_headers=headers) as first,
            websockets.connect(url, additional_headers=headers) as second,
        ):
            frames: dict[Any, list[dict[str, Any]]] = {first: [], second: []}
            loop = asyncio.get_running_loop()
            quiet_since = loop.time()  # the last HTTP request was before this
            while loop.time() - quiet_since < 3.5:  # only WebSocket traffic meanwhile
                for ws in (first, second):
                    frames[ws].append(json.loads(await ws.recv()))
            assert frames[first][-1]["type"] == "chunk", "the reply ended too soon"
            server.process.terminate()  # type: ignore[union-attr]  # SIGTERM, as on a deploy
            for ws in (first, second):
                frames[ws] += await read_frames(ws)
        codes = [first.close_code, second.close_code]
        assert codes == [CloseCode.SERVICE_RESTART] * 2, server.log()
        # Uvicorn re-raises the signal once it has shut down (its exit status is -SIGTERM).
        clean = -signal.SIGTERM if kind == "uvicorn" else 0
        assert server.process.wait(10) == clean, server.log()  # type: ignore[union-attr]
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()
    for ws in (first, second):
        chunks = [f["seq"] for f in frames[ws] if f["type"] == "chunk"]
        assert chunks == list(range(1, len(chunks) + 1))
        assert frames[ws][-1] == {"type": "reconnect", "reason": "Server shutting down",
                                  "last_seq": chunks[-1]}  # fmt: skip
    counts = manage("shell", "--no-imports", "-c", "from streaming_app.models import StreamClient;"
                    "print(StreamClient.objects.count())", env=env)  # fmt: skip
    assert counts.stdout.strip() == "0", counts.stderr


async def test_malformed_socket_paths_are_4404_without_a_traceback(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        for path in ("/ws/streams/a%00b/", "/ws/streams/..%2F..%2Fadmin/", "/ws/elsewhere/",
                     "/ws/streams/" + "x" * 300 + "/"):  # fmt: skip
            origin = {"Origin": server.http_url}
            async with websockets.connect(server.ws_url + path, additional_headers=origin) as ws:
                frames = await read_frames(ws)
            assert ws.close_code == CloseCode.NOT_FOUND, (path, frames)
            assert frames[0]["code"] == "RESOURCE_NOT_FOUND"
        log = server.log()
    assert "Traceback" not in log, log
