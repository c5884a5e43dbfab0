"""``wait_closed``: learn at once that a stream closed, whoever closed it in any process.

One watch per stream and process, shared by its waiters: a channel of its own in the stream's
control group. The last waiter to leave (answered, or cancelled) stops it, and stopping it gives
back the group membership and the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .exceptions import StreamError
from .layers import CLOSED, Inbox

if TYPE_CHECKING:
    from .manager import StreamingManager

logger = logging.getLogger(__name__)


class _Watch:
    def __init__(self, manager: StreamingManager, stream_id: str) -> None:
        self.manager = manager
        self.stream_id = stream_id
        self.reason: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters = 0
        self.inbox = Inbox(manager.layer.layer)
        self.task: asyncio.Task[None] | None = None
        self._cleanup: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Join the control group (before reading the row, so no close slips by), then see
        whether the stream is closed already."""
        try:
            await self.inbox.open("streaming.watch.")
            self.task = asyncio.create_task(self._read(), name=f"streaming-watch-{self.stream_id}")
            await self.manager.layer.watch(self.stream_id, self.inbox.name)
            stream = await self.manager.registry.get_stream(self.stream_id)
        except asyncio.CancelledError:
            self.reason.cancel()
            raise
        except Exception as exc:
            if not self.reason.done():
                self.reason.set_exception(exc)
            raise
        if not stream.is_active and not self.reason.done():
            self.reason.set_result(stream.close_reason)

    async def _read(self) -> None:
        try:
            while not self.reason.done():
                event = await self.inbox.get()
                if event.get("type") == CLOSED and not self.reason.done():
                    self.reason.set_result(str(event["reason"]))
        finally:
            await self.clean_up()

    async def clean_up(self) -> None:
        """Leave the control group and give the channel back (once, to the end)."""
        if self._cleanup is None:
            self._cleanup = asyncio.ensure_future(self._leave())
        await asyncio.shield(self._cleanup)

    async def _leave(self) -> None:
        try:
            if self.inbox.name:
                with contextlib.suppress(StreamError):
                    await self.manager.layer.unwatch(self.stream_id, self.inbox.name)
        finally:
            await self.inbox.close()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()  # its clean-up is shielded: it runs to the end regardless
            await asyncio.wait([self.task])
        await self.clean_up()
        if not self.reason.done():
            self.reason.cancel()
        elif not self.reason.cancelled():
            self.reason.exception()  # retrieved: whoever cared has seen it


class Watches:
    """The watches of this process, one per stream that somebody waits on."""

    def __init__(self, manager: StreamingManager) -> None:
        self.manager = manager
        self._watches: dict[str, _Watch] = {}

    def __len__(self) -> int:
        return len(self._watches)

    async def wait_closed(self, stream_id: str) -> str:
        """The close reason, as soon as the stream is closed (now, if it is already).

        Raises ``StreamError(RESOURCE_NOT_FOUND)``."""
        watch = self._watches.get(stream_id)
        starter = watch is None
        if watch is None:
            watch = self._watches[stream_id] = _Watch(self.manager, stream_id)
        watch.waiters += 1
        try:
            if starter:
                await watch.start()
            return await asyncio.shield(watch.reason)
        finally:
            watch.waiters -= 1
            if watch.waiters == 0:
                if self._watches.get(stream_id) is watch:
                    del self._watches[stream_id]
                await watch.stop()

    async def stop(self) -> None:
        """Stop every watch (its waiters get ``CancelledError``)."""
        watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            await watch.stop()

    def cancel(self) -> None:
        for watch in self._watches.values():
            if watch.task is not None:
                watch.task.cancel()
