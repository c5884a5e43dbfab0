"""One subscription per stream and process for the WebSocket clients: the stream's events are
received once and handed to each client of this process directly.

A Channels consumer that joins a group gets every event on a channel of its own: the layer
queues it once per consumer, the consumer's loop decodes it again and starts a task for it.
That per-client cost was a third of a worker's CPU per delivered chunk. Here the stream's
group has one member per process, a :class:`Hub`, whose task receives each event once and
offers it to every client of the stream in this process (:meth:`Follower.offer`): the next
chunk of a client that is free is written at once; anything else (a hole to fill from history,
a paused client, a close) goes to the client's own mailbox and is handled by its own task, in
order, as before. A client's own channel still gets what is sent to it alone (``stream.sync``,
``stream.deregistered``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from .exceptions import StreamError
from .layers import Inbox

if TYPE_CHECKING:
    from .clients import Follower
    from .layers import StreamLayer

logger = logging.getLogger(__name__)


_spawned: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` in a task of its own, kept until it is done (the loop holds tasks weakly)."""
    task = asyncio.ensure_future(coro)
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` at once, up to the first time it waits: None when it finished without
    waiting (a write under Daphne, which queues it), else a task that finishes it, so that
    a client whose send waits for its peer (uvicorn, hypercorn) does not hold the hub up.
    What Python 3.12 calls an eager task. It runs in a context of its own from the start, as
    a task would: what it sets there (asgiref's marker of a database call in flight, set
    until the call returns) must not stay behind in the caller's."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_finish(coro, waiting_on), context=context)


async def _finish(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Go on with a coroutine that started elsewhere: wait for what it waits on, resume it."""
    try:
        while True:
            if waiting_on is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                await asyncio.wait([waiting_on])
            try:
                waiting_on = coro.send(None)
            except StopIteration:
                return
    except asyncio.CancelledError:
        coro.close()
        raise


class Hub:
    """A stream's member of its group in this process, and the clients it hands events to."""

    def __init__(self, layer: StreamLayer, stream_id: str) -> None:
        self.layer = layer
        self.stream_id = stream_id
        self.inbox = Inbox(layer.layer)
        self.followers: dict[str, Follower] = {}
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.dispatching = False  # handing an event to the clients (not waiting for one)

    async def open(self) -> None:
        channel = await self.inbox.open("streaming.hub.")
        try:
            await self.layer.join(self.stream_id, channel)
        except BaseException:
            await self.inbox.close()
            raise
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"streaming-hub-{self.stream_id}"
        )

    async def close(self) -> None:
        """Leave the group and stop. A hub handing out an event finishes it first (one of its
        clients may be ending, and cancelling would cut that short); the hub releases its
        channel as it stops."""
        self.closed = True
        with contextlib.suppress(StreamError):
            await self.layer.leave(self.stream_id, self.inbox.name)
        task, self.task = self.task, None
        if task is not None and not self.dispatching:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            while not self.closed:
                try:
                    event = await self.inbox.get()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the layer failed: the sweeper's nudges repair what was missed
                    logger.exception("stream %s: its hub could not receive", self.stream_id)
                    await asyncio.sleep(1)
                    continue
                self.dispatching = True
                try:
                    for follower in list(self.followers.values()):
                        try:
                            await follower.offer(event)
                        except Exception as exc:  # one client's failure is its own
                            await follower.crashed(exc)
                finally:
                    self.dispatching = False
        finally:
            await self.inbox.close()


class Fanout:
    """This process's hubs, one per stream with WebSocket clients here."""

    def __init__(self, layer: StreamLayer) -> None:
        self.layer = layer
        self.hubs: dict[str, Hub] = {}
        # Opening and closing a stream's hub wait on the layer; its clients that come or go
        # meanwhile wait for that stream's lock only (a lock shared by every stream made a
        # connect storm's joins and leaves queue behind each other's layer calls, and scanning
        # its queue of waiters at each acquire cost 0.15 ms per leaving client). Other joins
        # and leaves add or remove themselves without waiting: (lock, users) per stream.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def _serialized(self, stream_id: str) -> AsyncIterator[None]:
        """Hold ``stream_id``'s lock (kept only while someone holds or waits for it)."""
        lock, users = self._locks.get(stream_id) or (asyncio.Lock(), 0)
        self._locks[stream_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[stream_id]
            if users == 1:
                del self._locks[stream_id]
            else:
                self._locks[stream_id] = (lock, users - 1)

    async def join(self, follower: Follower) -> None:
        """Hand ``follower`` its stream's events from now on (opening the hub if needed)."""
        hub = self.hubs.get(follower.stream_id)
        if hub is not None:  # open: a hub is listed only while it is, and nothing awaits here
            hub.followers[follower.client_id] = follower
            return
        async with self._serialized(follower.stream_id):
            hub = self.hubs.get(follower.stream_id)  # another client may have opened it
            if hub is None:
                hub = Hub(self.layer, follower.stream_id)
                await hub.open()
                self.hubs[follower.stream_id] = hub
            hub.followers[follower.client_id] = follower

    async def leave(self, follower: Follower) -> None:
        """Stop handing ``follower`` events; the last one out closes the hub."""
        hub = self.hubs.get(follower.stream_id)
        if hub is None or hub.followers.get(follower.client_id) is not follower:
            return
        del hub.followers[follower.client_id]
        if hub.followers:
            return
        del self.hubs[follower.stream_id]  # the next client to come opens a new one
        # Closed to the end even if the caller is cancelled: nothing lists the hub any more.
        await asyncio.shield(self._close(hub))

    async def _close(self, hub: Hub) -> None:
        async with self._serialized(hub.stream_id):  # a new hub of the stream opens after
            await hub.close()
