"""The ``StreamClient`` contract, in-order delivery with repair, and the one owner of a client.

A :class:`Follower` is one client of one stream in this process, from registration to release:
the transports (the WebSocket consumer, the SSE response, and the :class:`ChannelBridge` that
carries any other object satisfying ``StreamClient``) are Followers. They share one handler of
stream events and one release path, which each runs in a ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from . import metrics
from .auth import subscribe_check
from .chunks import AgentOSResponse, encode_chunk, parse_chunk
from .conf import app_settings
from .exceptions import GMIError, GMIErrorCode, StreamError, is_backend_error
from .fanout import spawn, start_eagerly
from .history import History
from .layers import CHUNK as CHUNK_EVENT
from .layers import ChannelLayer, Inbox
from .protocol import CloseCode, ServerFrame, chunk_frame, frame
from .transcripts import build_snapshot

if TYPE_CHECKING:
    from .manager import StreamingManager
    from .worker import Worker

logger = logging.getLogger(__name__)


@runtime_checkable
class StreamClient(Protocol):
    """The seed's ``IStreamClient``; ``close(reason)`` is optional and called when present."""

    @property
    def id(self) -> str: ...

    async def send_chunk(self, chunk: AgentOSResponse) -> None: ...

    async def notify_stream_closed(self, reason: str | None = None) -> None: ...

    def is_active(self) -> bool: ...


@dataclass(frozen=True)
class Chunk:
    seq: int
    chunk_json: str


@dataclass(frozen=True)
class Gap:
    from_seq: int
    to_seq: int


class Delivery:
    """One client's position in a stream, and its reads of history (a hole in the live
    events, a resume, a paused client going on): every chunk comes out once, in seq order; a
    range history no longer holds comes out as a ``Gap`` instead of silence.
    """

    def __init__(self, history: History, stream_id: str, delivered_seq: int = 0) -> None:
        self.history = history
        self.stream_id = stream_id
        self.delivered_seq = delivered_seq
        self.head_seq = 0  # the stream's head at the last read of history

    async def catch_up(
        self, up_to: int | None = None, limit: int | None = None
    ) -> list[Chunk | Gap]:
        """Everything after the delivered seq up to ``up_to`` (default: the head) from history;
        with ``limit``, at most that many seqs of it (the rest is for the next call)."""
        if up_to is not None and up_to <= self.delivered_seq:  # all sent: nothing to read
            self.head_seq = max(self.head_seq, up_to)
            return []
        end = up_to
        if limit is not None:
            end = (
                self.delivered_seq + limit if end is None else min(end, self.delivered_seq + limit)
            )
        replay = await self.history.read_after(self.stream_id, self.delivered_seq, end)
        self.head_seq = replay.head_seq
        last = replay.head_seq if up_to is None else up_to
        if limit is not None:
            last = min(last, self.delivered_seq + limit)
        items: list[Chunk | Gap] = []
        expected = self.delivered_seq + 1
        for seq, chunk_json in replay.entries:
            if seq > expected:
                items.append(Gap(expected, seq - 1))
            items.append(Chunk(seq, chunk_json))
            expected = seq + 1
        if expected <= last:
            items.append(Gap(expected, last))
        if items:
            logger.info("stream %s: catch-up of %d items from history", self.stream_id, len(items))
        self.delivered_seq = max(self.delivered_seq, last)
        return items


CLOSE_CODE_FOR_ERROR: dict[GMIErrorCode, CloseCode] = {
    GMIErrorCode.INVALID_ARGUMENT: CloseCode.BAD_REQUEST,
    GMIErrorCode.RESOURCE_NOT_FOUND: CloseCode.NOT_FOUND,
    GMIErrorCode.STREAM_CLOSED: CloseCode.STREAM_GONE,
    GMIErrorCode.PERMISSION_DENIED: CloseCode.FORBIDDEN,
    GMIErrorCode.RATE_LIMIT_EXCEEDED: CloseCode.STREAM_FULL,
}


