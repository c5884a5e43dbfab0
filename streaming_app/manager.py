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
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils import timezone
from django.utils.module_loading import import_string

from . import metrics
from .auth import session_hash
from .chunks import AgentOSResponse, ErrorChunk, encode_chunk
from .clients import ChannelBridge, Follower, StreamClient
from .coalesce import Coalescer, validate_window
from .conf import StreamingManagerConfig, app_settings
from .exceptions import GMIError, GMIErrorCode, StreamError, backend_error, is_backend_error
from .history import AppendResult, Closed, History
from .layers import CHUNK, Inbox, StreamLayer
from .models import STREAM_ID_PATTERN, Stream
from .protocol import CloseCode
from .registry import NewClient, NewStream, Registry, StreamLimits
from .sweeper import Sweeper, SweepReport
from .transcripts import Transcript, build_snapshot
from .watches import Watches
from .worker import HISTORY_LOST_REASON, SHUTDOWN_REASON, Worker

logger = logging.getLogger(__name__)

_STREAM_ID = re.compile(STREAM_ID_PATTERN)
DEFAULT_CLOSE_REASON = "Stream closed"

__all__ = [
    "HISTORY_LOST_REASON",
    "SHUTDOWN_REASON",
    "StreamingManager",
    "SweepReport",
    "get_streaming_manager",
    "get_sync_streaming_manager",
]

P = ParamSpec("P")
R = TypeVar("R")


def build_history() -> History:
    """The history backend named by ``HISTORY_BACKEND``, built from the settings."""
    history: History = import_string(app_settings.HISTORY_BACKEND).from_settings()
    return history


@dataclass(frozen=True)
class StreamActivity:
    """How much a stream has said and when it last did."""

    chunks_pushed: int
    last_activity: datetime


