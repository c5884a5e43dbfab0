"""Prometheus metrics of this worker, built on ``prometheus_client``.

Each worker process serves its own ``GET /streams/metrics`` (scrape every worker, as
Prometheus does with one target per process; no multiprocess mode, no shared files).
The manager's tallies (``manager.stats``) are read at scrape time, and gauges computed then
(active streams from the database, this worker's clients, their lag); what the transports
count (chunks delivered, gap frames, refusals), the latencies and the sweeper's pass times
are counted or observed where they happen (process-wide, in :data:`REGISTRY`).

Guarded, never open by default: a request needs ``Authorization: Bearer <METRICS_TOKEN>``
(when that setting is set) or a signed-in user with the permission "Can view streaming
metrics" (``streaming_app.view_metrics``); anyone else gets 403.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .conf import app_settings
from .models import Stream
from .protocol import CloseCode
from .registry import database_sync_to_async, gathered

if TYPE_CHECKING:
    from .manager import StreamingManager

VIEW_METRICS_PERMISSION = "streaming_app.view_metrics"

# Histograms observed where things happen; one set per process.
REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)  # fmt: skip


class Seconds:
    """One histogram's numbers, kept plain: a count per bucket (+Inf last), then the sum.
    ``prometheus_client``'s Histogram takes a lock and checks the metric on every call, a
    few microseconds on a hot path; these are bumped on the event loop and exported at
    scrape time."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: list[float] = [0] * (len(LATENCY_BUCKETS) + 2)

    def observe(self, seconds: float) -> None:
        counts = self.counts
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative = itertools.accumulate(self.counts[:-1])
        bounds = [*map(_bound, LATENCY_BUCKETS), "+Inf"]
        family.add_metric(labels, list(zip(bounds, cumulative, strict=True)),
                          sum_value=self.counts[-1])  # fmt: skip


class PushSeconds(Collector):
    """``streaming_push_seconds``: how long each push took in the producer."""

    def __init__(self) -> None:
        self.seconds = Seconds()
        self.observe = self.seconds.observe

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(
            "streaming_push_seconds", "push_chunk duration in the producer (append and publish)"
        )
        self.seconds.add_to(family, [])
        yield family


class Deliveries(Collector):
    """What the transports count for every frame they write: chunk frames, and the time from
    ``push_chunk`` to the write, by transport. Plain numbers (see :class:`Seconds`),
    exported as ``streaming_chunks_delivered`` and ``streaming_delivery_seconds``."""

    def __init__(self, transports: Iterable[str]) -> None:
        self.delivered: dict[str, int] = {}
        self.latency: dict[str, Seconds] = {}
        for transport in transports:
            self._add(transport)

    def _add(self, transport: str) -> None:
        self.delivered[transport] = 0
        self.latency[transport] = Seconds()

    def count(self, transport: str) -> None:
        if transport not in self.delivered:
            self._add(transport)
        self.delivered[transport] += 1

    def observe(self, transport: str, seconds: float) -> None:
        latency = self.latency.get(transport)
        if latency is None:
            self._add(transport)
            latency = self.latency[transport]
        latency.observe(seconds)

    def collect(self) -> Iterator[Any]:
        delivered = CounterMetricFamily("streaming_chunks_delivered",
                                        "Chunk frames written to this worker's clients",
                                        labels=["transport"])  # fmt: skip
        for transport, count in self.delivered.items():
            delivered.add_metric([transport], count)
        yield delivered
        latency = HistogramMetricFamily("streaming_delivery_seconds",
                                        "From push_chunk to the frame written to a client",
                                        labels=["transport"])  # fmt: skip
        for transport, seconds in self.latency.items():
            seconds.add_to(latency, [transport])
        yield latency


class DatabaseTrips(Collector):
    """``streaming_database_trips`` and ``streaming_database_trip_calls``: the trips to the
    database's thread that client registrations, removals and the auth stack's user lookups
    took, and the calls they carried (:class:`~streaming_app.registry.Gathered`); calls per
    trip is how many of them shared a thread hop."""

    def collect(self) -> Iterator[Any]:
        for name, text, count in (
            ("trips", "Trips to the database thread of gathered calls", gathered.trips),
            ("trip_calls", "Calls those trips carried (clients, users)", gathered.calls),
        ):
            family = CounterMetricFamily(f"streaming_database_{name}", text)
            family.add_metric([], count)
            yield family


def _bound(value: float) -> str:
    return repr(float(value))


GAP_FRAMES = Counter(
    "streaming_gap_frames", "Gap frames sent (history no longer held the chunks)",
    registry=REGISTRY,
)  # fmt: skip
REFUSALS = Counter(
    "streaming_refusals", "Clients refused or failed with an error frame, by close code",
    ["code"], registry=REGISTRY,
)  # fmt: skip
SNAPSHOTS = Counter(
    "streaming_snapshots", "Snapshot frames sent to clients that joined far behind",
    ["transport"], registry=REGISTRY,
)  # fmt: skip
TOO_FAR_BEHIND = Counter(
    "streaming_clients_too_far_behind", "Clients sent off (4013) for not reading or acking",
    ["transport"], registry=REGISTRY,
)  # fmt: skip
# Every label value known up front is exported from the start (0, not absent).
TRANSPORTS = ("websocket", "sse", "ag-ui", "ai-sdk", "python")
DELIVERIES = Deliveries(TRANSPORTS)
REGISTRY.register(DELIVERIES)
PUSH_SECONDS = PushSeconds()
REGISTRY.register(PUSH_SECONDS)
REGISTRY.register(DatabaseTrips())
for _transport in TRANSPORTS:
    TOO_FAR_BEHIND.labels(_transport)
    SNAPSHOTS.labels(_transport)