def utf8_len(text: str) -> int:
    """The UTF-8 size of ``text`` (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


def gap_frame(gap: Gap) -> str:
    return frame(ServerFrame.GAP, from_seq=gap.from_seq, to_seq=gap.to_seq)


class Follower:
    """One client of one stream in this process, from registration to release.

    Stream events are handled by the methods named after them (``stream.chunk`` ->
    ``stream_chunk``), the same for every transport. A transport provides :meth:`write` and
    :meth:`close_transport`, and calls :meth:`release` in a ``finally``: whatever ends it (the
    stream, the peer, a cancel, a bug), the client's row, group membership and channel go.
    """

    transport: ClassVar[str]
    scope: dict[str, Any]
    stream_id: str
    client_id: str
    channel_name: str = ""
    delivery: Delivery | None = None
    worker: Worker | None = None  # the worker holding us while we are registered
    registered = False  # our row exists, as far as we know
    joined = False  # our channel is in the stream's group
    ended = False  # the closing frame went out (or the peer left): nothing more is sent
    released = False

    # Flow control (see "Slow clients" in the README). A transport whose writes do not wait
    # for the peer has a bound: a client that acks is paused at its window and catches up
    # from history as acks come; one that does not is sent off to resume (4013).
    flow_controlled: ClassVar[bool] = True
    CATCH_UP_PAGE: ClassVar[int] = 256  # chunks read from history at a time
    acking = False  # the client acks what it read (``?ack=1`` or its first ack frame)
    acked_seq = 0
    written_seq = 0  # the last seq written to the transport (a gap's end counts)
    unread_bytes = 0  # written since the last sign of reading (an ack)
    unacked_bytes = 0
    sent_bytes = 0  # what the transport wrote to the peer (counted by the transport)
    frame_size = 0  # a running average of the chunk frames written
    paused_since: float | None = None  # time.monotonic() when the window filled
    closing: tuple[int, str, int] | None = None  # (code, reason, last_seq) of a close that waits
    _unacked: deque[tuple[int, int]] | None = None  # (seq, bytes) written and not acked
    # A client far behind gets one snapshot frame instead of every chunk it missed, unless it
    # asked for the chunks (``?replay=chunks``) or its protocol has no snapshot.
    snapshots: ClassVar[bool] = True
    replay_chunks = False
    # Handed the stream's events by its hub (fanout.py) rather than reading them on a channel
    # of its own; what the hub cannot write at once waits in the mailbox, emptied by the
    # client's own task after whatever it handles, or else by a task of its own (``wake``)
    # (``_busy`` meanwhile).
    uses_hub: ClassVar[bool] = False
    hubbed = False  # its stream's hub hands it events (the layer allows it: StreamLayer.hubs)
    MAILBOX_EVENTS: ClassVar[int] = 1024
    _busy = False
    _mailbox: deque[dict[str, Any]] | None = None
    # a write the hub started that waits for the peer, or the mailbox being emptied (wake)
    _writing: asyncio.Task[None] | None = None

    # -- StreamClient (the seed's IStreamClient) -------------------------------------------

    @property
    def id(self) -> str:
        return self.client_id

    def is_active(self) -> bool:
        return not self.ended

    async def send_chunk(self, chunk: AgentOSResponse) -> None:
        """Send one chunk outside the stream's sequence (``seq`` is null)."""
        text = encode_chunk(chunk, stream_id=self.stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
        await self.write(ServerFrame.CHUNK, f'{{"type":"chunk","seq":null,"chunk":{text}}}', None)

    async def notify_stream_closed(self, reason: str | None = None) -> None:
        text = frame(ServerFrame.CLOSED, reason=reason or "", last_seq=self.delivered_seq)
        await self.write(ServerFrame.CLOSED, text, None)

    # -- identity and position --------------------------------------------------------------

    @property
    def user_id(self) -> int | None:
        user = self.scope.get("user")
        return user.pk if user is not None and user.is_authenticated else None

    @property
    def delivered_seq(self) -> int:
        """The last seq written to the transport."""
        return self.delivery.delivered_seq if self.delivery is not None else 0

    @property
    def read_seq(self) -> int:
        """What the client is known to have read: its ack, or (when it does not ack) what was
        written to it."""
        return self.acked_seq if self.acking else self.delivered_seq

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    @property
    def position(self) -> tuple[int, int | None, bool]:
        """(written seq, acked seq or None when it does not ack, paused), as stored."""
        return self.delivered_seq, self.acked_seq if self.acking else None, self.paused

    # -- what a transport provides -----------------------------------------------------------

    async def write(self, kind: ServerFrame, text: str, seq: int | None) -> None:
        """Send one frame to the peer; raises when it cannot."""
        raise NotImplementedError

    async def close_transport(self, code: int) -> None:
        """End the connection with ``code`` (after the last frame)."""
        raise NotImplementedError

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, manager: StreamingManager, last_seq: int) -> bool:
        """Authorise, register and send what history holds; False when the peer was refused
        or the stream was closed (then what it missed, ``closed`` and 4410 went out)."""
        self.delivery = Delivery(manager.history, self.stream_id, last_seq)
        self.written_seq = self.acked_seq = last_seq
        try:  # one database call: may it see the stream (hidden if not), then register
            await manager.register_client(
                self.stream_id, self, authorize=subscribe_check(self.scope)
            )
            active, reason = True, ""
        except GMIError as exc:
            if exc.code is GMIErrorCode.BACKEND_UNAVAILABLE:
                raise  # the transport's crash path: logged, 4503 "streaming backend failed"
            closed = isinstance(exc, StreamError) and exc.code is GMIErrorCode.STREAM_CLOSED
            if not closed:
                await self.refuse(exc)
                return False
            active, reason = False, exc.details.get("reason", "")
        # One read: the first page of what it missed, and the head.
        first: list[Chunk | Gap] | None = await self.delivery.catch_up(limit=self.room())
        head = max(self.delivery.head_seq, self.delivery.delivered_seq)
        if not active:  # what it missed, then closed (after its acks, if it is paused)
            if await self.send_snapshot(manager, head):
                first = None
            await self.fill(page=first)
            self.closing = (CloseCode.STREAM_GONE, reason, self.delivery.head_seq)
            await self.finish_closing()
            return False
        window = {"chunks": app_settings.CLIENT_WINDOW_CHUNKS,
                  "bytes": app_settings.CLIENT_WINDOW_BYTES}  # fmt: skip
        text = frame(ServerFrame.SUBSCRIBED, stream_id=self.stream_id, client_id=self.client_id,
                     seq=head, **({"window": window} if self.acking else {}))  # fmt: skip
        await self.write(ServerFrame.SUBSCRIBED, text, None)
        if await self.send_snapshot(manager, head):
            first = None
        await self.fill(head, page=first)
        return True

    async def send_snapshot(self, manager: StreamingManager, head: int) -> bool:
        """One ``snapshot`` frame (the reducer's state) for a client more than
        ``SNAPSHOT_AFTER_CHUNKS`` behind ``head``, instead of the chunks it missed; whether it
        went (then what was read of those chunks is not sent)."""
        delivery = self.delivery
        assert delivery is not None
        behind = head - self.written_seq
        if not self.snapshots or self.replay_chunks or behind <= app_settings.SNAPSHOT_AFTER_CHUNKS:
            return False
        state, seq = await build_snapshot(manager.history, self.stream_id)
        text = frame(ServerFrame.SNAPSHOT, seq=seq, state=state.to_dict())
        sent = self.sent_bytes
        try:
            await self.write(ServerFrame.SNAPSHOT, text, seq)
        except Exception as exc:
            await self.send_failed(exc)
            return True
        delivery.delivered_seq = self.written_seq = max(seq, self.written_seq)
        self.wrote(seq, self.sent_bytes - sent)
        metrics.SNAPSHOTS.labels(self.transport).inc()
        logger.info("client %s of stream %s: a snapshot at seq %d instead of %d chunks",
                    self.client_id, self.stream_id, seq, behind)  # fmt: skip
        return True

    async def refuse(self, exc: GMIError) -> None:
        """Tell the peer why it cannot follow the stream, then close with the matching code."""
        self.log_refusal(exc)
        await self.fail(
            str(exc.code), exc.message, CLOSE_CODE_FOR_ERROR.get(exc.code, CloseCode.UNAVAILABLE)
        )

    def log_refusal(self, exc: GMIError) -> None:
        logger.info(
            "client %s refused on stream %r: %s",
            self.client_id,
            self.stream_id,
            exc.message.encode("unicode_escape").decode(),
        )  # one line, whatever the id

    async def fail(self, code: str, message: str, close_code: int) -> None:
        """An ``error`` frame, then close with ``close_code`` (once)."""
        if self.ended:
            return
        self.ended = True
        metrics.REFUSALS.labels(str(int(close_code))).inc()
        try:
            await self.write(ServerFrame.ERROR, frame(ServerFrame.ERROR, code=code,
                                                      message=message), None)  # fmt: skip
        finally:  # released before the close goes out: whoever sees it sees the counts right
            await self.release()
            await self.close_transport(close_code)

    async def crashed(self, exc: BaseException) -> None:
        """Something failed while serving: a backend failure is 4503 (come back later); anything
        else is a bug, logged with its traceback and closed 4500."""
        if is_backend_error(exc):
            logger.error("client %s of stream %s: streaming backend failed: %s: %s",
                         self.client_id, self.stream_id, type(exc).__name__, exc)  # fmt: skip
            await self.fail(str(GMIErrorCode.BACKEND_UNAVAILABLE), "streaming backend failed",
                            CloseCode.UNAVAILABLE)  # fmt: skip
        else:
            logger.error("client %s of stream %s: internal error", self.client_id,
                         self.stream_id, exc_info=exc)  # fmt: skip
            await self.fail("internal_error", "internal server error", CloseCode.INTERNAL_ERROR)

    # -- stream events (named after the event type) -------------------------------------------

    async def dispatch_event(self, event: dict[str, Any]) -> None:
        """Handle one stream event with the method named after its type."""
        handler = getattr(self, str(event.get("type", "")).replace(".", "_"), None)
        if handler is None:
            logger.warning("client %s ignores event %r", self.client_id, event.get("type"))
            return
        await handler(event)

    async def offer(self, event: dict[str, Any]) -> None:
        """An event from the stream's hub. A chunk that needs nothing from history (the next
        one, a duplicate, or one for a paused client, which reads it from history later) is
        handled at once when the client's task is free; anything else goes to the mailbox,
        and the task is woken to handle it in order."""
        if self.ended:
            return
        mailbox = self._mailbox
        if not self._busy and not mailbox and event["type"] == CHUNK_EVENT:
            delivery, seq = self.delivery, event["seq"]
            if delivery is not None and (
                seq <= delivery.delivered_seq
                or self.paused
                or (seq == delivery.delivered_seq + 1 and "chunk" in event)
            ):
                self._busy = True
                try:
                    writing = start_eagerly(self.stream_chunk(event))
                except BaseException:
                    self._busy = False
                    raise
                if writing is None:
                    self._busy = False
                else:  # its send waits for the peer: the rest goes on in a task of its own
                    self._writing = writing
                    writing.add_done_callback(self._written)
                return
        if mailbox is None:
            mailbox = self._mailbox = deque()
        elif len(mailbox) >= self.MAILBOX_EVENTS:  # a client whose task is held up for long:
            # the chunks it was offered are in the history, which the newest one makes it read.
            # Filtered in place: a task emptying the mailbox goes on with what is left (a new
            # deque would leave it draining the old one, its other events handled twice, and
            # the new one unwoken once that task is the client's own).
            kept = [e for e in mailbox if e["type"] != CHUNK_EVENT]
            mailbox.clear()
            mailbox.extend(kept)
            logger.info("client %s of stream %s: busy for %d events; it reads them from history",
                        self.client_id, self.stream_id, self.MAILBOX_EVENTS)  # fmt: skip
        mailbox.append(event)
        if not self._busy:
            self.wake()

    def _written(self, writing: asyncio.Task[None]) -> None:
        """A write the hub started that had to wait (or a wake) is done: the client is free
        again, and what the hub left meanwhile is handled next."""
        self._writing = None
        self._busy = False
        if not writing.cancelled() and writing.exception() is not None:
            spawn(self.crashed(writing.exception()))  # type: ignore[arg-type]
        elif self._mailbox and not self.ended:
            self.wake()

    async def finish_writing(self) -> None:
        """Wait for a write the hub started (its own task must not write meanwhile)."""
        while self._writing is not None:
            await asyncio.wait([self._writing])

    def wake(self) -> None:
        """Have what waits in the mailbox handled, in order, in a task that holds the client
        as a write the hub started does (its own task waits for it in ``finish_writing``; the
        hub leaves later events in the mailbox meanwhile): no trip through the channel
        layer."""
        self._busy = True
        emptying = asyncio.ensure_future(self.empty_mailbox())
        self._writing = emptying
        emptying.add_done_callback(self._written)

    async def empty_mailbox(self) -> None:
        """Handle what the hub left while this client's task was busy, in order."""
        mailbox = self._mailbox
        while mailbox and not self.ended:
            await self.dispatch_event(mailbox.popleft())
        if mailbox and self.ended:
            mailbox.clear()

    async def stream_chunk(self, event: dict[str, Any]) -> None:
        delivery, seq = self.delivery, event["seq"]
        if self.ended or delivery is None or seq <= delivery.delivered_seq or self.paused:
            return  # a paused client reads it from history when its acks make room
        chunk_json = event.get("chunk")  # absent for a big chunk: it is read from history
        if chunk_json is None:
            await self.fill(seq)
        else:
            if seq > delivery.delivered_seq + 1:  # events went missing: history has them
                await self.fill(seq - 1)
            if not (self.ended or self.paused) and delivery.delivered_seq == seq - 1:
                delivery.delivered_seq = seq  # the next one: no history involved
                await self.write_chunk(seq, chunk_json)
        pushed_at = event.get("at")  # the producer's clock at push_chunk
        if pushed_at is not None and self.written_seq >= seq and not self.ended:
            metrics.DELIVERIES.observe(self.transport, max(0.0, time.time() - float(pushed_at)))

    async def stream_closed(self, event: dict[str, Any]) -> None:
        # Published once the stream's row was closed and its clients' rows went with it: no
        # row of ours is left to delete as we leave.
        self.registered = False
        if self.ended or self.delivery is None:
            return
        self.closing = (event.get("code", CloseCode.STREAM_CLOSED), event["reason"],
                        event["last_seq"])  # fmt: skip
        await self.fill(event["last_seq"])
        await self.finish_closing()

    async def stream_sync(self, event: dict[str, Any]) -> None:
        """The sweeper saw us behind the head or open on a closed stream: catch up. A client
        paused for longer than ``CLIENT_TIMEOUT_SECONDS`` without an ack is sent off."""
        if self.ended or self.delivery is None:
            return
        if event["closed"] and self.closing is None:
            self.closing = (CloseCode.STREAM_CLOSED, event["reason"], event["head_seq"])
        if self.paused_since is not None:
            waited = time.monotonic() - self.paused_since
            if waited > app_settings.CLIENT_TIMEOUT_SECONDS:
                await self.too_far_behind(f"no ack for {waited:.0f} s")
            return
        await self.fill(event["head_seq"])
        await self.finish_closing()

    async def finish_closing(self) -> None:
        """End with the close that came (``closed``), unless the client is paused: then its
        acks finish it (or it is sent off)."""
        if self.closing is not None and not self.paused:
            await self.end(self.closing[0], self.closing[1])

    async def stream_deregistered(self, event: dict[str, Any]) -> None:
        """The manager removed us (its row is gone): say why and end."""
        self.registered = False
        await self.end(event.get("code", CloseCode.DEREGISTERED), event["reason"],
                       close=event.get("close", True))  # fmt: skip

    # -- sending -------------------------------------------------------------------------------

    async def deliver(self, items: list[Chunk | Gap]) -> None:
        """Send chunk and gap frames while the client has room (the rest stays in history);
        a failed send goes to the send-error policy."""
        for item in items:
            if self.ended:
                return
            if isinstance(item, Chunk):
                written = await self.write_chunk(item.seq, item.chunk_json)
            else:
                written = await self.write_gap(item)
            if not written:
                return

    async def write_gap(self, gap: Gap) -> bool:
        """Write a ``gap`` frame; False when the send failed (the send-error policy)."""
        try:
            await self.write(ServerFrame.GAP, gap_frame(gap), None)
        except Exception as exc:
            await self.send_failed(exc)
            return False
        self.written_seq = gap.to_seq
        metrics.GAP_FRAMES.inc()
        return True

    async def write_chunk(self, seq: int, chunk_json: str) -> bool:
        """Write one chunk frame if the client has room; False when it had none (it is paused
        or sent off, and goes on from history) or the send failed (the send-error policy)."""
        text = chunk_frame(seq, chunk_json)
        if not self.has_room(utf8_len(text)):
            assert self.delivery is not None
            self.delivery.delivered_seq = self.written_seq  # from here on, from history
            await self.hold_back()
            return False
        sent = self.sent_bytes
        try:
            await self.write(ServerFrame.CHUNK, text, seq)
        except Exception as exc:
            await self.send_failed(exc)
            return False
        self.written_seq = seq
        self.wrote(seq, self.sent_bytes - sent)
        metrics.DELIVERIES.count(self.transport)
        return True

    async def fill(self, up_to: int | None = None, *, page: list[Chunk | Gap] | None = None
                   ) -> None:  # fmt: skip
        """Send what history holds after the written seq up to ``up_to`` (default: the head),
        a page at a time, while the client has room; ``page``: the first one, read already."""
        delivery = self.delivery
        assert delivery is not None
        held: Gap | None = None  # a gap that may go on in the next page: one frame for all of it
        while not self.ended and not self.paused:
            items = page if page is not None else await delivery.catch_up(up_to, limit=self.room())
            page = None
            if held is not None:
                if items and isinstance(items[0], Gap):
                    items[0] = Gap(held.from_seq, items[0].to_seq)
                else:
                    items.insert(0, held)
                held = None
            finished = delivery.delivered_seq >= (delivery.head_seq if up_to is None else up_to)
            if not finished and len(items) == 1 and isinstance(items[0], Gap):
                held = items[0]
                continue
            await self.deliver(items)
            if not items or finished:
                return

    # -- flow control ----------------------------------------------------------------------------

    def has_room(self, size: int) -> bool:
        """Whether a chunk frame of ``size`` bytes may be written now."""
        if not self.flow_controlled:
            return True
        if self.acking:
            unacked = self.written_seq - self.acked_seq
            return unacked <= 0 or (
                unacked < app_settings.CLIENT_WINDOW_CHUNKS
                and self.unacked_bytes + size <= app_settings.CLIENT_WINDOW_BYTES
            )
        return (
            self.unread_bytes == 0
            or self.unread_bytes + size <= app_settings.CLIENT_MAX_UNREAD_BYTES
        )

    def room(self) -> int:
        """How many chunks to read from history for the next write: a page, or what the
        client's window still holds (by count, and by bytes at the average frame size)."""
        if not self.flow_controlled:
            return self.CATCH_UP_PAGE
        if self.acking:
            chunks = app_settings.CLIENT_WINDOW_CHUNKS - (self.written_seq - self.acked_seq)
            free = app_settings.CLIENT_WINDOW_BYTES - self.unacked_bytes
        else:
            chunks, free = (
                self.CATCH_UP_PAGE,
                app_settings.CLIENT_MAX_UNREAD_BYTES - self.unread_bytes,
            )
        by_size = free // self.frame_size + 1 if self.frame_size else self.CATCH_UP_PAGE
        return max(1, min(self.CATCH_UP_PAGE, chunks, by_size))

    def wrote(self, seq: int, size: int) -> None:
        """A chunk frame of ``size`` bytes went out (0: the transport sent nothing for it)."""
        if size:
            self.frame_size = size if not self.frame_size else (3 * self.frame_size + size) // 4
        self.unread_bytes += size
        if self.acking:
            if self._unacked is None:
                self._unacked = deque()
            self._unacked.append((seq, size))
            self.unacked_bytes += size

    async def hold_back(self) -> None:
        """No room: a client that acks is paused; one that does not is sent off to resume."""
        if not self.acking:
            await self.too_far_behind(f"{self.unread_bytes} bytes written without an ack")
        elif self.paused_since is None:
            self.paused_since = time.monotonic()
            logger.info("client %s of stream %s paused at seq %d (acked %d)", self.client_id,
                        self.stream_id, self.written_seq, self.acked_seq)  # fmt: skip

    async def acked(self, seq: int) -> None:
        """The client read every chunk up to ``seq``: its window moves, and a paused client
        goes on from history. Raises ``StreamError(INVALID_ARGUMENT)`` for a seq not sent."""
        if seq > self.written_seq:
            raise StreamError(GMIErrorCode.INVALID_ARGUMENT,
                              f"ack of seq {seq}, but only {self.written_seq} was sent",
                              stream_id=self.stream_id)  # fmt: skip
        self.acking = True
        self.unread_bytes = 0
        if seq > self.acked_seq:
            self.acked_seq = seq
            while self._unacked and self._unacked[0][0] <= seq:
                self.unacked_bytes -= self._unacked.popleft()[1]
        if self.paused_since is not None and self.has_room(0):
            self.paused_since = None
            await self.fill(self.closing[2] if self.closing else None)
            await self.finish_closing()

    async def too_far_behind(self, why: str) -> None:
        """Send the client off with ``reconnect`` and 4013: it resumes from its last seq."""
        logger.warning("client %s of stream %s is too far behind (%s): sent off at seq %d",
                       self.client_id, self.stream_id, why, self.delivered_seq)  # fmt: skip
        metrics.TOO_FAR_BEHIND.labels(self.transport).inc()
        await self.end(CloseCode.TOO_FAR_BEHIND, f"too far behind: {why}; resume from last_seq")

    async def send_failed(self, exc: BaseException, *, inline: bool = False) -> None:
        if self.worker is not None:
            await self.worker.send_failed(self, exc, inline=inline)
        else:
            logger.warning("send to client %s of stream %s failed: %s", self.client_id,
                           self.stream_id, exc)  # fmt: skip

    async def end(self, code: int, reason: str, *, close: bool = True) -> None:
        """The last frame (``reconnect`` for 4012, else ``closed``), then close (once)."""
        if self.ended:
            return
        self.ended = True
        resume = code in (CloseCode.SERVICE_RESTART, CloseCode.TOO_FAR_BEHIND)
        kind = ServerFrame.RECONNECT if resume else ServerFrame.CLOSED
        try:
            await self.write(kind, frame(kind, reason=reason, last_seq=self.delivered_seq), None)
        except Exception as exc:
            logger.info("client %s of stream %s: last frame not sent: %s", self.client_id,
                        self.stream_id, exc)  # fmt: skip
        await self.release()  # nothing more will be sent: no need to wait for the peer
        await self.close_transport(code)

    _releasing: asyncio.Future[None] | None = None

    async def release(self) -> None:
        """Give back everything this client holds: its row, group membership, channel. Runs
        once, to the end, whoever asks and even if they are cancelled meanwhile."""
        self.ended = True
        if self._releasing is None:
            self._releasing = asyncio.ensure_future(self._release())
        await asyncio.shield(self._releasing)

    async def _release(self) -> None:
        try:
            if self.worker is not None:
                await self.worker.release(self)
        finally:
            self.released = True
            if self._released is not None:
                self._released.set()

    _released: asyncio.Event | None = None

    async def wait_released(self) -> None:
        """Return once the client has been released (by its own task)."""
        if self.released:
            return
        if self._released is None:
            self._released = asyncio.Event()
        await self._released.wait()


