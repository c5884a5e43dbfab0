"""A worker whose database is unreachable answers 4503 / JSON 503, not HTTP 500 (real Daphne)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import websockets

from streaming_app.protocol import CloseCode

from .servers import DaphneServer, base_env, read_frames

COOKIE = "sessionid=0123456789abcdefghijklmnopqrstuv"  # well-formed: the session is loaded
ERROR = {"type": "error", "code": "BACKEND_UNAVAILABLE", "message": "streaming backend failed"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    directory = tmp_path_factory.mktemp("nodb")
    unreachable = f"sqlite:///{directory}/no/such/directory/db.sqlite3"  # cannot be opened
    with DaphneServer(base_env(DATABASE_URL=unreachable), log=directory / "daphne.log") as running:
        yield running


@pytest.mark.parametrize("cookie", ["", COOKIE])
async def test_a_socket_gets_4503_when_the_database_is_unreachable(
    server: DaphneServer, cookie: str
) -> None:
    """With a session cookie the auth middleware fails first; without one, the consumer."""
    headers = {"Origin": server.http_url, **({"Cookie": cookie} if cookie else {})}
    async with websockets.connect(f"{server.ws_url}/ws/streams/s-1/",
                                  additional_headers=headers) as ws:  # fmt: skip
        frames = await read_frames(ws)
    assert ws.close_code == CloseCode.UNAVAILABLE
    assert frames == [ERROR]


@pytest.mark.parametrize("cookie", ["", COOKIE])
def test_server_sent_events_get_a_json_503_when_the_database_is_unreachable(
    server: DaphneServer, cookie: str
) -> None:
    request = urllib.request.Request(
        f"{server.http_url}/streams/s-1/events", headers={"Cookie": cookie} if cookie else {}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 503
    assert info.value.headers["Content-Type"] == "application/json"
    body = json.loads(info.value.read())
    assert (body["code"], body["message"]) == ("BACKEND_UNAVAILABLE", "streaming backend failed")
    info.value.close()


def test_the_worker_logs_the_failure_with_the_path(server: DaphneServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(
            urllib.request.Request(f"{server.http_url}/streams/s-2/events",
                                   headers={"Cookie": COOKIE}), timeout=10,
        )  # fmt: skip
    info.value.close()
    assert "/streams/s-2/events: streaming backend failed" in server.log()
