"""The demo streams through a real Daphne process to a real WebSocket client."""

from __future__ import annotations

import json
import re
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import websockets

from streaming_app.protocol import CloseCode

from .servers import DaphneServer, base_env, manage, migrated_sqlite, read_frames


def start_turn(server: DaphneServer, message: str) -> tuple[str, str]:
    """Open the chat page, post a message; the stream id and the session cookie."""
    jar = CookieJar()
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


async def test_other_session_is_refused(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        stream_id, _ = start_turn(server, "secret")
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Origin": server.http_url},
        ) as ws:
            frames = await read_frames(ws)
        assert ws.close_code == 4403
    assert frames == [{"type": "error", "code": "PERMISSION_DENIED",
                       "message": f"not allowed to use stream {stream_id!r}"}]  # fmt: skip


async def test_stopping_a_worker_tells_its_clients_to_reconnect(tmp_path: Path) -> None:
    database_url = migrated_sqlite(tmp_path)
    env = base_env(DATABASE_URL=database_url)
    server = DaphneServer(env, log=tmp_path / "daphne.log").start()
    try:
        stream_id, cookie = start_turn(server, " ".join(["word"] * 200))  # a long reply
        async with websockets.connect(
            f"{server.ws_url}/ws/streams/{stream_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.http_url},
        ) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "subscribed"
            await ws.recv()  # streaming is under way
            server.process.terminate()  # type: ignore[union-attr]  # SIGTERM, as on a deploy
            frames = await read_frames(ws)
        assert ws.close_code == CloseCode.SERVICE_RESTART, server.log()
    finally:
        server.stop()
    assert frames[-1]["type"] == "reconnect"
    assert frames[-1]["last_seq"] >= 1
    counts = manage("shell", "--no-imports", "-c", "from streaming_app.models import StreamClient;"
                    "print(StreamClient.objects.count())", env=env)  # fmt: skip
    assert counts.stdout.strip() == "0", counts.stderr
