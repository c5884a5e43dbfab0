"""Per-stream hot state: sequence numbers, bounded history, the closed flag and send failures.

This is what ``push_chunk`` touches instead of the database. ``MemoryHistory`` serves the
embedded one-process default; ``RedisHistory`` (``streaming_app.redis_history``) shares it
between processes. Both keep the last ``HISTORY_MAX_CHUNKS`` chunks for at most
``HISTORY_MAX_AGE_SECONDS``, so a client can resume and repair holes.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError


@dataclass(frozen=True)
class StreamState:
    """A stream's state as the history sees it."""

    head_seq: int  # last seq assigned; 0 before the first chunk
    first_seq: int  # oldest seq still held; head_seq + 1 when none is held
    closed: bool
    close_reason: str
    last_activity: float  # time.time() of the last push (or of opening)
    closed_at: float = 0.0  # time.time() of the close (0 while open)


@dataclass(frozen=True)
class AppendResult:
    """``seq`` of the appended chunk, or, when pending send failures stopped it, those."""

    seq: int | None
    failed_clients: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Closed:
    """What ``close`` found: the head seq, whether this call closed it (else: already), and
    the reason it was closed with (the first close's)."""

    head_seq: int
    was_open: bool
    reason: str


@dataclass(frozen=True)
class Replay:
    """Chunks after a given seq, as ``(seq, chunk_json)`` in order, and the head seq."""

    entries: list[tuple[int, str]]
    head_seq: int


class History(Protocol):
    """What the manager and the clients need of a history backend (a class named by
    ``HISTORY_BACKEND`` with a ``from_settings()`` classmethod)."""

    #: Whether every process sees the same history (False: this process's memory only).
    shared: bool

    async def open(self, stream_id: str) -> None:
        """Start an empty history for a new stream."""

    async def append(
        self, stream_id: str, chunk_json: str, *, take_failures: bool, publish_to: str = ""
    ) -> AppendResult:
        """Give the chunk the next seq and keep it; raise StreamError if unknown or closed.

        With ``take_failures``, pending send failures are removed and returned instead, and
        nothing is appended. ``publish_to`` (only when :meth:`publish_prefix` gave a prefix)
        names where to send the ``stream.chunk`` event, atomically (the layer's pub/sub
        channel, or its core group: ``StreamLayer.group_target``).
        """

    async def append_many(
        self, stream_id: str, chunk_jsons: Sequence[str], *, take_failures: bool,
        publish_to: str = "",
    ) -> AppendResult:  # fmt: skip
        """:meth:`append` for several chunks at once, atomically: consecutive seqs, ``seq``
        the last of them."""

    def publish_prefix(self, layer_target: tuple[str, str] | None) -> str:
        """The prefix of group channels this history can publish to itself, given the layer's
        ``(redis address, group channel prefix)``; "" when it cannot."""

    async def read_after(self, stream_id: str, after_seq: int, up_to: int | None = None) -> Replay:
        """The chunks held with ``after_seq < seq <= up_to``."""

    async def close(self, stream_id: str, reason: str) -> Closed | None:
        """Mark the stream closed (pushes raise from now on); None if unknown."""

    async def states(self, stream_ids: Iterable[str]) -> dict[str, StreamState]:
        """The state of each known stream among ``stream_ids``."""

    async def record_failure(self, stream_id: str, client_id: str, message: str) -> None:
        """Remember that sending to a client failed, for the producer's next push."""

    async def forget(self, stream_id: str) -> None:
        """Drop everything held for a stream."""

    async def snapshot(self, stream_id: str) -> tuple[int, str] | None:
        """The stored snapshot ``(seq, state JSON)`` of a stream, if any."""

    async def save_snapshot(self, stream_id: str, seq: int, state_json: str) -> None:
        """Store a snapshot, unless a newer one is stored (or the stream is unknown)."""

    def expire_closed(self) -> list[str]:
        """Drop closed streams whose history aged out (where the backend does not itself)."""

    async def aclose(self) -> None:
        """Close connections opened in the running event loop."""


