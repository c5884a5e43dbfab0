"""The StreamingManager: the seed's ``IStreamingManager`` on Django Channels.

Every process has one manager, reached through :func:`get_streaming_manager`. Managers agree
through the database (streams, clients, limits), the history (sequence numbers, closed flag)
and the channel layer (fan-out). ``push_chunk`` touches no database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from .chunks import AgentOSResponse, ErrorChunk, encode_chunk
from .clients import ChannelBridge, ChannelClient, StreamClient
from .conf import StreamingManagerConfig, app_settings
from .exceptions import GMIError, GMIErrorCode, StreamError
from .history import AppendResult, History, StreamState
from .layers import CLOSED, StreamLayer
from .lifecycle import install_shutdown_hook
from .models import STREAM_ID_PATTERN
from .protocol import CloseCode
from .registry import NewClient, NewStream, Registry

logger = logging.getLogger(__name__)

_STREAM_ID = re.compile(STREAM_ID_PATTERN)
DEFAULT_CLOSE_REASON = "Stream closed"
SHUTDOWN_REASON = "Server shutting down"
HISTORY_LOST_REASON = "Stream history was lost (the streaming backend restarted)"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class SweepReport:
    """What one sweep did: streams closed for inactivity and dead clients removed."""

    closed_idle: list[str] = field(default_factory=list)
    reaped_clients: list[tuple[str, str]] = field(default_factory=list)


def build_history() -> History:
    """The history backend named by ``HISTORY_BACKEND``, built from the settings."""
    history: History = import_string(app_settings.HISTORY_BACKEND).from_settings()
    return history


class StreamingManager:
    """Creates streams, registers clients, pushes chunks in order and closes streams.

    Every public method raises ``GMIError(NOT_INITIALIZED)`` before :meth:`initialize`.
    """

    def __init__(self) -> None:
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats: Counter[str] = Counter()
        self._config: StreamingManagerConfig | None = None
        self._registry = Registry()
        self._history: History | None = None
        self._layer: StreamLayer | None = None
        self._bridges: dict[str, dict[str, ChannelBridge]] = {}
        self._local: dict[str, dict[str, ChannelClient]] = {}
        self._recorded_heads: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._watches: dict[str, asyncio.Task[str]] = {}
        self._positions: dict[tuple[str, str], int] = {}
        self._publish_prefix = ""

    # -- the seed's API -------------------------------------------------------------------

    async def initialize(self, config: StreamingManagerConfig | None = None) -> None:
        """Validate ``config`` (default: from settings) and set the manager up.

        Raises ``GMIError(INVALID_ARGUMENT)`` naming every invalid option.
        """
        self.configure(config)

    def configure(self, config: StreamingManagerConfig | None = None) -> None:
        """The synchronous body of :meth:`initialize`, for the accessor."""
        config = config if config is not None else app_settings.manager_config()
        problems = config.errors()
        if problems:
            raise GMIError(
                GMIErrorCode.INVALID_ARGUMENT,
                "invalid StreamingManagerConfig: "
                + "; ".join(f"{k} {v}" for k, v in problems.items()),
                details=problems,
            )
        layer = get_channel_layer(app_settings.CHANNEL_LAYER)
        if layer is None:
            raise GMIError(
                GMIErrorCode.INVALID_ARGUMENT,
                f"no channel layer {app_settings.CHANNEL_LAYER!r} in CHANNEL_LAYERS",
            )
        self._layer = StreamLayer(layer)
        self._history = build_history()
        # One round trip per push when the history's Redis is the pub/sub layer's Redis.
        target = self._layer.pubsub_group_prefix()
        serves = getattr(self._history, "serves", None)
        self._publish_prefix = target[1] if target and serves and serves(target[0]) else ""
        self._config = config

    @property
    def is_initialized(self) -> bool:
        return self._config is not None

    @property
    def config(self) -> StreamingManagerConfig:
        """The active configuration; raises ``GMIError(NOT_INITIALIZED)``."""
        if self._config is None:
            raise GMIError(
                GMIErrorCode.NOT_INITIALIZED,
                "StreamingManager is not initialized: call initialize() first",
            )
        return self._config

    def _check_initialized(self) -> None:
        self.config  # noqa: B018  (the property raises NOT_INITIALIZED)

    @property
    def history(self) -> History:
        self._check_initialized()
        assert self._history is not None
        return self._history

    @property
    def layer(self) -> StreamLayer:
        self._check_initialized()
        assert self._layer is not None
        return self._layer

    async def create_stream(
        self,
        requested_stream_id: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        owner: Any = None,
        session_key: str = "",
        gmi_instance_id: str = "",
        persona_id: str = "",
        inactivity_timeout_ms: int | None = None,
    ) -> str:
        """Create an active stream; its id (a UUID hex unless ``requested_stream_id``).

        Raises ``StreamError``: RATE_LIMIT_EXCEEDED at ``max_concurrent_streams``,
        RESOURCE_ALREADY_EXISTS for a requested id in use, INVALID_ARGUMENT for bad input.
        """
        config = self.config
        if requested_stream_id is not None and (
            not isinstance(requested_stream_id, str) or not _STREAM_ID.match(requested_stream_id)
        ):
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT,
                f"invalid stream id {requested_stream_id!r}: use 1-64 ASCII letters, digits, "
                "'-', '_' or '.'",
            )
        metadata = {} if metadata is None else metadata
        try:
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT, f"invalid metadata: {exc}",
                stream_id=requested_stream_id,
            ) from exc  # fmt: skip
        if inactivity_timeout_ms is not None and (
            isinstance(inactivity_timeout_ms, bool)
            or not isinstance(inactivity_timeout_ms, int)
            or inactivity_timeout_ms <= 0
        ):
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT,
                f"inactivity_timeout_ms must be a positive int, not {inactivity_timeout_ms!r}",
                stream_id=requested_stream_id,
            )
        owner_id = getattr(owner, "pk", owner)
        stream_id = await self._registry.create_stream(
            NewStream(
                requested_id=requested_stream_id,
                owner_id=owner_id,
                session_key=session_key or "",
                gmi_instance_id=gmi_instance_id,
                persona_id=persona_id,
                metadata=metadata,
                inactivity_timeout_ms=inactivity_timeout_ms,
            ),
            limit=config.max_concurrent_streams,
        )
        try:
            await self.history.open(stream_id)
        except Exception as exc:
            await self._registry.delete_stream(stream_id)
            raise _backend_error(stream_id, "history", exc) from exc
        self.stats["streams_created"] += 1
        logger.info("stream %s created (owner=%s)", stream_id, owner_id)
        return stream_id

    async def register_client(self, stream_id: str, client: StreamClient) -> None:
        """Subscribe ``client`` to a stream; it first gets what history holds, then live chunks.

        Raises ``StreamError``: RESOURCE_NOT_FOUND, STREAM_CLOSED, RESOURCE_ALREADY_EXISTS,
        RATE_LIMIT_EXCEEDED at ``max_clients_per_stream``, INVALID_ARGUMENT for an inactive
        client or an object that is not a StreamClient.
        """
        config = self.config
        if not isinstance(client, StreamClient) or not isinstance(client.id, str) or not client.id:
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT,
                f"{client!r} is not a StreamClient (id, send_chunk, notify_stream_closed, "
                "is_active)",
                stream_id=stream_id,
            )
        if not client.is_active():
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT,
                f"client {client.id!r} is not active",
                stream_id=stream_id,
                client_id=client.id,
            )
        bridge: ChannelBridge | None = None
        if isinstance(client, ChannelClient):
            channel, transport, user_id = client.channel_name, client.transport, client.user_id
        else:
            bridge = ChannelBridge(
                stream_id, client, self.layer.layer, self.history, self._on_send_failure
            )
            channel, transport, user_id = await bridge.open(), ChannelBridge.transport, None
        await self._registry.add_client(
            stream_id,
            NewClient(client.id, transport, channel, self.worker_id, user_id),
            limit=config.max_clients_per_stream,
        )
        try:
            await self.layer.join(stream_id, channel)
        except StreamError:
            await self._registry.remove_client(stream_id, client.id)
            raise
        if bridge is not None:
            self._bridges.setdefault(stream_id, {})[client.id] = bridge
            task = bridge.start()
            task.add_done_callback(lambda _: self._drop_bridge(stream_id, bridge))
        else:
            assert isinstance(client, ChannelClient)
            self._local.setdefault(stream_id, {})[client.id] = client
        self.ensure_background()
        self.stats["clients_registered"] += 1
        logger.info("client %s (%s) registered to stream %s", client.id, transport, stream_id)

    async def deregister_client(self, stream_id: str, client_id: str) -> None:
        """Remove a client from a stream; it is told and closed if it is still connected.

        Raises ``StreamError(RESOURCE_NOT_FOUND)`` for an unknown stream or client.
        """
        self._check_initialized()
        if not await self._release_client(stream_id, client_id, notify="deregistered"):
            if not await self._registry.stream_exists(stream_id):
                raise StreamError(
                    GMIErrorCode.RESOURCE_NOT_FOUND,
                    f"stream {stream_id!r} does not exist",
                    stream_id=stream_id,
                    client_id=client_id,
                )
            raise StreamError(
                GMIErrorCode.RESOURCE_NOT_FOUND,
                f"client {client_id!r} is not registered to stream {stream_id!r}",
                stream_id=stream_id,
                client_id=client_id,
            )

    async def push_chunk(self, stream_id: str, chunk: AgentOSResponse | dict[str, Any]) -> int:
        """Send a chunk to every client of the stream, in order; its sequence number.

        Raises ``StreamError``: INVALID_ARGUMENT for a bad chunk (nothing sent),
        RESOURCE_NOT_FOUND, STREAM_CLOSED, and with ``'throw'`` CLIENT_SEND_FAILED naming the
        client(s) whose send failed.
        """
        return await self._push(stream_id, chunk, raise_failures=True)

    async def close_stream(
        self,
        stream_id: str,
        reason: str | None = None,
        *,
        code: CloseCode = CloseCode.STREAM_CLOSED,
    ) -> None:
        """Close a stream: every client, in every process, gets ``reason`` once and is closed.

        ``code`` is the sockets' close code: ``SERVICE_RESTART`` tells clients to come back
        later with their resume cursor. Closing a closed stream does nothing.
        Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self._check_initialized()
        reason = reason or DEFAULT_CLOSE_REASON
        released = await self._registry.close_stream(stream_id, reason)
        if released is None:
            logger.debug("stream %s was closed already", stream_id)
            return
        head = await self.history.close(stream_id, reason)
        if head is None:
            logger.warning("stream %s had no history in this process at close", stream_id)
        self.stats["streams_closed"] += 1
        logger.info(
            "stream %s closed (%s); %d client(s) notified", stream_id, reason, len(released)
        )
        await self.layer.publish_closed(stream_id, reason, head or 0, code)
        if head is not None:
            await self._record_activity([stream_id])
        self._recorded_heads.pop(stream_id, None)

    async def handle_stream_error(
        self, stream_id: str, error: BaseException, terminate_stream: bool = True
    ) -> None:
        """Send one ``error`` chunk to every client, then close the stream unless told not to.

        Raises ``StreamError``: RESOURCE_NOT_FOUND, STREAM_CLOSED.
        """
        self._check_initialized()
        code = getattr(error, "code", None) or type(error).__name__
        details = getattr(error, "details", None)
        chunk = ErrorChunk(
            stream_id=stream_id,
            code=str(code),
            message=str(error) or type(error).__name__,
            details=details if isinstance(details, dict) else None,
            is_final=terminate_stream,
        )
        logger.warning("stream %s error: %s: %s", stream_id, code, error)
        await self._push(stream_id, chunk, raise_failures=False)
        if terminate_stream:
            await self.close_stream(stream_id, f"Error: {chunk.message}")

    async def get_active_stream_ids(self) -> list[str]:
        """Ids of all active streams, across every process, oldest first."""
        self._check_initialized()
        return await self._registry.active_stream_ids()

    async def get_client_count_for_stream(self, stream_id: str) -> int:
        """How many clients (in every process) are registered to a stream.

        Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self._check_initialized()
        return await self._registry.client_count(stream_id)

    async def shutdown(self, reason: str = SHUTDOWN_REASON) -> None:
        """Close every active stream (clients are told to come back for the rest with close
        code 4012), stop background work; initialize again before further use."""
        self._check_initialized()
        for stream_id in await self._registry.active_stream_ids():
            try:
                await self.close_stream(stream_id, reason, code=CloseCode.SERVICE_RESTART)
            except StreamError:
                logger.exception("shutdown could not close stream %s", stream_id)
        await self._stop_local_work()
        aclose = getattr(self.history, "aclose", None)
        if aclose is not None:
            await aclose()
        self._config = None
        logger.info("streaming manager %s shut down", self.worker_id)

    # -- beyond the seed ----------------------------------------------------------------

    async def detach_worker(self, reason: str = SHUTDOWN_REASON) -> int:
        """Let this process go without closing streams: its clients are deregistered and told
        to reconnect (close code 4012). The number of clients released."""
        self._check_initialized()
        local = [client for clients in self._local.values() for client in clients.values()]
        released = await self._registry.remove_worker_clients(self.worker_id)
        for ref in released:
            await self.layer.leave(ref.stream_id, ref.channel_name)
            await self.layer.tell_deregistered(
                ref.stream_id, ref.channel_name, reason, CloseCode.SERVICE_RESTART
            )
        # Give this process's sockets the moment they need to say so before the server stops;
        # they run in their own tasks and expose no event to wait on.
        deadline = asyncio.get_running_loop().time() + 2
        while any(c.is_active() for c in local) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await self._stop_local_work()
        logger.info("worker %s detached: %d client(s) told to reconnect", self.worker_id,
                    len(released))  # fmt: skip
        return len(released)

    async def get_client_lags(self, stream_id: str) -> dict[str, int]:
        """How many chunks each client is behind the stream's head (as of the last sweep in
        its process; this process's clients are current). Raises ``RESOURCE_NOT_FOUND``."""
        self._check_initialized()
        if not await self._registry.stream_exists(stream_id):
            raise StreamError(
                GMIErrorCode.RESOURCE_NOT_FOUND,
                f"stream {stream_id!r} does not exist",
                stream_id=stream_id,
            )
        delivered = await self._registry.delivered_seqs(stream_id)
        for client_id, client in self._local.get(stream_id, {}).items():
            delivered[client_id] = getattr(client, "delivered_seq", 0)
        for client_id, bridge in self._bridges.get(stream_id, {}).items():
            delivered[client_id] = bridge.delivery.delivered_seq
        state = (await self.history.states([stream_id])).get(stream_id)
        head = state.head_seq if state else 0
        return {client_id: max(0, head - seq) for client_id, seq in delivered.items()}

    async def wait_closed(self, stream_id: str) -> str:
        """Wait until the stream is closed, by anyone in any process; the close reason.

        Lets an agent stop at once when a client cancels, without pushing first.
        Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self._check_initialized()
        watch = self._watches.get(stream_id)
        if watch is None:
            channel = await self.layer.layer.new_channel("streaming.watch.")
            await self.layer.watch(stream_id, channel)  # before reading, so no close slips by
            watch = asyncio.create_task(self._watch(stream_id, channel), name=f"watch-{stream_id}")
            self._watches[stream_id] = watch
            watch.add_done_callback(lambda _: self._watches.pop(stream_id, None))
            try:
                stream = await self._registry.get_stream(stream_id)
            except StreamError:
                watch.cancel()
                raise
            if not stream.is_active:
                watch.cancel()
                return stream.close_reason
        return await asyncio.shield(watch)

    async def _watch(self, stream_id: str, channel: str) -> str:
        try:
            while True:
                event = await self.layer.layer.receive(channel)
                if event.get("type") == CLOSED:
                    return str(event["reason"])
        finally:
            with contextlib.suppress(StreamError):
                await self.layer.unwatch(stream_id, channel)

    async def client_gone(self, stream_id: str, client_id: str) -> None:
        """A transport's own disconnect: forget the client, tolerating that it is gone."""
        await self._release_client(stream_id, client_id, notify=None)

    async def report_send_failure(self, stream_id: str, client_id: str, exc: BaseException) -> None:
        """A client could not be sent a chunk: apply ``on_client_send_error_behavior``."""
        await self._on_send_failure(stream_id, client_id, exc, False)

    def ensure_background(self) -> None:
        """Start this process's sweeper (heartbeats, dead clients, inactivity) if not running."""
        if self._sweeper is not None and not self._sweeper.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweeper = loop.create_task(self._sweep_forever(), name="streaming-sweeper")
        install_shutdown_hook(self)

    async def sweep(self, *, dry_run: bool = False) -> SweepReport:
        """One pass of background work: heartbeat this worker's clients, remove dead workers'
        clients, record activity and close streams idle past their timeout.

        With ``dry_run`` nothing changes; the report says what would have been done."""
        config = self.config
        report = SweepReport()
        if not dry_run:
            delivered = {
                (stream_id, client_id): getattr(client, "delivered_seq", 0)
                for stream_id, clients in self._local.items()
                for client_id, client in clients.items()
            }
            await self._registry.heartbeat(self.worker_id, delivered)
        for ref in await self._registry.reap_dead_clients(
            timedelta(seconds=app_settings.CLIENT_TIMEOUT_SECONDS), dry_run=dry_run
        ):
            if dry_run and ref.worker_id == self.worker_id:
                continue  # a real sweep heartbeats its own clients first: they would stay
            logger.warning(
                "reaped client %s of stream %s: worker %s stopped sending heartbeats",
                ref.client_id, ref.stream_id, ref.worker_id,
            )  # fmt: skip
            report.reaped_clients.append((ref.stream_id, ref.client_id))
            if not dry_run:
                with contextlib.suppress(StreamError):
                    await self.layer.leave(ref.stream_id, ref.channel_name)
        active = await self._registry.active_streams()
        states = await self.history.states(s.id for s in active)
        if not dry_run:
            await self._record_activity([s.id for s in active], states)
        now = time.time()
        for stream in active:
            timeout_ms = stream.inactivity_timeout_ms or config.default_stream_inactivity_timeout_ms
            state = states.get(stream.id)
            last = state.last_activity if state else stream.last_activity_at.timestamp()
            if (now - last) * 1000 > timeout_ms:
                report.closed_idle.append(stream.id)
                if not dry_run:
                    await self.close_stream(
                        stream.id, f"Closed after {timeout_ms / 1000:g} s of inactivity"
                    )
        if dry_run:
            return report
        await self._nudge_stragglers()
        expire = getattr(self.history, "expire_closed", None)
        if expire is not None:
            expire()
        return report

    # -- internals ----------------------------------------------------------------------

    async def _push(
        self, stream_id: str, chunk: AgentOSResponse | dict[str, Any], *, raise_failures: bool
    ) -> int:
        config = self.config
        chunk_json = encode_chunk(
            chunk, stream_id=stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES
        )
        throw = raise_failures and config.on_client_send_error_behavior == "throw"
        bridges = self._bridges.get(stream_id)
        # The fast path publishes inside the append; plain clients in this process need the
        # slow one, which registers their waiters between the two.
        fast = bool(self._publish_prefix) and not bridges
        result: AppendResult
        try:
            if fast:
                result = await self.history.append_and_publish(  # type: ignore[attr-defined]
                    stream_id, chunk_json, take_failures=throw,
                    publish_to=self._publish_prefix + stream_id,
                )  # fmt: skip
            else:
                result = await self.history.append(stream_id, chunk_json, take_failures=throw)
        except StreamError as exc:
            if exc.code is GMIErrorCode.RESOURCE_NOT_FOUND:
                await self._history_lost(stream_id)
            raise
        except Exception as exc:
            raise _backend_error(stream_id, "history", exc) from exc
        if result.seq is None:
            raise _send_failed(stream_id, result.failed_clients, pushed=False)
        seq = result.seq
        self.stats["chunks_pushed"] += 1
        if fast:
            return seq
        # Wait for this process's bridged clients: registered before publishing, so a bridge
        # that is quicker than us still reports to the waiter.
        waiters = {cid: b.delivered(seq) for cid, b in bridges.items()} if bridges else {}
        await self.layer.publish_chunk(stream_id, seq, chunk_json)
        if waiters:
            done, pending = await asyncio.wait(
                waiters.values(), timeout=app_settings.DELIVERY_TIMEOUT_SECONDS
            )
            failed = {cid: msg for cid, f in waiters.items() if f in done and (msg := f.result())}
            for cid, f in waiters.items():
                if f in pending:
                    f.cancel()
                    logger.warning(
                        "stream %s: client %s still busy with seq %d", stream_id, cid, seq
                    )
            if throw and failed:
                raise _send_failed(stream_id, failed, pushed=True, seq=seq)
        return seq

    async def _history_lost(self, stream_id: str) -> None:
        """The history no longer knows a stream the database calls active (Redis restarted
        empty): close it, so clients learn it instead of waiting; raises the reason."""
        try:
            stream = await self._registry.get_stream(stream_id)
        except StreamError:
            return  # unknown to both: the caller's RESOURCE_NOT_FOUND stands
        if not stream.is_active:
            raise StreamError(
                GMIErrorCode.STREAM_CLOSED,
                f"stream {stream_id!r} is closed ({stream.close_reason})",
                stream_id=stream_id,
                details={"reason": stream.close_reason},
            )
        logger.error("stream %s: its history was lost (backend restarted?); closing it", stream_id)
        await self.close_stream(stream_id, HISTORY_LOST_REASON)
        raise StreamError(
            GMIErrorCode.BACKEND_UNAVAILABLE,
            f"the history of stream {stream_id!r} was lost; the stream was closed",
            stream_id=stream_id,
        )

    async def _on_send_failure(
        self, stream_id: str, client_id: str, exc: BaseException, reported_inline: bool
    ) -> None:
        behavior = self.config.on_client_send_error_behavior
        self.stats["send_failures"] += 1
        logger.warning(
            "send to client %s of stream %s failed (%s): %s: %s",
            client_id, stream_id, behavior, type(exc).__name__, exc,
        )  # fmt: skip
        await self._registry.add_send_failure(stream_id, client_id)
        if behavior == "deregister_client":
            await self._release_client(stream_id, client_id, notify="send failed", close=True)
        elif behavior == "throw" and not reported_inline:
            await self.history.record_failure(stream_id, client_id, f"{type(exc).__name__}: {exc}")

    async def _release_client(
        self, stream_id: str, client_id: str, *, notify: str | None, close: bool = False
    ) -> bool:
        ref = await self._registry.remove_client(stream_id, client_id)
        local = self._local.get(stream_id)
        if local is not None:
            local.pop(client_id, None)
            if not local:
                del self._local[stream_id]
        bridge = self._bridges.get(stream_id, {}).get(client_id)
        if ref is None:
            return False
        with contextlib.suppress(StreamError):
            await self.layer.leave(stream_id, ref.channel_name)
        if bridge is not None:
            await bridge.stop()
            self._drop_bridge(stream_id, bridge)
            closer = getattr(bridge.client, "close", None)
            if close and closer is not None:
                try:
                    await closer(notify or "deregistered")
                except Exception:
                    logger.exception("closing client %s failed", client_id)
        elif notify is not None:
            await self.layer.tell_deregistered(
                stream_id, ref.channel_name, notify, CloseCode.DEREGISTERED
            )
        logger.info("client %s left stream %s", client_id, stream_id)
        return True

    async def _nudge_stragglers(self) -> None:
        """Tell this process's clients that are behind (and made no progress since the last
        sweep) or still open on a closed stream to catch up: their channel may have dropped
        the events (channel layer capacity, a Redis reconnect)."""
        clients: dict[tuple[str, str], tuple[str, int]] = {}
        for stream_id, local in self._local.items():
            for client_id, client in local.items():
                position = getattr(client, "delivered_seq", 0)
                clients[stream_id, client_id] = (client.channel_name, position)
        for stream_id, bridges in self._bridges.items():
            for client_id, bridge in bridges.items():
                clients[stream_id, client_id] = (bridge.channel_name, bridge.delivery.delivered_seq)
        states = await self.history.states({stream_id for stream_id, _ in clients})
        positions: dict[tuple[str, str], int] = {}
        for key, (channel, position) in clients.items():
            state = states.get(key[0])
            positions[key] = position
            if state is None:  # history forgot the stream: nothing more can come; say so
                state = StreamState(0, 1, True, HISTORY_LOST_REASON, 0.0)
            stalled = position < state.head_seq and self._positions.get(key) == position
            if state.closed or stalled:
                logger.warning(
                    "client %s of stream %s is at seq %d of %d%s: nudging it",
                    key[1], key[0], position, state.head_seq, " (closed)" if state.closed else "",
                )  # fmt: skip
                self.stats["clients_nudged"] += 1
                with contextlib.suppress(StreamError):
                    await self.layer.nudge(
                        key[0], channel, state.head_seq, state.closed, state.close_reason
                    )
        self._positions = positions

    def _drop_bridge(self, stream_id: str, bridge: ChannelBridge) -> None:
        bridges = self._bridges.get(stream_id)
        if bridges is not None and bridges.get(bridge.id) is bridge:
            del bridges[bridge.id]
            if not bridges:
                del self._bridges[stream_id]

    async def _record_activity(self, stream_ids: list[str], states: Any = None) -> None:
        if states is None:
            states = await self.history.states(stream_ids)
        changed = {
            sid: st for sid, st in states.items() if self._recorded_heads.get(sid) != st.head_seq
        }
        if changed:
            await self._registry.record_activity(changed)
            self._recorded_heads.update({sid: st.head_seq for sid, st in changed.items()})

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(app_settings.SWEEP_INTERVAL_SECONDS)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("streaming sweeper of worker %s failed", self.worker_id)

    async def _stop_local_work(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for bridges in list(self._bridges.values()):
            for bridge in list(bridges.values()):
                await bridge.stop()
        self._bridges.clear()
        self._local.clear()
        for watch in list(self._watches.values()):
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def cancel_background(self) -> None:
        """Cancel background tasks without awaiting them (for sync callers resetting us)."""
        for watch in self._watches.values():
            watch.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for bridges in self._bridges.values():
            for bridge in bridges.values():
                if bridge._task is not None:
                    bridge._task.cancel()


def _send_failed(
    stream_id: str, failed: dict[str, str], *, pushed: bool, seq: int | None = None
) -> StreamError:
    names = ", ".join(sorted(failed))
    what = f"chunk {seq} was pushed, but" if pushed else "chunk not pushed:"
    return StreamError(
        GMIErrorCode.CLIENT_SEND_FAILED,
        f"{what} sending to client(s) {names} of stream {stream_id!r} failed",
        stream_id=stream_id,
        client_id=sorted(failed)[0],
        details={"failed_clients": failed, "pushed": pushed, "seq": seq},
    )


def _backend_error(stream_id: str, what: str, exc: BaseException) -> StreamError:
    logger.error("stream %s: %s backend failed: %s", stream_id, what, exc)
    return StreamError(
        GMIErrorCode.BACKEND_UNAVAILABLE,
        f"the {what} backend is unavailable for stream {stream_id!r}: {exc}",
        stream_id=stream_id,
    )


class SyncStreamingManager:
    """The same API for synchronous code (views, Celery tasks, commands)."""

    def __init__(self, manager: StreamingManager) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self._manager, name)
        if not asyncio.iscoroutinefunction(attr):
            raise AttributeError(name)
        return _sync(attr)


def _sync(func: Callable[P, Awaitable[R]]) -> Callable[P, R]:
    return async_to_sync(func)


_manager: StreamingManager | None = None


def get_streaming_manager() -> StreamingManager:
    """This process's manager, initialized from settings on first use.

    Raises ``GMIError(INVALID_ARGUMENT)`` when the settings are invalid.
    """
    global _manager
    if _manager is None or not _manager.is_initialized:
        manager = StreamingManager()
        manager.configure()
        _manager = manager
    return _manager


def get_sync_streaming_manager() -> SyncStreamingManager:
    """:func:`get_streaming_manager` for synchronous callers."""
    return SyncStreamingManager(get_streaming_manager())


@receiver(setting_changed)
def _reset_on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    global _manager
    if setting in ("STREAMING_APP", "CHANNEL_LAYERS") and _manager is not None:
        _manager.cancel_background()
        _manager = None
