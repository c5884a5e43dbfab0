"""Background work of a serving process, every ``SWEEP_INTERVAL_SECONDS``.

One pass has two parts. This worker's own: its heartbeat (one row per worker, its clients'
positions in one bulk update) and nudges for its clients that fell behind. The cluster's:
clients of workers that stopped sending heartbeats reaped, activity copied from the history
onto the rows (in bulk), streams idle past their timeout closed, closes that stopped half-way
finished. With a shared history (Redis) the cluster's part is done by one worker at a time,
the holder of the ``sweeper`` lease (a database row it renews each pass; when it stops, or
stops renewing for ``LEASE_PASSES`` passes, another takes over). With a process-local history
each process sweeps its own streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from . import metrics
from .conf import app_settings
from .exceptions import StreamError
from .history import StreamState

if TYPE_CHECKING:
    from .manager import StreamingManager

logger = logging.getLogger(__name__)

LEASE = "sweeper"
# The lease outlives this many missed passes of its holder before another worker takes it.
LEASE_PASSES = 3


@dataclass
class SweepReport:
    """What one sweep did: streams closed for inactivity, dead clients removed, closes
    finished."""

    closed_idle: list[str] = field(default_factory=list)
    reaped_clients: list[tuple[str, str]] = field(default_factory=list)
    finished_closes: list[str] = field(default_factory=list)
    cluster: bool = True  # whether this pass did the cluster's part (held the lease)


class Sweeper:
    """Runs :meth:`sweep` in a task of its own; started by the manager, stopped at shutdown."""

    def __init__(self, manager: StreamingManager) -> None:
        self.manager = manager
        self._task: asyncio.Task[None] | None = None
        self._recorded_heads: dict[str, int] = {}
        # Since when this worker's heartbeats have succeeded without a break. After an outage
        # (the database was unreachable) the others' heartbeats failed too: their clients are
        # not reaped until they had the time to send one.
        self._healthy_since: float | None = float("-inf")
        # When the loop last finished a pass (or started): what the health check looks at.
        self.last_pass_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop in the running event loop, unless it runs already."""
        if not self.running:
            self.last_pass_at = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="streaming-sweeper"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(app_settings.SWEEP_INTERVAL_SECONDS)
            try:
                with metrics.SWEEP_SECONDS.time():
                    await self.sweep(background=True)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("streaming sweeper of worker %s failed", self.manager.worker_id)
            else:
                self.last_pass_at = time.monotonic()

    async def sweep(self, *, dry_run: bool = False, background: bool = False) -> SweepReport:
        """One pass. With ``dry_run`` nothing changes; the report says what would be done.
        ``background`` (the sweeper's own loop): the cluster's part only with the lease; an
        explicit pass (a command, a test) does it anyway (every step is idempotent)."""
        manager = self.manager
        report = SweepReport()
        if not dry_run:
            try:
                await manager.worker.heartbeat()
            except Exception:
                self._healthy_since = None
                raise
            if self._healthy_since is None:
                self._healthy_since = time.monotonic()
        if background and manager.history.shared:
            ttl = timedelta(seconds=LEASE_PASSES * app_settings.SWEEP_INTERVAL_SECONDS)
            report.cluster = await manager.registry.acquire_lease(LEASE, manager.worker_id, ttl)
        states: dict[str, StreamState] = {}
        if report.cluster:
            states = await self._sweep_cluster(report, dry_run=dry_run)
        if dry_run:
            return report
        await manager.worker.nudge_stragglers(states)
        manager.history.expire_closed()
        return report

    async def _sweep_cluster(self, report: SweepReport, *, dry_run: bool) -> dict[str, StreamState]:
        """The cluster's part; the history's state of every active stream (the nudges that
        follow read only the streams that are not among them)."""
        manager = self.manager
        config = manager.config
        timeout = app_settings.CLIENT_TIMEOUT_SECONDS
        if dry_run or time.monotonic() - (self._healthy_since or 0.0) >= timeout:
            await self._reap(report, timedelta(seconds=timeout), dry_run=dry_run)
        active = await manager.registry.active_streams()
        states = await manager.history.states(s.id for s in active)
        if not dry_run:
            await self.record_activity([s.id for s in active], states)
        now = time.time()
        for stream in active:
            state = states.get(stream.id)
            if state is not None and state.closed:  # a close under way, or one that stopped
                if now - state.closed_at < timeout:  # its closer may still be at it
                    continue
                report.finished_closes.append(stream.id)
                if not dry_run:
                    logger.warning("stream %s: finishing a close that stopped half-way", stream.id)
                    await manager.close_stream(stream.id, state.close_reason)
                continue
            timeout_ms = stream.inactivity_timeout_ms or config.default_stream_inactivity_timeout_ms
            last = state.last_activity if state else stream.last_activity_at.timestamp()
            if (now - last) * 1000 > timeout_ms:
                report.closed_idle.append(stream.id)
                if not dry_run:
                    await manager.close_stream(
                        stream.id, f"Closed after {timeout_ms / 1000:g} s of inactivity"
                    )
        closed = {*report.closed_idle, *report.finished_closes}  # their states changed since
        return {sid: state for sid, state in states.items() if sid not in closed}

    async def _reap(self, report: SweepReport, older_than: timedelta, *, dry_run: bool) -> None:
        manager = self.manager
        for ref in await manager.registry.reap_dead_clients(
            older_than, alive_worker=manager.worker_id, dry_run=dry_run
        ):
            if dry_run and ref.worker_id == manager.worker_id:
                continue  # a real sweep heartbeats its own clients first: they would stay
            logger.warning(
                "reaped client %s of stream %s: worker %s stopped sending heartbeats",
                ref.client_id, ref.stream_id, ref.worker_id,
            )  # fmt: skip
            report.reaped_clients.append((ref.stream_id, ref.client_id))
            if not dry_run:
                manager.stats["clients_reaped"] += 1
                # On the Redis core layer the group membership outlives the dead process.
                with contextlib.suppress(StreamError):
                    await manager.layer.leave(ref.stream_id, ref.channel_name)

    async def record_activity(
        self, stream_ids: list[str], states: dict[str, StreamState] | None = None
    ) -> None:
        """Copy chunk counts and last activity from the history onto rows that changed."""
        if states is None:
            states = await self.manager.history.states(stream_ids)
        changed = {
            sid: st for sid, st in states.items() if self._recorded_heads.get(sid) != st.head_seq
        }
        if changed:
            await self.manager.registry.record_activity(changed)
            self._recorded_heads.update({sid: st.head_seq for sid, st in changed.items()})

    def forget(self, stream_id: str) -> None:
        self._recorded_heads.pop(stream_id, None)
