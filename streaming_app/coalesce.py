"""Coalescing text deltas: an opt-in window per stream in which consecutive ``text_delta``
chunks of the same kind are merged into one chunk before they are numbered and sent, as agent
UIs do to cut frame counts.

The window is the pushing process's business (nothing else sees a delta before it is pushed):
``COALESCE_TEXT_MS`` for every stream this process pushes to, or per stream
``create_stream(coalesce_ms=...)`` / :meth:`Coalescer.set_window`. With a window of W ms:

- a delta pushed when no text went out for W ms goes out at once (no added latency); one
  pushed sooner is held, and what is held goes out, merged, W ms after the last text went
  out: no delta waits longer than W, and a steady stream makes at most one text frame per W;
- only consecutive non-final deltas with the same ``gmi_instance_id``, ``persona_id`` and
  ``metadata`` merge (the merged chunk keeps the first one's fields and ``timestamp``), and
  never beyond ``MAX_CHUNK_BYTES``; any other chunk (tool calls, progress, a final response,
  an error, a final delta) is never merged and takes what is held with it, before it, in
  the same history round trip;
- ``close_stream``, ``handle_stream_error``, ``push_chunks`` and :meth:`Coalescer.flush`
  send what is held first. A held delta's ``push_chunk`` returns 0 (its seq is not known
  until it goes out); a flush that fails is logged with the stream id, counted
  (``manager.stats["coalesce_flush_failures"]``), kept, and raised by the producer's next
  ``push_chunk`` / ``push_chunks`` on that stream (which then sends nothing), the one after
  sending it again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from .chunks import AgentOSResponse, TextDeltaChunk, encode_chunk, parse_chunk
from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError

if TYPE_CHECKING:
    from .manager import StreamingManager

logger = logging.getLogger(__name__)

MAX_WINDOW_MS = 1000
# A stream whose push failed with one of these cannot take what is held: it is dropped.
_GONE = (GMIErrorCode.STREAM_CLOSED, GMIErrorCode.RESOURCE_NOT_FOUND)


def window_error(value: Any) -> str | None:
    """What is wrong with a window in ms (a number from 0, off, to ``MAX_WINDOW_MS``); None
    when it is fine."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or not 0 <= value <= MAX_WINDOW_MS
    ):
        return f"must be a number of ms from 0 (off) to {MAX_WINDOW_MS}, not {value!r}"
    return None


def validate_window(
    value: Any, *, stream_id: str | None = None, name: str = "coalesce_ms"
) -> float:
    """The window in seconds; raises ``StreamError(INVALID_ARGUMENT)`` for a bad value."""
    problem = window_error(value)
    if problem is not None:
        raise StreamError(GMIErrorCode.INVALID_ARGUMENT, f"{name} {problem}",
                          stream_id=stream_id)  # fmt: skip
    return float(value) / 1000


class _Stream:
    """One stream's coalescing in this process: its window, the batch being held, merged
    chunks whose push failed (they go first), and the deadline task."""

    __slots__ = ("error", "first", "last_sent", "lock", "parts", "size", "timer", "unsent",
                 "used", "window")  # fmt: skip

    def __init__(self, window: float) -> None:
        self.window = window  # seconds; 0: off
        self.lock = asyncio.Lock()  # one send at a time, in order
        self.first: TextDeltaChunk | None = None
        self.parts: list[str] = []
        self.size = 0  # bytes of the merged chunk's JSON form
        self.unsent: list[AgentOSResponse] = []
        self.last_sent = -math.inf  # loop time the last text went out
        self.timer: asyncio.Task[None] | None = None
        self.error: BaseException | None = None  # a deadline's failure, for the next push
        self.used = time.monotonic()

    @property
    def held(self) -> int:
        return len(self.parts) + len(self.unsent)

    def take(self) -> list[AgentOSResponse]:
        """What is held, in order, as the chunks to send; nothing is held after."""
        chunks, self.unsent = self.unsent, []
        if self.first is not None:
            first, parts = self.first, self.parts
            if len(parts) > 1:
                first = dataclasses.replace(first, text_delta="".join(parts))
            chunks.append(first)
            self.first, self.parts, self.size = None, [], 0
        return chunks


def _mergeable(chunk: AgentOSResponse) -> bool:
    return isinstance(chunk, TextDeltaChunk) and not chunk.is_final


def _same_kind(a: TextDeltaChunk, b: TextDeltaChunk) -> bool:
    return (a.gmi_instance_id, a.persona_id, a.metadata) == (b.gmi_instance_id, b.persona_id,
                                                             b.metadata)  # fmt: skip


