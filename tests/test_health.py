"""``GET /streams/health``: each part checked for real, 503 naming what fails."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.test import AsyncClient

from streaming_app.manager import get_streaming_manager

from .servers import SETTINGS, DaphneServer, RedisServer, base_env


def probe(server: DaphneServer) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.http_url + "/streams/health", timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.django_db(transaction=True)
async def test_a_healthy_worker_answers_200_with_each_part() -> None:
    response = await AsyncClient().get("/streams/health")
    assert response.status_code == 200
    body = response.json()
    assert body["checks"] == {"database": "ok", "history": "ok", "channel_layer": "ok",
                              "sweeper": "ok"}  # fmt: skip
    assert (body["status"], body["failing"], body["clients"]) == ("ok", [], 0)
    assert response["Cache-Control"].startswith("max-age=0")


@pytest.mark.django_db(transaction=True)
async def test_a_sweeper_that_stopped_passing_fails_the_check() -> None:
    await AsyncClient().get("/streams/health")  # starts the sweeper
    sweeper = get_streaming_manager().sweeper
    sweeper.last_pass_at = time.monotonic() - 3600  # as a pass stuck for an hour would leave it
    response = await AsyncClient().get("/streams/health")
    assert response.status_code == 503
    assert response.json()["failing"] == ["sweeper"]
    assert response.json()["checks"]["sweeper"].startswith(
        "failed: RuntimeError: no pass for 3600 s"
    )


def test_redis_going_away_is_a_503_naming_it_and_coming_back_heals(
    tmp_path: Path, database_url: str
) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    env = base_env(DATABASE_URL=database_url, REDIS_URL=redis_server.url,
                   STREAMING_APP_JSON=json.dumps(SETTINGS))  # fmt: skip
    try:
        with DaphneServer(env, log=tmp_path / "daphne.log") as server:
            status, body = probe(server)
            assert (status, body["failing"]) == (200, []), body
            redis_server.stop()
            status, body = probe(server)
            assert status == 503
            assert body["failing"] == ["history", "channel_layer"], body
            assert body["checks"]["database"] == "ok"
            redis_server.start()  # the same port, empty
            for _ in range(50):  # the layer reconnects in the background
                status, body = probe(server)
                if status == 200:
                    break
                time.sleep(0.2)
            assert status == 200, body
        assert "Traceback" not in server.log(), server.log()
    finally:
        redis_server.stop()
