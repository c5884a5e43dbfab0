"""This process's side of the cluster: the clients it serves, its heartbeat, letting them go.

A :class:`Worker` holds the :class:`~streaming_app.clients.Follower` of every client registered
in this process and is the one place that releases them. Its heartbeat (one row per worker)
tells the others it is alive; it also notices clients whose rows another worker removed
(after a database outage) and sends them off to reconnect, and deletes rows it no longer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING

from django.utils import timezone

from .clients import ChannelBridge, Follower
from .exceptions import StreamError
from .fanout import Fanout
from .history import StreamState
from .protocol import CloseCode
from .registry import Position

if TYPE_CHECKING:
    from .manager import StreamingManager

logger = logging.getLogger(__name__)

SHUTDOWN_REASON = "Server shutting down"
HISTORY_LOST_REASON = "Stream history was lost (the streaming backend restarted)"
REGISTRATION_LOST_REASON = "Registration lost (the database was unreachable); reconnect"

Key = tuple[str, str]

# Every so many heartbeats (one a sweep) read the worker's client rows even when their count
# says nothing changed (a minute at the default SWEEP_INTERVAL_SECONDS).
ROWS_READ_PASSES = 12


class Worker:
    """The clients this process serves, and their release."""

    def __init__(self, manager: StreamingManager) -> None:
        self.manager = manager
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.followers: dict[Key, Follower] = {}
        self.bridges: dict[str, dict[str, ChannelBridge]] = {}
        self.joining: set[Key] = set()  # registrations under way: their rows may exist already
        self._nudge_positions: dict[Key, int] = {}
        self._closed_at_last_sweep: set[str] = set()  # streams whose history was closed then
        self._saved_positions: dict[Key, Position] = {}
        self._beats = 0  # heartbeats sent (the first reads the rows)
        self._fanout: Fanout | None = None

    @property
    def fanout(self) -> Fanout:
        """This process's hubs (one per stream with WebSocket clients here)."""
        if self._fanout is None:
            self._fanout = Fanout(self.manager.layer)
        return self._fanout

    def __len__(self) -> int:
        return len(self.followers)

    def hold(self, follower: Follower, saved: Position) -> None:
        """Take ownership of a registered client; ``saved``: the position its row holds (the
        heartbeat writes a position only when it moved from the one saved)."""
        key = (follower.stream_id, follower.client_id)
        follower.worker = self
        follower.registered = True
        self.followers[key] = follower
        self._saved_positions[key] = saved
        if isinstance(follower, ChannelBridge):
            self.bridges.setdefault(follower.stream_id, {})[follower.client_id] = follower

    def get(self, stream_id: str, client_id: str) -> Follower | None:
        return self.followers.get((stream_id, client_id))

    async def release(self, follower: Follower) -> None:
        """Forget a client and give back its group membership and its row. Failures are
        logged; the heartbeat deletes a row left behind."""
        key = (follower.stream_id, follower.client_id)
        if self.followers.get(key) is follower:
            del self.followers[key]
            self._nudge_positions.pop(key, None)
            self._saved_positions.pop(key, None)
        bridges = self.bridges.get(follower.stream_id)
        if bridges is not None and bridges.get(follower.client_id) is follower:
            del bridges[follower.client_id]
            if not bridges:
                del self.bridges[follower.stream_id]
        manager = self.manager
        if follower.joined:
            follower.joined = False
            with contextlib.suppress(StreamError):
                if follower.hubbed:
                    await self.fanout.leave(follower)
                else:
                    await manager.layer.leave(follower.stream_id, follower.channel_name)
        if follower.registered:
            follower.registered = False
            try:
                await manager.registry.remove_client(follower.stream_id, follower.client_id)
            except Exception:
                logger.exception("client %s of stream %s: its row could not be removed "
                                 "(the next heartbeat removes it)", follower.client_id,
                                 follower.stream_id)  # fmt: skip
        logger.info("client %s left stream %s", follower.client_id, follower.stream_id)

    async def send_failed(self, follower: Follower, exc: BaseException, *, inline: bool) -> None:
        """Apply ``on_client_send_error_behavior`` to a failed send."""
        manager = self.manager
        behavior = manager.config.on_client_send_error_behavior
        manager.stats["send_failures"] += 1
        logger.warning(
            "send to client %s of stream %s failed (%s): %s: %s",
            follower.client_id, follower.stream_id, behavior, type(exc).__name__, exc,
        )  # fmt: skip
        try:
            await manager.registry.add_send_failure(follower.stream_id, follower.client_id)
            if behavior == "deregister_client":
                if follower.registered:
                    follower.registered = False
                    await manager.registry.remove_client(follower.stream_id, follower.client_id)
                await follower.end(CloseCode.DEREGISTERED, "send failed")
            elif behavior == "throw" and not inline:
                await manager.history.record_failure(
                    follower.stream_id, follower.client_id, f"{type(exc).__name__}: {exc}"
                )
        except Exception:
            logger.exception("send-error policy for client %s of stream %s failed",
                             follower.client_id, follower.stream_id)  # fmt: skip

    # -- heartbeat ------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Say this worker is alive, store positions that moved, delete rows of clients it
        no longer holds, and send off clients whose rows are gone (4012, then they resume)."""
        held_at = timezone.now()
        held = {key: f for key, f in self.followers.items() if f.registered}
        positions = {key: f.position for key, f in held.items()}
        moved = {k: p for k, p in positions.items() if self._saved_positions.get(k) != p}
        # An idle worker's rows are only counted, and read every ROWS_READ_PASSES passes; a
        # registration under way may have its row already: then they are read.
        self._beats += 1
        read_rows = bool(self.joining) or self._beats % ROWS_READ_PASSES == 1
        missing = await self.manager.registry.heartbeat(
            self.id, set(held) | self.joining, moved, held_at, read_rows=read_rows
        )
        self._saved_positions.update(moved)
        for key in missing:
            follower = self.followers.get(key)
            if follower is None or follower is not held.get(key) or not follower.registered:
                continue
            logger.warning("client %s of stream %s: its row was removed by another worker; "
                           "telling it to reconnect", key[1], key[0])  # fmt: skip
            self.manager.stats["clients_resent"] += 1
            follower.registered = False
            await self._tell(follower, REGISTRATION_LOST_REASON, CloseCode.SERVICE_RESTART)

    async def _tell(self, follower: Follower, reason: str, code: int) -> None:
        """Send a deregistered event to a follower's own channel: its own task ends it."""
        with contextlib.suppress(StreamError):
            await self.manager.layer.tell_deregistered(
                follower.stream_id, follower.channel_name, reason, code
            )

    # -- nudges ---------------------------------------------------------------------------

    async def nudge_stragglers(self, known: dict[str, StreamState] | None = None) -> None:
        """Tell clients that are behind (and made no progress since the last sweep) or still
        open on a stream that was closed at the last sweep already to catch up: their channel
        may have dropped the events. (A close is announced only after its row is written, so
        a sweep between the two would otherwise nudge every client of a closing stream.)
        ``known``: states this pass read already (the cluster's part); the others are read."""
        positions = {key: f.delivered_seq for key, f in self.followers.items() if not f.ended}
        stream_ids = {stream_id for stream_id, _ in positions}
        known = known or {}
        states = {sid: known[sid] for sid in stream_ids if sid in known}
        if len(states) < len(stream_ids):
            states.update(await self.manager.history.states(stream_ids - states.keys()))
        closed_before, self._closed_at_last_sweep = self._closed_at_last_sweep, {
            stream_id for stream_id in stream_ids
            if (state := states.get(stream_id)) is None or state.closed
        }  # fmt: skip
        for key, position in positions.items():
            state = states.get(key[0])
            if state is None:  # history forgot the stream: nothing more can come; say so
                state = StreamState(0, 1, True, HISTORY_LOST_REASON, 0.0)
            stalled = position < state.head_seq and self._nudge_positions.get(key) == position
            follower = self.followers.get(key)
            if follower is None:
                continue
            # On a closed stream, a client that knows of the close and is still catching up
            # (at its own pace, with flow control) is left alone while it moves.
            missed_close = state.closed and key[0] in closed_before and follower.closing is None
            if not (stalled or missed_close):
                continue
            if not follower.paused:  # a paused one is behind on purpose (its timeout is checked)
                logger.warning(
                    "client %s of stream %s is at seq %d of %d%s: nudging it",
                    key[1], key[0], position, state.head_seq, " (closed)" if state.closed else "",
                )  # fmt: skip
                self.manager.stats["clients_nudged"] += 1
            with contextlib.suppress(StreamError):
                await self.manager.layer.nudge(
                    key[0], follower.channel_name, state.head_seq, state.closed, state.close_reason
                )
        self._nudge_positions = positions

    # -- leaving --------------------------------------------------------------------------

    async def detach(self, reason: str = SHUTDOWN_REASON, *, wait: float = 5.0) -> int:
        """Let every client of this process go without closing streams: each is told to
        reconnect (4012 with its ``last_seq``) and released. The number released."""
        followers = list(self.followers.values())
        try:
            await self.manager.registry.remove_worker(self.id)
        except Exception:
            logger.exception("worker %s: could not remove its rows (they expire)", self.id)
        told = 0
        for follower in followers:
            follower.registered = False
            if isinstance(follower, ChannelBridge):
                await follower.stop()
            else:
                await self._tell(follower, reason, CloseCode.SERVICE_RESTART)
                told += 1
        waiting = [f for f in followers if not f.released and not isinstance(f, ChannelBridge)]
        if waiting:  # each is ended and released by its own task, after its last frame
            waits = [asyncio.ensure_future(f.wait_released()) for f in waiting]
            _done, pending = await asyncio.wait(waits, timeout=wait)
            for waiter in pending:
                waiter.cancel()
        left = [f for f in followers if not f.released]
        for follower in left:
            logger.warning("client %s of stream %s did not leave in %g s", follower.client_id,
                           follower.stream_id, wait)  # fmt: skip
            await follower.release()
        logger.info("worker %s detached: %d client(s) told to reconnect", self.id, told)
        return len(followers)

    async def stop(self) -> None:
        """Stop this process's bridges (at shutdown, after their streams were closed)."""
        for bridges in list(self.bridges.values()):
            for bridge in list(bridges.values()):
                await bridge.stop()

    def cancel(self) -> None:
        """Cancel the bridges' tasks without awaiting them (sync callers resetting us)."""
        for bridges in self.bridges.values():
            for bridge in bridges.values():
                if bridge._task is not None:
                    bridge._task.cancel()
