"""Is this worker able to serve streams? The database, the history, the channel layer and the
sweeper, each checked for real; what an orchestrator's readiness or liveness probe asks.

``GET /streams/health`` (``streaming_app.urls``) answers 200 with each part's result, or 503
naming the parts that fail. It says nothing about any stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .conf import app_settings
from .registry import database_sync_to_async

if TYPE_CHECKING:
    from .manager import StreamingManager

# Each check may take this long before it counts as failed.
CHECK_TIMEOUT_SECONDS = 3.0


@database_sync_to_async
def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _layer(manager: StreamingManager) -> None:
    """A message sent through the real layer to a group nobody is in (a PUBLISH on Redis
    pub/sub): it reaches the server, and subscribes to nothing that must be cleaned up."""
    await manager.layer.layer.group_send("streaming-health", {"type": "health.ping"})


def _sweeper(manager: StreamingManager) -> None:
    sweeper = manager.sweeper
    if not sweeper.running:
        raise RuntimeError("not running")
    age = time.monotonic() - sweeper.last_pass_at
    allowed = 3 * app_settings.SWEEP_INTERVAL_SECONDS + CHECK_TIMEOUT_SECONDS
    if age > allowed:
        raise RuntimeError(f"no pass for {age:.0f} s (expected every "
                           f"{app_settings.SWEEP_INTERVAL_SECONDS:g} s)")  # fmt: skip


async def _run(check: Callable[[], Awaitable[None]]) -> str:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"failed: no answer within {CHECK_TIMEOUT_SECONDS:g} s"
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"
    return "ok"


async def check_health(manager: StreamingManager) -> dict[str, Any]:
    """Every part's result ("ok" or "failed: why"), this worker's id and client count."""

    async def sweeper() -> None:
        _sweeper(manager)

    async def history() -> None:
        await manager.history.states(["streaming-health-probe"])

    manager.ensure_background()  # a worker that has not served anyone yet still sweeps
    names = ("database", "history", "channel_layer", "sweeper")
    results = await asyncio.gather(
        _run(_database), _run(history), _run(lambda: _layer(manager)), _run(sweeper)
    )
    checks = dict(zip(names, results, strict=True))
    failing = [name for name, result in checks.items() if result != "ok"]
    return {
        "status": "unavailable" if failing else "ok",
        "failing": failing,
        "checks": checks,
        "worker": manager.worker_id,
        "clients": len(manager.worker),
    }


@never_cache
@require_GET
async def health(request: HttpRequest) -> JsonResponse:
    """200 when this worker can serve streams; 503 naming what fails."""
    from .manager import get_streaming_manager

    report = await check_health(get_streaming_manager())
    return JsonResponse(report, status=503 if report["failing"] else 200)