for _code in CloseCode:
    if _code >= 4400:  # the refusals and failures: error frame, then this close code
        REFUSALS.labels(str(int(_code)))
SWEEP_SECONDS = Histogram(
    "streaming_sweep_seconds", "Duration of one sweeper pass of this worker",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
LAG_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

# manager.stats keys exported as counters: name, help.
COUNTERS = {
    "streams_created": "Streams created by this process",
    "streams_refused": "Streams refused by a limit (429)",
    "streams_closed": "Streams closed by this process",
    "clients_registered": "Clients registered in this process",
    "chunks_pushed": "Chunks pushed by this process",
    "clients_nudged": "Clients nudged by the sweeper (they had fallen behind)",
    "clients_reaped": "Clients of dead workers removed by this worker's sweeper",
    "text_deltas_held": "Text deltas held by this process to be merged (COALESCE_TEXT_MS)",
    "coalesce_flush_failures": "Pushes of held text deltas that failed (logged; raised later)",
}


class Snapshot:
    """What is measured at scrape time: it needs awaiting, so it is taken before rendering."""

    def __init__(
        self, active_streams: int, clients: dict[str, int], lags: list[int], paused: int = 0
    ) -> None:
        self.active_streams = active_streams
        self.clients = clients
        self.lags = lags
        self.paused = paused


@database_sync_to_async
def _active_streams() -> int:
    return Stream.objects.filter(status=Stream.Status.ACTIVE).count()


async def take_snapshot(manager: StreamingManager) -> Snapshot:
    followers = list(manager.worker.followers.values())
    clients = dict.fromkeys(TRANSPORTS, 0)
    for follower in followers:
        clients[follower.transport] = clients.get(follower.transport, 0) + 1
    states = await manager.history.states({f.stream_id for f in followers})
    lags = [
        max(0, states[f.stream_id].head_seq - f.read_seq)
        for f in followers
        if f.stream_id in states
    ]
    paused = sum(1 for f in followers if f.paused)
    return Snapshot(await _active_streams(), clients, lags, paused)


class ManagerCollector(Collector):
    """The manager's tallies and a snapshot, as metric families."""

    def __init__(self, manager: StreamingManager, snapshot: Snapshot) -> None:
        self.manager = manager
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        stats, snapshot = self.manager.stats, self.snapshot
        for key, text in COUNTERS.items():
            yield CounterMetricFamily(f"streaming_{key}", text, value=stats[key])
        failures = CounterMetricFamily("streaming_send_failures", "Failed sends to clients",
                                       labels=["policy"])  # fmt: skip
        policy = self.manager.config.on_client_send_error_behavior
        failures.add_metric([policy], stats["send_failures"])
        yield failures
        yield CounterMetricFamily(
            "streaming_history_evicted_chunks",
            "Chunks MemoryHistory dropped to stay within HISTORY_MAX_TOTAL_BYTES",
            value=getattr(self.manager.history, "evicted", 0),
        )
        yield GaugeMetricFamily("streaming_active_streams", "Active streams (all workers)",
                                value=snapshot.active_streams)  # fmt: skip
        clients = GaugeMetricFamily("streaming_clients", "This worker's clients",
                                    labels=["transport"])  # fmt: skip
        for transport, count in sorted(snapshot.clients.items()):
            clients.add_metric([transport], count)
        yield clients
        yield GaugeMetricFamily(
            "streaming_clients_paused",
            "This worker's clients paused by flow control (their window of unacked chunks is full)",
            value=snapshot.paused,
        )
        buckets, total = [], 0
        for bound in LAG_BUCKETS:
            buckets.append((str(bound), sum(1 for lag in snapshot.lags if lag <= bound)))
        buckets.append(("+Inf", len(snapshot.lags)))
        total = sum(snapshot.lags)
        yield HistogramMetricFamily(
            "streaming_client_lag_chunks",
            "This worker's clients' lag (head seq - acked, or - written when it does not ack)",
            buckets=buckets, sum_value=total,
        )  # fmt: skip
        yield from REGISTRY.collect()


def render(manager: StreamingManager, snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ManagerCollector(manager, snapshot))
    return generate_latest(registry)


async def allowed(request: HttpRequest) -> bool:
    token = str(app_settings.get("METRICS_TOKEN") or "")
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and constant_time_compare(header[7:], token):
        return True
    user = await request.auser()
    return bool(user.is_active and await user.ahas_perm(VIEW_METRICS_PERMISSION))


@never_cache
@require_GET
async def metrics(request: HttpRequest) -> HttpResponse:
    """This worker's metrics in Prometheus' text format; 403 without the token or permission."""
    from .manager import get_streaming_manager

    if not await allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    manager = get_streaming_manager()
    snapshot = await take_snapshot(manager)
    return HttpResponse(render(manager, snapshot), content_type=CONTENT_TYPE_LATEST)
