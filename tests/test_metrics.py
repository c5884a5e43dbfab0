"""``GET /streams/metrics``: guarded, and exact — scraped from two real workers while a
stream runs, the counters move by what was pushed and delivered."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import AsyncClient, override_settings
from prometheus_client.parser import text_string_to_metric_families

from .servers import DaphneServer, read_frames, with_settings
from .test_daphne import start_turn

TOKEN = "metrics-token-of-the-tests-0123456789abcdef"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server: DaphneServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    request = urllib.request.Request(server.http_url + "/streams/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        return samples(answer.read().decode())


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.database_independent  # counters, not rows: the SQLite pass runs it
async def test_counters_of_two_workers_move_by_what_was_pushed_and_delivered(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = with_settings(env, METRICS_TOKEN=TOKEN)
    with (
        DaphneServer(env, log=tmp_path / "a.log") as a,
        DaphneServer(env, log=tmp_path / "b.log") as b,
    ):
        before = {a: scrape(a), b: scrape(b)}
        # The agent runs in worker a; one client follows on a, two on b.
        stream_id, cookie = await asyncio.to_thread(start_turn, a, "one two three four five")

        async def follow(server: DaphneServer) -> list[dict[str, Any]]:
            async with websockets.connect(
                f"{server.ws_url}/ws/streams/{stream_id}/",
                additional_headers={"Cookie": cookie, "Origin": server.http_url},
            ) as ws:
                return await read_frames(ws)

        followed = await asyncio.gather(follow(a), follow(b), follow(b))
        after = {a: scrape(a), b: scrape(b)}
    counts = [sum(1 for f in frames if f["type"] == "chunk") for frames in followed]
    pushed = counts[0]
    assert pushed > 5 and counts == [pushed] * 3  # each client: every chunk, once

    def moved(server: DaphneServer, name: str, **labels: str) -> float:
        return value(after[server], name, **labels) - value(before[server], name, **labels)

    assert moved(a, "streaming_chunks_pushed_total") == pushed
    assert moved(b, "streaming_chunks_pushed_total") == 0
    assert moved(a, "streaming_streams_created_total") == 1
    assert moved(a, "streaming_chunks_delivered_total", transport="websocket") == pushed
    assert moved(b, "streaming_chunks_delivered_total", transport="websocket") == 2 * pushed
    assert moved(a, "streaming_push_seconds_count") == pushed
    assert moved(b, "streaming_delivery_seconds_count", transport="websocket") > 0
    # b's database calls: each socket's user (they carry the session) and registration (its
    # removal may still be on its way); the scrape has no session, so its user took none.
    # Trips carried them, at most one each.
    calls = moved(b, "streaming_database_trip_calls_total")
    trips = moved(b, "streaming_database_trips_total")
    assert 4 <= calls <= 6 and 1 <= trips <= calls
    assert value(after[a], "streaming_clients", transport="websocket") == 0  # all gone
    assert value(after[a], "streaming_active_streams") == 0


@pytest.mark.django_db(transaction=True)
async def test_metrics_are_never_open_by_default() -> None:
    assert (await AsyncClient().get("/streams/metrics")).status_code == 403
    staff = await User.objects.acreate_user("staff", password="pw", is_staff=True)
    client = AsyncClient()
    await client.aforce_login(staff)
    assert (await client.get("/streams/metrics")).status_code == 403  # is_staff is not enough
    permission = await Permission.objects.aget(codename="view_metrics")
    await sync_to_async(staff.user_permissions.add)(permission)
    allowed = await client.get("/streams/metrics")
    assert allowed.status_code == 200
    assert "streaming_active_streams" in allowed.content.decode()

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    anonymous = AsyncClient()
    assert (await anonymous.get("/streams/metrics", headers=bearer(TOKEN))).status_code == 403
    with override_settings(STREAMING_APP={"METRICS_TOKEN": TOKEN}):
        right = await anonymous.get("/streams/metrics", headers=bearer(TOKEN))
        assert right.status_code == 200
        wrong = await anonymous.get("/streams/metrics", headers=bearer(TOKEN[:-1] + "x"))
        assert wrong.status_code == 403


DASHBOARD = Path(__file__).resolve().parent.parent / "streaming_app/contrib/grafana-dashboard.json"


@pytest.mark.django_db(transaction=True)
async def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    with override_settings(STREAMING_APP={"METRICS_TOKEN": TOKEN}):
        exposed = (await AsyncClient().get(
            "/streams/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )).content.decode()  # fmt: skip
    names = {name for (name, _labels) in samples(exposed)}  # with _total, _bucket, _sum...
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {m for expr in exprs for m in re.findall(r"\bstreaming_[a-z_]+", expr)}
    assert len(used) >= 15, used
    missing = used - names
    assert not missing, missing


def test_deliveries_export_as_prometheus_counts_them() -> None:
    """The per-delivery tallies (plain integers) read as a Counter and a Histogram would: a
    latency on a bucket's bound is in that bucket, buckets are cumulative, a transport not
    known up front is added."""
    from prometheus_client import CollectorRegistry, generate_latest

    from streaming_app.metrics import Deliveries

    deliveries = Deliveries(["websocket"])
    for seconds in (0.0005, 0.0006, 0.004, 42.0):
        deliveries.observe("websocket", seconds)
    deliveries.count("websocket")
    deliveries.count("custom")
    registry = CollectorRegistry()
    registry.register(deliveries)
    exported = samples(generate_latest(registry).decode())

    def bucket(le: str) -> float:
        return exported[("streaming_delivery_seconds_bucket",
                         (("le", le), ("transport", "websocket")))]  # fmt: skip

    assert [bucket("0.0005"), bucket("0.001"), bucket("0.005"), bucket("10.0"),
            bucket("+Inf")] == [1, 2, 3, 3, 4]  # fmt: skip
    assert exported[("streaming_delivery_seconds_count", (("transport", "websocket"),))] == 4
    assert exported[("streaming_delivery_seconds_sum", (("transport", "websocket"),))] == (
        pytest.approx(42.0051)
    )
    assert exported[("streaming_chunks_delivered_total", (("transport", "websocket"),))] == 1
    assert exported[("streaming_chunks_delivered_total", (("transport", "custom"),))] == 1