class Coalescer:
    """This process's held text deltas, per stream; owned by the manager, which calls it only
    while :attr:`enabled` (a default window, or a stream with a window of its own)."""

    def __init__(self, manager: StreamingManager) -> None:
        self.manager = manager
        self.default = 0.0  # seconds, from COALESCE_TEXT_MS
        self.streams: dict[str, _Stream] = {}
        self.enabled = False
        self._prune_at = 64

    def configure(self, default_ms: Any) -> None:
        """Set the window of streams without one of their own (``COALESCE_TEXT_MS``)."""
        self.default = validate_window(default_ms, name="STREAMING_APP['COALESCE_TEXT_MS']")
        self._update()

    def set_window(self, stream_id: str, window_ms: float) -> None:
        """Coalesce this stream's text deltas pushed from this process within ``window_ms``
        (0: off, whatever ``COALESCE_TEXT_MS`` says). Raises ``StreamError(INVALID_ARGUMENT)``."""
        window = validate_window(window_ms, stream_id=stream_id)
        state = self._state(stream_id)
        state.window = window
        self._update()

    async def push(self, stream_id: str, chunk: AgentOSResponse | dict[str, Any]) -> int:
        """``push_chunk`` with coalescing: the chunk's seq, or 0 for a delta held to merge."""
        state = self.streams.get(stream_id)
        if state is None and not self.default:
            return await self._push_now(stream_id, [chunk])
        state = state or self._state(stream_id)
        state.used = time.monotonic()
        self._raise_failure(state)
        typed = chunk if isinstance(chunk, AgentOSResponse) else parse_chunk(chunk)
        if not state.window or not _mergeable(typed):
            # A bad chunk is refused before it can take held text (and its deadline) with it.
            encode_chunk(typed, stream_id=stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
            async with state.lock:
                return (await self._send(stream_id, state, [typed], raise_failures=True))[-1]
        assert isinstance(typed, TextDeltaChunk)
        if typed.stream_id != stream_id:  # encode_chunk's refusal, before anything is held
            encode_chunk(typed, stream_id=stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
        limit, loop = app_settings.MAX_CHUNK_BYTES, asyncio.get_running_loop()
        text = ""
        while True:  # again after each await: another task may have held text meanwhile
            first = state.first
            if first is not None and _same_kind(first, typed):
                added = len(json.dumps(typed.text_delta, ensure_ascii=False).encode()) - 2
                if state.size + added <= limit:
                    state.parts.append(typed.text_delta)
                    state.size += added
                    self.manager.stats["text_deltas_held"] += 1
                    return 0
            text = text or encode_chunk(typed, stream_id=stream_id, max_bytes=limit)
            if first is not None:  # another kind, or full: what is held goes first
                async with state.lock:
                    await self._send(stream_id, state, [], raise_failures=True)
                continue
            quiet = loop.time() - state.last_sent >= state.window
            if quiet and not state.unsent and not state.lock.locked():
                # No text went out for a window: no reason to wait.
                async with state.lock:
                    state.last_sent = loop.time()
                    return (await self._send(stream_id, state, [typed], raise_failures=True))[-1]
            break
        state.first, state.parts, state.size = typed, [typed.text_delta], len(text.encode())
        self.manager.stats["text_deltas_held"] += 1
        if state.timer is None:
            delay = max(0.0, state.last_sent + state.window - loop.time())
            state.timer = loop.create_task(self._deadline(stream_id, state, delay),
                                           name=f"coalesce-{stream_id}")  # fmt: skip
        return 0

    async def push_many(
        self, stream_id: str, chunks: list[AgentOSResponse | dict[str, Any]], *,
        raise_failures: bool = True,
    ) -> list[int]:  # fmt: skip
        """``push_chunks`` (and ``handle_stream_error``'s push): what is held goes first, in
        the same round trip; nothing is merged. The seqs of ``chunks``."""
        state = self.streams.get(stream_id)
        if state is None:
            return await self.manager._push(stream_id, chunks, raise_failures=raise_failures)
        state.used = time.monotonic()
        if raise_failures:
            self._raise_failure(state)
        for chunk in chunks:  # a bad one is refused before it can take held text with it
            encode_chunk(chunk, stream_id=stream_id, max_bytes=app_settings.MAX_CHUNK_BYTES)
        async with state.lock:
            seqs = await self._send(stream_id, state, chunks, raise_failures=raise_failures)
        return seqs[len(seqs) - len(chunks) :]

    async def push_now(self, stream_id: str, chunk: AgentOSResponse | dict[str, Any]) -> int:
        """``push_chunk`` that holds nothing (for the sync facade, whose calls may each run in
        an event loop that ends with it): what is held goes first."""
        return (await self.push_many(stream_id, [chunk]))[-1]

    async def flush(self, stream_id: str) -> int | None:
        """Send what is held for a stream now; the seq of the last chunk sent, None when
        nothing was held. Raises as ``push_chunk``."""
        state = self.streams.get(stream_id)
        if state is None:
            return None
        self._raise_failure(state)
        async with state.lock:
            seqs = await self._send(stream_id, state, [], raise_failures=True)
        return seqs[-1] if seqs else None

    async def before_close(self, stream_id: str) -> None:
        """Send what is held before the stream closes, then forget the stream. Raises
        ``BACKEND_UNAVAILABLE`` (held text kept, for a retry of the close); a stream that is
        closed or unknown already drops it (logged and counted)."""
        state = self.streams.get(stream_id)
        if state is None:
            return
        state.error = None  # logged when it happened; the close goes on
        try:
            async with state.lock:
                await self._send(stream_id, state, [], raise_failures=False)
        except StreamError as exc:
            if exc.code not in _GONE:
                raise
        self.forget(stream_id)

    def forget(self, stream_id: str) -> None:
        state = self.streams.pop(stream_id, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()
        self._update()

    async def stop(self) -> None:
        """Send what every stream holds (failures logged), and end the deadline tasks."""
        for stream_id, state in list(self.streams.items()):
            timer, state.timer = state.timer, None
            if timer is not None:
                timer.cancel()
                if timer.get_loop() is asyncio.get_running_loop():
                    await asyncio.gather(timer, return_exceptions=True)
            if state.held:
                with contextlib.suppress(StreamError):  # logged and counted by _send
                    async with state.lock:
                        await self._send(stream_id, state, [], raise_failures=False)

    def cancel(self) -> None:
        """End the deadline tasks without awaiting them (a sync reset): what is held is lost,
        and logged."""
        for stream_id, state in self.streams.items():
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
            if state.held:
                self._failed(stream_id, state.held, "the manager was reset")
        self.streams.clear()
        self._update()

    # -- internals ----------------------------------------------------------------------

    async def _push_now(self, stream_id: str, chunks: list[AgentOSResponse | dict[str, Any]]
                        ) -> int:  # fmt: skip
        return (await self.manager._push(stream_id, chunks, raise_failures=True))[-1]

    async def _send(
        self, stream_id: str, state: _Stream, extra: list[AgentOSResponse | dict[str, Any]], *,
        raise_failures: bool,
    ) -> list[int]:  # fmt: skip
        """Push what is held, then ``extra``, in one history round trip (the caller holds the
        lock); the seqs of all. On failure what was held is kept, unless it went out or
        the stream is gone."""
        timer = state.timer
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()  # it sleeps, or waits for the lock: nothing is left for it to send
        state.timer = None
        held = state.take()
        chunks = [*held, *extra]
        if not chunks:
            return []
        if held:  # the window runs from when text goes out, not from when the push returns
            state.last_sent = asyncio.get_running_loop().time()
        try:
            seqs = await self.manager._push(stream_id, chunks, raise_failures=raise_failures)
        except StreamError as exc:
            if held:
                if exc.code in _GONE or exc.details.get("pushed"):
                    if not exc.details.get("pushed"):
                        self._failed(stream_id, len(held), exc)
                    if exc.code in _GONE:
                        self.forget(stream_id)
                else:
                    state.unsent = held  # sent again, first, by the next call
            raise
        except BaseException:
            state.unsent = held
            raise
        return seqs

    async def _deadline(self, stream_id: str, state: _Stream, delay: float) -> None:
        """The window's end: send what is held. A failure is logged, counted and kept for the
        producer's next push."""
        await asyncio.sleep(delay)
        try:
            async with state.lock:
                await self._send(stream_id, state, [], raise_failures=True)
        except StreamError as exc:
            if exc.code in _GONE:
                return  # logged and counted by _send; the next push says STREAM_CLOSED
            if not exc.details.get("pushed"):  # kept, sent again by the next call
                self._failed(stream_id, state.held, exc)
            state.error = exc
        except Exception as exc:
            logger.exception("stream %s: held text deltas not pushed", stream_id)
            self.manager.stats["coalesce_flush_failures"] += 1
            state.error = exc

    def _raise_failure(self, state: _Stream) -> None:
        error, state.error = state.error, None
        if error is not None:
            raise error

    def _failed(self, stream_id: str, held: int, why: object) -> None:
        self.manager.stats["coalesce_flush_failures"] += 1
        logger.warning("stream %s: %d held text chunk(s) not pushed: %s", stream_id, held, why)

    def _state(self, stream_id: str) -> _Stream:
        state = self.streams.get(stream_id)
        if state is None:
            if len(self.streams) >= self._prune_at:
                self._prune()
            state = self.streams[stream_id] = _Stream(self.default)
        return state

    def _prune(self) -> None:
        """Forget streams that hold nothing and were not used for ``HISTORY_MAX_AGE_SECONDS``
        (closed by someone else, most likely), so the map stays as big as the live streams."""
        cutoff = time.monotonic() - app_settings.HISTORY_MAX_AGE_SECONDS
        for stream_id, state in list(self.streams.items()):
            if state.used < cutoff and not state.held and state.timer is None:
                del self.streams[stream_id]
        self._prune_at = max(64, 2 * len(self.streams))

    def _update(self) -> None:
        self.enabled = bool(self.default or self.streams)
