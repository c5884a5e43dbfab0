"""The ``StreamClient`` contract, in-order delivery with repair, and the bridge for plain objects.

Clients that live on the channel layer themselves (the WebSocket and SSE consumers) satisfy
``ChannelClient``. Any other object that satisfies ``StreamClient`` is carried by a
``ChannelBridge``: a channel of its own in the registering process, so pushes from any process
reach it in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .chunks import AgentOSResponse, encode_chunk, parse_chunk
from .conf import app_settings
from .history import History
from .layers import CHUNK, CLOSED, DEREGISTERED, SYNC, ChannelLayer
from .protocol import ServerFrame, chunk_frame, frame

logger = logging.getLogger(__name__)


@runtime_checkable
class StreamClient(Protocol):
    """The seed's ``IStreamClient``; ``close(reason)`` is optional and called when present."""

    @property
    def id(self) -> str: ...

    async def send_chunk(self, chunk: AgentOSResponse) -> None: ...

    async def notify_stream_closed(self, reason: str | None = None) -> None: ...

    def is_active(self) -> bool: ...


@runtime_checkable
class ChannelClient(StreamClient, Protocol):
    """A client that receives stream events on its own Channels channel (a consumer)."""

    channel_name: str
    transport: str

    @property
    def user_id(self) -> int | None: ...


@dataclass(frozen=True)
class Chunk:
    seq: int
    chunk_json: str


@dataclass(frozen=True)
class Gap:
    from_seq: int
    to_seq: int


class Delivery:
    """One client's position in a stream: drops duplicates and fills holes from history.

    Every chunk comes out once, in seq order; a range history no longer holds comes out as a
    ``Gap`` instead of silence.
    """

    def __init__(self, history: History, stream_id: str, delivered_seq: int = 0) -> None:
        self.history = history
        self.stream_id = stream_id
        self.delivered_seq = delivered_seq

    async def receive(self, seq: int, chunk_json: str) -> list[Chunk | Gap]:
        """What to send for a live chunk event."""
        if seq <= self.delivered_seq:
            return []
        items = await self.catch_up(seq - 1) if seq > self.delivered_seq + 1 else []
        items.append(Chunk(seq, chunk_json))
        self.delivered_seq = seq
        return items

    async def catch_up(self, up_to: int | None = None) -> list[Chunk | Gap]:
        """Everything after the delivered seq up to ``up_to`` (default: the head) from history."""
        replay = await self.history.read_after(self.stream_id, self.delivered_seq, up_to)
        last = replay.head_seq if up_to is None else up_to
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