class StreamingManager:
    """Creates streams, registers clients, pushes chunks in order and closes streams.

    Every public method raises ``GMIError(NOT_INITIALIZED)`` before :meth:`initialize`.
    """

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._snapshot_seqs: dict[str, int] = {}  # the snapshot seq this process stored last
        self.registry = Registry()
        self.worker = Worker(self)
        self.sweeper = Sweeper(self)
        self.watches = Watches(self)
        self.coalescer = Coalescer(self)  # held text deltas (COALESCE_TEXT_MS, coalesce_ms)
        self._config: StreamingManagerConfig | None = None
        self._history: History | None = None
        self._layer: StreamLayer | None = None
        self._publish_prefix = ""
        self._fast_path_proven: asyncio.Future[bool] | None = None
        self._proving: asyncio.Future[bool] | None = None  # the proof started at a create

    @property
    def worker_id(self) -> str:
        return self.worker.id

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
        self.coalescer.configure(app_settings.COALESCE_TEXT_MS)
        self._layer = StreamLayer(layer)
        self._history = build_history()
        # One round trip per push when the history's Redis is the layer's Redis (pub/sub or
        # core); it proves itself before the first push (see _fast_path).
        self._publish_prefix = self._history.publish_prefix(self._layer.group_target())
        self._fast_path_proven = None
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

    @property
    def history(self) -> History:
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        assert self._history is not None
        return self._history

    @property
    def layer(self) -> StreamLayer:
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        assert self._layer is not None
        return self._layer

    @property
    def publishes_in_the_append(self) -> bool:
        """Whether pushes are set up to take one Redis round trip (the history publishes the
        event itself); :meth:`_fast_path` proves it before the first push."""
        return bool(self._publish_prefix)

    @property
    def crosses_processes(self) -> bool:
        """Whether other processes can reach this one's clients (a shared channel layer and
        history), so a command run elsewhere can close what this process serves."""
        return self.history.shared and self.layer.crosses_processes

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
        coalesce_ms: float | None = None,
    ) -> str:
        """Create an active stream; its id (a UUID hex unless ``requested_stream_id``).

        ``owner`` (a user or its pk) or, for an anonymous visitor, ``session_key`` says whose
        stream it is: who may follow and cancel it by default, and whose fair share it counts
        against. The session key itself is not stored, only a keyed hash of it.
        ``coalesce_ms`` merges the text deltas this process pushes to it within that window
        (0: off; None: ``COALESCE_TEXT_MS``; see ``streaming_app.coalesce``).

        Raises ``StreamError``: RATE_LIMIT_EXCEEDED at ``max_concurrent_streams``, at the
        owner's (or session's) ``MAX_STREAMS_PER_OWNER`` / ``MAX_STREAMS_PER_SESSION`` or
        ``MAX_NEW_STREAMS_PER_MINUTE``, RESOURCE_ALREADY_EXISTS for a requested id in use,
        INVALID_ARGUMENT for bad input.
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
        if coalesce_ms is not None:
            validate_window(coalesce_ms, stream_id=requested_stream_id)
        owner_id = getattr(owner, "pk", owner)
        new = NewStream(
            requested_id=requested_stream_id,
            owner_id=owner_id,
            # The owner's streams are the owner's; a session only marks anonymous ones.
            session_hash="" if owner_id is not None else session_hash(session_key),
            gmi_instance_id=gmi_instance_id,
            persona_id=persona_id,
            metadata=metadata,
            inactivity_timeout_ms=inactivity_timeout_ms,
        )
        limits = StreamLimits(
            total=config.max_concurrent_streams,
            per_owner=app_settings.MAX_STREAMS_PER_OWNER,
            per_session=app_settings.MAX_STREAMS_PER_SESSION,
            per_minute=app_settings.MAX_NEW_STREAMS_PER_MINUTE,
        )
        try:
            stream_id = await self.registry.create_stream(new, limits=limits)
        except StreamError as exc:
            if exc.code is GMIErrorCode.RATE_LIMIT_EXCEEDED:
                self.stats["streams_refused"] += 1
                logger.warning(
                    "stream refused (owner=%s, session=%s): %s", owner_id,
                    new.session_hash[:12] or "-", exc.message,
                )  # fmt: skip
            raise
        try:
            await self.history.open(stream_id)
        except Exception as exc:
            await self.registry.delete_stream(stream_id)
            raise self._backend_error(stream_id, "history", exc) from exc
        self.stats["streams_created"] += 1
        if coalesce_ms is not None:
            self.coalescer.set_window(stream_id, coalesce_ms)
        logger.info("stream %s created (owner=%s)", stream_id, owner_id)
        if self._publish_prefix and self._fast_path_proven is None:
            # Prove the one-round-trip push now, while the caller starts its agent, not when
            # its first chunk is waiting.
            self._proving = asyncio.ensure_future(self._fast_path())
        return stream_id

    async def register_client(
        self, stream_id: str, client: StreamClient, *,
        authorize: Callable[[str], Stream] | None = None,
    ) -> None:  # fmt: skip
        """Subscribe ``client`` to a stream; it first gets what history holds, then live chunks.

        Raises ``StreamError``: RESOURCE_NOT_FOUND, STREAM_CLOSED, RESOURCE_ALREADY_EXISTS,
        RATE_LIMIT_EXCEEDED at ``max_clients_per_stream``, INVALID_ARGUMENT for an inactive
        client or an object that is not a StreamClient, BACKEND_UNAVAILABLE. ``authorize``
        (synchronous: the stream's id -> its row, or it raises) is run in the same database
        call as the registration, before it (see ``auth.subscribe_check``).
        """
        config = self.config
        # A Follower is one (the transports); checking a runtime Protocol costs ~20 µs.
        conforms = isinstance(client, (Follower, StreamClient))
        if not conforms or not isinstance(client.id, str) or not client.id:
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
        if isinstance(client, Follower):
            follower: Follower = client
        else:
            follower = ChannelBridge(stream_id, client, self.layer.layer, self.history)
        key = (stream_id, client.id)
        self.worker.joining.add(key)
        try:
            if isinstance(follower, ChannelBridge):
                await follower.open()
            cutoff = timezone.now() - timedelta(seconds=app_settings.CLIENT_TIMEOUT_SECONDS)
            new = NewClient(client.id, follower.transport, follower.channel_name, self.worker_id,
                            follower.user_id, follower.position)  # fmt: skip
            try:
                await self.registry.add_client(
                    stream_id,
                    new,
                    limit=config.max_clients_per_stream,
                    alive_after=cutoff,
                    authorize=authorize,
                )
            except Exception as exc:
                if isinstance(follower, ChannelBridge):
                    await follower.release()
                if isinstance(exc, GMIError) or not is_backend_error(exc):
                    raise
                raise self._backend_error(stream_id, "database", exc) from exc
            self.worker.hold(follower, saved=new.position)
            try:
                if follower.uses_hub and self.layer.hubs:
                    await self.worker.fanout.join(follower)
                    follower.hubbed = True
                else:
                    await self.layer.join(stream_id, follower.channel_name)
            except BaseException:
                # Undo the registration only: a transport still refuses its peer (4503).
                await self.worker.release(follower)
                if isinstance(follower, ChannelBridge):
                    await follower.release()
                raise
            follower.joined = True
        finally:
            self.worker.joining.discard(key)
        if isinstance(follower, ChannelBridge):
            follower.start()
        self.ensure_background()
        self.stats["clients_registered"] += 1
        logger.info("client %s (%s) registered to stream %s", client.id, follower.transport,
                    stream_id)  # fmt: skip

    async def deregister_client(self, stream_id: str, client_id: str) -> None:
        """Remove a client from a stream. A connected socket is told and closed (4411); a
        plain client just stops receiving.

        Raises ``StreamError(RESOURCE_NOT_FOUND)`` for an unknown stream or client.
        """
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        ref = await self.registry.remove_client(stream_id, client_id)
        local = self.worker.get(stream_id, client_id)
        if ref is None and (local is None or not local.registered):
            if not await self.registry.stream_exists(stream_id):
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
        if isinstance(local, ChannelBridge):
            local.registered = False
            await local.stop()
        elif ref is not None:  # its own task (here or in another process) closes it
            await self.layer.tell_deregistered(
                stream_id, ref.channel_name, "deregistered", CloseCode.DEREGISTERED
            )

    async def push_chunk(self, stream_id: str, chunk: AgentOSResponse | dict[str, Any]) -> int:
        """Send a chunk to every client of the stream, in order; its sequence number.

        Raises ``StreamError``: INVALID_ARGUMENT for a bad chunk (nothing sent),
        RESOURCE_NOT_FOUND, STREAM_CLOSED, BACKEND_UNAVAILABLE, and with ``'throw'``
        CLIENT_SEND_FAILED naming the client(s) whose send failed. A text delta held to be
        merged (a coalescing stream) returns 0: it goes out within the window, merged.
        """
        if self.coalescer.enabled:
            return await self.coalescer.push(stream_id, chunk)
        return (await self._push(stream_id, [chunk], raise_failures=True))[0]

    async def push_chunks(
        self, stream_id: str, chunks: Sequence[AgentOSResponse | dict[str, Any]]
    ) -> list[int]:
        """Push several chunks at once: one history round trip, consecutive seqs (returned),
        every client gets them in order as if pushed one by one. All are validated first: one
        bad chunk raises INVALID_ARGUMENT and none is sent. Otherwise as :meth:`push_chunk`."""
        if isinstance(chunks, (str, bytes, dict)) or not chunks:
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT, "push_chunks takes a non-empty list of chunks",
                stream_id=stream_id,
            )  # fmt: skip
        if self.coalescer.enabled:  # held text deltas go first, in the same round trip
            return await self.coalescer.push_many(stream_id, list(chunks))
        return await self._push(stream_id, list(chunks), raise_failures=True)

    async def close_stream(
        self,
        stream_id: str,
        reason: str | None = None,
        *,
        code: CloseCode = CloseCode.STREAM_CLOSED,
    ) -> None:
        """Close a stream: every client, in every process, gets ``reason`` once and is closed.

        ``code`` is the sockets' close code: ``SERVICE_RESTART`` tells clients to come back
        later with their resume cursor. Closing a closed stream does nothing. The history is
        closed first (no push gets through after it), then the row, then clients are told; a
        close that fails part-way raises ``BACKEND_UNAVAILABLE`` and is finished by a retry or
        by the sweeper. Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        reason = reason or DEFAULT_CLOSE_REASON
        if self.coalescer.enabled:  # held text deltas go out first
            await self.coalescer.before_close(stream_id)
        try:
            closed = await self.history.close(stream_id, reason)
        except Exception as exc:
            raise self._backend_error(stream_id, "history", exc) from exc
        if closed is not None:
            reason = closed.reason  # a close that is being finished keeps its first reason
        transcript = await self._transcript(stream_id, closed)
        try:
            released = await self.registry.close_stream(stream_id, reason, transcript)
        except StreamError:
            raise
        except Exception as exc:
            raise self._backend_error(stream_id, "database", exc) from exc
        if released is None and not (closed is not None and closed.was_open):
            logger.debug("stream %s was closed already", stream_id)
            return
        if closed is None:
            logger.warning("stream %s had no history at close", stream_id)
        self.stats["streams_closed"] += 1
        logger.info("stream %s closed (%s); %d client(s) notified", stream_id, reason,
                    len(released or ()))  # fmt: skip
        head = closed.head_seq if closed is not None else 0
        try:
            await self.layer.publish_closed(stream_id, reason, head, code)
        except StreamError:  # each client's own sweeper sees the closed history and ends it
            logger.error("stream %s: clients will learn of the close from the sweeper", stream_id)
        if closed is not None:
            try:
                await self.sweeper.record_activity([stream_id])
            except Exception:
                logger.exception("stream %s: activity not recorded at close", stream_id)
        self.sweeper.forget(stream_id)
        self._snapshot_seqs.pop(stream_id, None)

    async def _transcript(self, stream_id: str, closed: Closed | None) -> Transcript:
        """The closing stream's transcript, assembled from what the history holds."""
        if closed is None:  # the history lost it (a Redis restart): say so
            return Transcript(complete=False, history_lost=True)
        try:  # from the snapshot on, a page at a time: a long reply is not read at once
            transcript, _ = await build_snapshot(self.history, stream_id, closed.head_seq)
        except Exception as exc:
            raise self._backend_error(stream_id, "history", exc) from exc
        return transcript

    async def _advance_snapshot(self, stream_id: str, head: int) -> None:
        """Fold what was pushed since the stored snapshot into it, every half history: the
        chunks the history trims next are always in the snapshot already."""
        known = self._snapshot_seqs.get(stream_id, 0)
        if head - known < max(1, app_settings.HISTORY_MAX_CHUNKS // 2):
            return
        try:
            state, seq = await build_snapshot(self.history, stream_id, head)
            await self.history.save_snapshot(stream_id, seq, json.dumps(state.to_dict()))
        except Exception as exc:  # the push itself went through: a later one tries again
            logger.warning("stream %s: snapshot not advanced: %s: %s", stream_id,
                           type(exc).__name__, exc)  # fmt: skip
            return
        self._snapshot_seqs[stream_id] = seq

    async def handle_stream_error(
        self, stream_id: str, error: BaseException, terminate_stream: bool = True
    ) -> None:
        """Send one ``error`` chunk to every client, then close the stream unless told not to.

        Raises ``StreamError``: RESOURCE_NOT_FOUND, STREAM_CLOSED.
        """
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
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
        if self.coalescer.enabled:  # held text deltas go first, in the same round trip
            await self.coalescer.push_many(stream_id, [chunk], raise_failures=False)
        else:
            await self._push(stream_id, [chunk], raise_failures=False)
        if terminate_stream:
            await self.close_stream(stream_id, f"Error: {chunk.message}")

    async def get_active_stream_ids(self) -> list[str]:
        """Ids of all active streams, across every process, oldest first."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        return await self.registry.active_stream_ids()

    async def get_client_count_for_stream(self, stream_id: str) -> int:
        """How many clients (in every process) are registered to a stream.

        Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        return await self.registry.client_count(stream_id)

    async def shutdown(self, reason: str = SHUTDOWN_REASON) -> None:
        """Close every active stream (clients are told to come back for the rest with close
        code 4012), stop background work; initialize again before further use."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        for stream_id in await self.registry.active_stream_ids():
            try:
                await self.close_stream(stream_id, reason, code=CloseCode.SERVICE_RESTART)
            except StreamError:
                logger.exception("shutdown could not close stream %s", stream_id)
        await self._stop_background()
        await self.history.aclose()
        self._config = None
        logger.info("streaming manager %s shut down", self.worker_id)

    # -- beyond the seed ----------------------------------------------------------------

    async def detach_worker(self, reason: str = SHUTDOWN_REASON) -> int:
        """Let this process go without closing streams: its clients are deregistered and told
        to reconnect (close code 4012). The number of clients released."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        released = await self.worker.detach(reason)
        await self._stop_background()
        return released

    async def get_client_lags(self, stream_id: str) -> dict[str, int]:
        """How many chunks each client is behind the stream's head: the head minus what it
        acked, or minus what was written to it when it does not ack (as of the last sweep in
        its process; this process's clients are current). Raises ``RESOURCE_NOT_FOUND``."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        if not await self.registry.stream_exists(stream_id):
            raise StreamError(
                GMIErrorCode.RESOURCE_NOT_FOUND,
                f"stream {stream_id!r} does not exist",
                stream_id=stream_id,
            )
        delivered = await self.registry.read_seqs(stream_id)
        for (sid, client_id), follower in self.worker.followers.items():
            if sid == stream_id and client_id in delivered:
                delivered[client_id] = follower.read_seq
        state = (await self.history.states([stream_id])).get(stream_id)
        head = state.head_seq if state else 0
        return {client_id: max(0, head - seq) for client_id, seq in delivered.items()}

    async def get_stream_activity(self, stream_ids: Iterable[str]) -> dict[str, StreamActivity]:
        """Chunks pushed and last activity of each stream, current to the last push (from the
        history, where it holds the stream; else the row, which the sweeper updates)."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        ids = list(stream_ids)
        rows = await self.registry.activity(ids)
        states = await self.history.states([i for i in ids if i in rows])
        result = {}
        for stream_id, (chunks, last) in rows.items():
            state = states.get(stream_id)
            if state is not None:
                chunks = max(chunks, state.head_seq)
                last = max(last, datetime.fromtimestamp(state.last_activity, tz=UTC))
            result[stream_id] = StreamActivity(chunks, last)
        return result

    async def wait_closed(self, stream_id: str) -> str:
        """Wait until the stream is closed, by anyone in any process; the close reason.

        Lets an agent stop at once when a client cancels, without pushing first.
        Raises ``StreamError(RESOURCE_NOT_FOUND)``.
        """
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        return await self.watches.wait_closed(stream_id)

    async def report_send_failure(self, stream_id: str, client_id: str, exc: BaseException) -> None:
        """A client of another process could not be sent a chunk: with ``'throw'``, the
        producer's next push raises it."""
        self.stats["send_failures"] += 1
        if self.config.on_client_send_error_behavior == "throw":
            await self.history.record_failure(stream_id, client_id, f"{type(exc).__name__}: {exc}")

    def ensure_background(self) -> None:
        """Start this process's sweeper (heartbeat, dead clients, inactivity) if not running."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.sweeper.start()

    async def sweep(self, *, dry_run: bool = False, background: bool = False) -> SweepReport:
        """One pass of background work: heartbeat this worker, remove dead workers' clients,
        record activity, close streams idle past their timeout, finish half-done closes.

        With ``dry_run`` nothing changes; the report says what would have been done. With
        ``background``, as the sweeper's loop runs it: the cluster's part (all but the
        heartbeat and this worker's nudges) only by the holder of the sweeper lease."""
        self.config  # noqa: B018  (raises NOT_INITIALIZED)
        return await self.sweeper.sweep(dry_run=dry_run, background=background)

    # -- internals ----------------------------------------------------------------------

    async def _push(
        self, stream_id: str, chunks: list[AgentOSResponse | dict[str, Any]], *,
        raise_failures: bool,
    ) -> list[int]:  # fmt: skip
        """Append and publish; then, once the chunks are out, advance the snapshot (at most
        half a history at a time, so no chunk is trimmed before the snapshot has it). Its
        time goes to ``streaming_push_seconds``."""
        started = time.perf_counter()
        try:
            step, seqs = max(1, app_settings.HISTORY_MAX_CHUNKS // 2), []
            for start in range(0, len(chunks), step):
                seqs += await self._append_and_publish(
                    stream_id, chunks[start : start + step], raise_failures=raise_failures
                )
                await self._advance_snapshot(stream_id, seqs[-1])
            return seqs
        finally:
            metrics.PUSH_SECONDS.observe(time.perf_counter() - started)

    async def _append_and_publish(
        self, stream_id: str, chunks: list[AgentOSResponse | dict[str, Any]], *,
        raise_failures: bool,
    ) -> list[int]:  # fmt: skip
        config = self.config
        texts = [encode_chunk(c, stream_id=stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
                 for c in chunks]  # fmt: skip
        throw = raise_failures and config.on_client_send_error_behavior == "throw"
        bridges = self.worker.bridges.get(stream_id)
        # The fast path publishes inside the append; plain clients in this process need the
        # slow one, which registers their waiters between the two.
        publish_to = ""
        if self._publish_prefix and not bridges and await self._fast_path():
            publish_to = self._publish_prefix + stream_id
        result: AppendResult
        try:
            result = await self.history.append_many(
                stream_id, texts, take_failures=throw, publish_to=publish_to
            )
        except StreamError as exc:
            if exc.code is GMIErrorCode.RESOURCE_NOT_FOUND:
                await self._history_lost(stream_id)
            raise
        except Exception as exc:
            raise self._backend_error(stream_id, "history", exc) from exc
        if result.seq is None:
            raise _send_failed(stream_id, result.failed_clients, pushed=False)
        last = result.seq
        seqs = list(range(last - len(texts) + 1, last + 1))
        self.stats["chunks_pushed"] += len(texts)
        if publish_to:
            return seqs
        # Wait for this process's bridged clients: registered before publishing, so a bridge
        # that is quicker than us still reports to the waiter.
        waiters = {cid: b.delivered(last) for cid, b in bridges.items()} if bridges else {}
        for seq, text in zip(seqs, texts, strict=True):
            await self.layer.publish_chunk(stream_id, seq, text)
        if waiters:
            done, pending = await asyncio.wait(
                waiters.values(), timeout=app_settings.DELIVERY_TIMEOUT_SECONDS
            )
            failed = {cid: msg for cid, f in waiters.items() if f in done and (msg := f.result())}
            for cid, f in waiters.items():
                if f in pending:
                    f.cancel()
                    logger.warning(
                        "stream %s: client %s still busy with seq %d", stream_id, cid, last
                    )
            if throw and failed:
                raise _send_failed(stream_id, failed, pushed=True, seq=last)
        return seqs

    async def _fast_path(self) -> bool:
        """Whether the one-round-trip push works here: proven once per process by publishing
        through the history's script and receiving the event through the layer. On failure
        it is logged and pushes use append, then ``group_send``."""
        decided = self._fast_path_proven
        if decided is not None and decided.done():
            return decided.result()  # the hot path: decided once per process
        loop = asyncio.get_running_loop()
        if decided is None or decided.get_loop() is not loop:
            # (A proof begun in a loop that is gone, e.g. the sync facade's, starts again here.)
            future = self._fast_path_proven = loop.create_future()
            try:
                proven = await self._prove_fast_path()
            except Exception as exc:
                logger.error("one-round-trip push disabled: its self-test failed: %s: %s",
                             type(exc).__name__, exc)  # fmt: skip
                proven = False
            self.stats["fast_path_proven" if proven else "fast_path_failed"] = 1
            future.set_result(proven)
            return proven
        return await asyncio.shield(decided)

    async def _prove_fast_path(self) -> bool:
        probe = f"__probe__.{uuid.uuid4().hex}"
        inbox = Inbox(self.layer.layer)
        channel = await inbox.open("streaming.probe.")
        text = '{"probe":true}'
        try:
            await self.layer.join(probe, channel)
            await self.history.open(probe)
            await self.history.append(probe, text, take_failures=False,
                                      publish_to=self._publish_prefix + probe)  # fmt: skip
            async with asyncio.timeout(2):
                event = await inbox.get()
        finally:  # whatever happened, the probe leaves nothing behind
            with contextlib.suppress(StreamError):
                await self.layer.leave(probe, channel)
            await inbox.close()
            await self.history.forget(probe)
        event.pop("at", None)  # the push time (a string from the script)
        if event != {"type": CHUNK, "seq": 1, "chunk": text}:
            logger.error("one-round-trip push disabled: the layer received %r", event)
            return False
        return True

    async def _history_lost(self, stream_id: str) -> None:
        """The history no longer knows a stream the database calls active (Redis restarted
        empty): close it, so clients learn it instead of waiting; raises the reason."""
        try:
            stream = await self.registry.get_stream(stream_id)
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

    def _backend_error(self, stream_id: str, what: str, exc: BaseException) -> StreamError:
        logger.error("stream %s: %s backend failed: %s: %s", stream_id, what,
                     type(exc).__name__, exc)  # fmt: skip
        return backend_error(stream_id, what, exc)

    async def _stop_background(self) -> None:
        proving, self._proving = self._proving, None
        if proving is not None and proving.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(proving, return_exceptions=True)
        await self.coalescer.stop()
        await self.sweeper.stop()
        await self.worker.stop()
        await self.watches.stop()

    def cancel_background(self) -> None:
        """Cancel background tasks without awaiting them (for sync callers resetting us)."""
        self.coalescer.cancel()
        self.watches.cancel()
        self.sweeper.cancel()
        self.worker.cancel()
        if self._proving is not None:
            self._proving.cancel()


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


class SyncStreamingManager:
    """The same API for synchronous code (views, Celery tasks, commands)."""

    def __init__(self, manager: StreamingManager) -> None:
        self._manager = manager

    def push_chunk(self, stream_id: str, chunk: AgentOSResponse | dict[str, Any]) -> int:
        """As the async one, but a text delta is never held to be merged: each call may run
        in an event loop of its own, which ends with it (what was held goes first)."""
        return _sync(self._manager.coalescer.push_now)(stream_id, chunk)

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