@dataclass
class _MemoryStream:
    head_seq: int = 0
    entries: deque[tuple[int, float, str]] = field(default_factory=deque)
    closed: bool = False
    close_reason: str = ""
    closed_at: float = 0.0
    last_activity: float = field(default_factory=time.time)
    failures: dict[str, str] = field(default_factory=dict)
    size: int = 0  # bytes of the chunks held
    snapshot: tuple[int, str] | None = None


class MemoryHistory:
    """History in this process's memory: the embedded default for one process."""

    shared = False

    def __init__(
        self, *, max_chunks: int, max_age_seconds: float, max_total_bytes: float = math.inf
    ) -> None:
        self.max_chunks = max_chunks
        self.max_age_seconds = max_age_seconds
        self.max_total_bytes = max_total_bytes
        self._streams: dict[str, _MemoryStream] = {}
        self.size = 0  # bytes of every chunk held, in all streams
        self.evicted = 0  # chunks dropped to stay within max_total_bytes
        # (time of a stream's oldest chunk, stream id), oldest first; entries go stale when a
        # stream's oldest chunk changes and are refreshed when they come up.
        self._oldest: list[tuple[float, str]] = []

    @classmethod
    def from_settings(cls) -> MemoryHistory:
        """Built from ``HISTORY_MAX_CHUNKS``, ``HISTORY_MAX_AGE_SECONDS`` and
        ``HISTORY_MAX_TOTAL_BYTES``."""
        return cls(
            max_chunks=app_settings.HISTORY_MAX_CHUNKS,
            max_age_seconds=app_settings.HISTORY_MAX_AGE_SECONDS,
            max_total_bytes=app_settings.HISTORY_MAX_TOTAL_BYTES,
        )

    async def open(self, stream_id: str) -> None:
        self._streams[stream_id] = _MemoryStream()

    async def append(
        self, stream_id: str, chunk_json: str, *, take_failures: bool, publish_to: str = ""
    ) -> AppendResult:
        return await self.append_many(stream_id, [chunk_json], take_failures=take_failures,
                                      publish_to=publish_to)  # fmt: skip

    async def append_many(
        self, stream_id: str, chunk_jsons: Sequence[str], *, take_failures: bool,
        publish_to: str = "",
    ) -> AppendResult:  # fmt: skip
        assert not publish_to, "MemoryHistory cannot publish"
        stream = self._get_open(stream_id)
        if take_failures and stream.failures:
            failures, stream.failures = stream.failures, {}
            return AppendResult(seq=None, failed_clients=failures)
        now = time.time()
        if not stream.entries:
            heapq.heappush(self._oldest, (now, stream_id))
        for chunk_json in chunk_jsons:
            stream.head_seq += 1
            stream.entries.append((stream.head_seq, now, chunk_json))
            stream.size += len(chunk_json)
            self.size += len(chunk_json)
        stream.last_activity = now
        self._trim(stream, now)
        self._evict()
        return AppendResult(seq=stream.head_seq)

    async def read_after(self, stream_id: str, after_seq: int, up_to: int | None = None) -> Replay:
        stream = self._streams.get(stream_id)
        if stream is None:
            return Replay(entries=[], head_seq=0)
        self._trim(stream, time.time())
        last = stream.head_seq if up_to is None else min(up_to, stream.head_seq)
        if not stream.entries or last <= after_seq:
            return Replay(entries=[], head_seq=stream.head_seq)
        first = stream.entries[0][0]
        if last < first:  # all of the range was trimmed
            return Replay(entries=[], head_seq=stream.head_seq)
        start = max(after_seq + 1, first) - first
        stop = last - first + 1
        entries = [(seq, text) for seq, _, text in islice(stream.entries, start, stop)]
        return Replay(entries=entries, head_seq=stream.head_seq)

    def publish_prefix(self, layer_target: tuple[str, str] | None) -> str:
        return ""

    async def close(self, stream_id: str, reason: str) -> Closed | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        was_open = not stream.closed
        if was_open:
            stream.closed, stream.close_reason, stream.closed_at = True, reason, time.time()
        return Closed(stream.head_seq, was_open, stream.close_reason)

    async def states(self, stream_ids: Iterable[str]) -> dict[str, StreamState]:
        now = time.time()
        result = {}
        for stream_id in stream_ids:
            stream = self._streams.get(stream_id)
            if stream is None:
                continue
            self._trim(stream, now)
            first = stream.entries[0][0] if stream.entries else stream.head_seq + 1
            result[stream_id] = StreamState(
                head_seq=stream.head_seq,
                first_seq=first,
                closed=stream.closed,
                close_reason=stream.close_reason,
                last_activity=stream.last_activity,
                closed_at=stream.closed_at,
            )
        return result

    async def record_failure(self, stream_id: str, client_id: str, message: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.closed:
            stream.failures[client_id] = message

    async def forget(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self.size -= stream.size

    async def snapshot(self, stream_id: str) -> tuple[int, str] | None:
        stream = self._streams.get(stream_id)
        return stream.snapshot if stream is not None else None

    async def save_snapshot(self, stream_id: str, seq: int, state_json: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and (stream.snapshot is None or stream.snapshot[0] < seq):
            stream.snapshot = (seq, state_json)

    async def aclose(self) -> None:
        return None

    def expire_closed(self) -> list[str]:
        """Forget closed streams whose history has aged out; the ids forgotten."""
        cutoff = time.time() - self.max_age_seconds
        gone = [sid for sid, s in self._streams.items() if s.closed and s.closed_at < cutoff]
        for stream_id in gone:
            self.size -= self._streams.pop(stream_id).size
        if len(self._oldest) > 2 * len(self._streams) + 64:  # drop the stale entries
            self._oldest = [(s.entries[0][1], sid) for sid, s in self._streams.items()
                            if s.entries]  # fmt: skip
            heapq.heapify(self._oldest)
        return gone

    def _get_open(self, stream_id: str) -> _MemoryStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamError(
                GMIErrorCode.RESOURCE_NOT_FOUND,
                f"stream {stream_id!r} does not exist",
                stream_id=stream_id,
            )
        if stream.closed:
            raise StreamError(
                GMIErrorCode.STREAM_CLOSED,
                f"stream {stream_id!r} is closed ({stream.close_reason})",
                stream_id=stream_id,
                details={"reason": stream.close_reason},
            )
        return stream

    def _trim(self, stream: _MemoryStream, now: float) -> None:
        entries = stream.entries
        while len(entries) > self.max_chunks:
            self._drop_oldest(stream)
        cutoff = now - self.max_age_seconds
        while entries and entries[0][1] < cutoff:
            self._drop_oldest(stream)

    def _drop_oldest(self, stream: _MemoryStream) -> None:
        _, _, text = stream.entries.popleft()
        stream.size -= len(text)
        self.size -= len(text)

    def _evict(self) -> None:
        """Over ``max_total_bytes``: drop the oldest chunks of all streams, oldest first
        (clients that still need them get a ``gap``, as for any trimmed history)."""
        while self.size > self.max_total_bytes and self._oldest:
            at, stream_id = heapq.heappop(self._oldest)
            stream = self._streams.get(stream_id)
            if stream is None or not stream.entries:
                continue  # forgotten, or emptied: it is pushed again with its next chunk
            first_at = stream.entries[0][1]
            if first_at != at:  # stale: its oldest chunk changed since
                heapq.heappush(self._oldest, (first_at, stream_id))
                continue
            self._drop_oldest(stream)
            self.evicted += 1
            if stream.entries:
                heapq.heappush(self._oldest, (stream.entries[0][1], stream_id))