class Follower:
    """What every transport's client shares: who it is, how far it has been served, and the
    frames it sends (a mixin for the WebSocket consumer and the SSE response)."""

    scope: dict[str, Any]
    stream_id: str
    client_id: str
    delivery: Delivery | None = None

    @property
    def id(self) -> str:
        return self.client_id

    @property
    def user_id(self) -> int | None:
        user = self.scope.get("user")
        return user.pk if user is not None and user.is_authenticated else None

    @property
    def delivered_seq(self) -> int:
        return self.delivery.delivered_seq if self.delivery is not None else 0

    def item_frames(self, items: list[Chunk | Gap]) -> list[tuple[ServerFrame, int | None, str]]:
        """``(frame type, seq, JSON text)`` for chunks and gaps."""
        frames: list[tuple[ServerFrame, int | None, str]] = []
        for item in items:
            if isinstance(item, Chunk):
                frames.append((ServerFrame.CHUNK, item.seq, chunk_frame(item.seq, item.chunk_json)))
            else:
                text = frame(ServerFrame.GAP, from_seq=item.from_seq, to_seq=item.to_seq)
                frames.append((ServerFrame.GAP, None, text))
        return frames

    def out_of_band_frame(self, chunk: AgentOSResponse) -> str:
        """A chunk sent to this client alone, outside the stream's sequence (``seq`` null)."""
        text = encode_chunk(chunk, stream_id=self.stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
        return f'{{"type":"chunk","seq":null,"chunk":{text}}}'

    def closed_frame(self, reason: str | None) -> str:
        return frame(ServerFrame.CLOSED, reason=reason or "", last_seq=self.delivered_seq)

    def reconnect_frame(self, reason: str) -> str:
        return frame(ServerFrame.RECONNECT, reason=reason, last_seq=self.delivered_seq)


FailureHandler = Callable[[str, str, BaseException, bool], Awaitable[None]]


class ChannelBridge:
    """Carries a plain ``StreamClient`` onto a channel of its own and delivers to it in order.

    ``delivered(seq)`` lets the producer in this process wait until the client was tried,
    so ``push_chunk`` keeps the seed's "after every client was tried" semantics for it.
    """

    transport = "python"

    def __init__(
        self,
        stream_id: str,
        client: StreamClient,
        layer: ChannelLayer,
        history: History,
        on_failure: FailureHandler,
    ) -> None:
        self.stream_id = stream_id
        self.client = client
        self.layer = layer
        self.delivery = Delivery(history, stream_id)
        self.on_failure = on_failure
        self.channel_name = ""
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[str | None]]] = []
        self._failures: dict[int, str] = {}
        self._stopped = False
        self._tried_seq = 0  # last seq handed to the client (delivery may have read further)

    @property
    def id(self) -> str:
        return self.client.id

    async def open(self) -> str:
        """Create the bridge's channel; its name."""
        self.channel_name = await self.layer.new_channel("streaming.bridge.")
        return self.channel_name

    def start(self) -> asyncio.Task[None]:
        """Start delivering: first what history holds, then live chunks; the bridge's task."""
        self._task = asyncio.create_task(self._run(), name=f"streaming-bridge-{self.id}")
        return self._task

    async def stop(self) -> None:
        """Stop delivering; anyone waiting on ``delivered`` is released."""
        self._stopped = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._release(None)

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
            await self._send(await self.delivery.catch_up())
            while not self._stopped:
                event = await self.layer.receive(self.channel_name)
                if not await self._dispatch(event):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("bridge for client %s on stream %s failed", self.id, self.stream_id)
        finally:
            self._release(None)

    async def _dispatch(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind == CHUNK:
            await self._send(await self.delivery.receive(event["seq"], event["chunk"]))
            return True
        if kind == CLOSED:
            await self._send(await self.delivery.catch_up(event["last_seq"]))
            await self._finish(event["reason"])
            return False
        if kind == SYNC:
            await self._send(await self.delivery.catch_up(event["head_seq"]))
            if event["closed"]:
                await self._finish(event["reason"])
                return False
            return True
        if kind == DEREGISTERED:
            await self._finish(event["reason"], notify=False)
            return False
        logger.warning("bridge for client %s ignores event %r", self.id, kind)
        return True

    async def _send(self, items: list[Chunk | Gap]) -> None:
        for item in items:
            if self._stopped:
                return
            if isinstance(item, Gap):
                logger.warning(
                    "stream %s: client %s missed seq %d-%d (no longer in history)",
                    self.stream_id, self.id, item.from_seq, item.to_seq,
                )  # fmt: skip
                self._release(item.to_seq)
                continue
            try:
                await self.client.send_chunk(parse_chunk(json.loads(item.chunk_json)))
            except Exception as exc:
                waited = any(seq == item.seq for seq, _ in self._waiters)
                if waited:
                    self._failures[item.seq] = f"{type(exc).__name__}: {exc}"
                await self.on_failure(self.stream_id, self.id, exc, waited)
            self._release(item.seq)

    async def _finish(self, reason: str, *, notify: bool = True) -> None:
        try:
            if notify:
                await self.client.notify_stream_closed(reason)
            close = getattr(self.client, "close", None)
            if close is not None:
                await close(reason)
        except Exception:
            logger.exception("closing client %s of stream %s failed", self.id, self.stream_id)

    def _release(self, up_to: int | None) -> None:
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