class ChannelBridge(Follower):
    """Carries a plain ``StreamClient`` onto a channel of its own and delivers to it in order.

    ``delivered(seq)`` lets the producer in this process wait until the client was tried,
    so ``push_chunk`` keeps the seed's "after every client was tried" semantics for it.
    """

    transport = "python"
    flow_controlled = False  # each send is awaited: the client sets the pace
    snapshots = False  # a StreamClient takes chunks

    def __init__(self, stream_id: str, client: StreamClient, layer: ChannelLayer,
                 history: History) -> None:  # fmt: skip
        self.scope = {}
        self.stream_id = stream_id
        self.client_id = client.id
        self.client = client
        self.inbox = Inbox(layer)
        self.delivery = Delivery(history, stream_id)
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[str | None]]] = []
        self._failures: dict[int, str] = {}
        self._tried_seq = 0  # last seq handed to the client (delivery may have read further)

    @property
    def user_id(self) -> int | None:
        return None

    async def open(self) -> str:
        """Create the bridge's channel; its name."""
        self.channel_name = await self.inbox.open("streaming.bridge.")
        return self.channel_name

    def start(self) -> asyncio.Task[None]:
        """Start delivering: first what history holds, then live chunks; the bridge's task."""
        self._task = asyncio.create_task(self._run(), name=f"streaming-bridge-{self.client_id}")
        return self._task

    async def stop(self) -> None:
        """Stop delivering and release the client (nothing is said to it)."""
        self.ended = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.wait([self._task])
        await self.release()

    def delivered(self, seq: int) -> asyncio.Future[str | None]:
        """A future resolved once ``seq`` was tried: None, or the send error's message."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if self._tried_seq >= seq or self._task is None or self._task.done():
            future.set_result(self._failures.pop(seq, None))
        else:
            self._waiters.append((seq, future))
        return future

    async def _run(self) -> None:
        try:
            await self.fill()
            while not self.ended:
                await self.dispatch_event(await self.inbox.get())
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("bridge for client %s on stream %s failed", self.client_id,
                             self.stream_id)  # fmt: skip
        finally:
            self._settle(None)
            await self.release()

    async def _release(self) -> None:
        try:
            await super()._release()
        finally:
            await self.inbox.close()

    async def write_chunk(self, seq: int, chunk_json: str) -> bool:
        try:
            await self.client.send_chunk(parse_chunk(json.loads(chunk_json)))
        except Exception as exc:
            waited = any(waiting == seq for waiting, _ in self._waiters)
            if waited:
                self._failures[seq] = f"{type(exc).__name__}: {exc}"
            await self.send_failed(exc, inline=waited)
        self._settle(seq)
        return True  # a plain client's failure does not stop the ones after it

    async def write_gap(self, gap: Gap) -> bool:
        logger.warning("stream %s: client %s missed seq %d-%d (no longer in history)",
                       self.stream_id, self.client_id, gap.from_seq, gap.to_seq)  # fmt: skip
        self._settle(gap.to_seq)
        return True

    async def end(self, code: int, reason: str, *, close: bool = True) -> None:
        """Tell the plain client the stream closed (not when it was only deregistered) and
        call its optional ``close``."""
        if self.ended:
            return
        self.ended = True
        try:
            if code != CloseCode.DEREGISTERED:
                await self.client.notify_stream_closed(reason)
            closer = getattr(self.client, "close", None)
            if close and closer is not None:
                await closer(reason)
        except Exception:
            logger.exception("closing client %s of stream %s failed", self.client_id,
                             self.stream_id)  # fmt: skip

    def _settle(self, up_to: int | None) -> None:
        if up_to is not None:
            self._tried_seq = max(self._tried_seq, up_to)
        keep = []
        for seq, future in self._waiters:
            if up_to is None or seq <= up_to:
                if not future.done():
                    future.set_result(self._failures.pop(seq, None))
            else:
                keep.append((seq, future))
        self._waiters = keep
