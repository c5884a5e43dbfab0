"""Worker lifecycle: start serving, and let this worker's clients go cleanly when it stops.

Wrap the project's ASGI application in :class:`StreamingLifecycle`. Every server closes its
open connections itself when it is told to stop (Uvicorn with 1012, Hypercorn after its
graceful timeout, Daphne by cancelling every consumer), and sends ASGI ``lifespan.shutdown``,
where it sends it at all, only after that. So the signal is taken over in the serving process
when serving starts: on SIGTERM or SIGINT the worker first detaches (each client gets
``reconnect`` and close code 4012 with its ``last_seq``, and its row goes), then the server's
own handler runs. Serving starts at ``lifespan.startup`` (Uvicorn, Hypercorn) or, under Daphne
(no lifespan), once Twisted's reactor runs. ``lifespan.shutdown`` detaches too (nothing to do
if the signal did).

Handlers installed with ``signal.signal`` (Daphne's Twisted, Uvicorn) and with the event loop's
``add_signal_handler`` (Hypercorn run with ``--workers 0``) are both chained. Hypercorn's
worker processes (``--workers N``) never see the signal (their parent tells them through an
event): run one process per worker with ``--workers 0``, as with Daphne.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def detach_this_worker() -> int:
    """Release this process's clients (told to reconnect); the number released."""
    from . import manager as manager_module

    manager = manager_module._manager
    if manager is None or not manager.is_initialized:
        return 0
    return await manager.detach_worker()


class StreamingLifecycle:
    """ASGI middleware: ``lifespan`` for servers that send it, signal hooks under Daphne."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        install_daphne_hooks()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    from .manager import get_streaming_manager

                    get_streaming_manager().ensure_background()
                except Exception as exc:  # e.g. invalid settings: the server should not start
                    logger.exception("streaming worker failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                if threading.current_thread() is threading.main_thread():
                    _take_over_signals()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await detach_this_worker()
                except Exception as exc:
                    logger.exception("streaming worker failed to detach")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return


_hooked = False


def install_daphne_hooks() -> bool:
    """In a process run by Twisted's reactor (Daphne), take over SIGTERM and SIGINT once the
    reactor runs (after it installed its own handlers); True when scheduled."""
    global _hooked
    reactor: Any = sys.modules.get("twisted.internet.reactor")
    if reactor is None or _hooked:
        return False
    _hooked = True
    # Once running (its own handlers are installed during start-up), inside the event loop.
    reactor.callWhenRunning(lambda: reactor.callLater(0, _start_serving))
    return True


def _start_serving() -> None:
    start_worker()
    if threading.current_thread() is threading.main_thread():
        _take_over_signals()
    else:  # runserver's autoreloader serves from a thread: signals stay the reloader's
        logger.debug("streaming worker: not in the main thread, signals left as they are")


def start_worker() -> None:
    """Start this worker's background work (its heartbeat, reaping, inactivity) now, not at
    its first client: a worker with no client of its own still reaps the dead's."""
    from .manager import get_streaming_manager

    try:
        get_streaming_manager().ensure_background()
    except Exception:
        logger.exception("streaming worker failed to start its background work")


def _take_over_signals() -> None:
    loop = asyncio.get_running_loop()
    loop_handlers: dict[int, asyncio.Handle] = getattr(loop, "_signal_handlers", {})
    for signum in SIGNALS:
        in_loop = loop_handlers.get(signum)
        if in_loop is not None:  # loop.add_signal_handler: replace it there, run it after us
            loop.remove_signal_handler(signum)
            previous: Callable[[int, FrameType | None], Any] = _loop_callback(in_loop)
            loop.add_signal_handler(signum, _handler(loop, previous), signum, None)
            continue
        installed = signal.getsignal(signum)
        if callable(installed):
            signal.signal(signum, _handler(loop, installed))
    logger.debug("streaming worker: SIGTERM and SIGINT release clients first")


def _loop_callback(handle: asyncio.Handle) -> Callable[[int, FrameType | None], Any]:
    """The callback an event loop would run for a signal (its ``add_signal_handler``)."""
    callback, args = handle._callback, handle._args  # type: ignore[attr-defined]

    def run(signum: int, frame: FrameType | None) -> Any:
        return callback(*args)

    return run


def _handler(
    loop: asyncio.AbstractEventLoop, previous: Callable[[int, FrameType | None], Any]
) -> Callable[[int, FrameType | None], None]:
    stopping: list[asyncio.Task[int]] = []

    def after(signum: int) -> None:
        previous(signum, None)

    def start(signum: int) -> None:
        if stopping:  # a second signal: stop now
            after(signum)
            return
        logger.info("worker received signal %d: releasing its clients before stopping", signum)
        task = loop.create_task(detach_this_worker(), name="streaming-detach")
        stopping.append(task)

        def done(task: asyncio.Task[int]) -> None:
            if not task.cancelled() and task.exception() is not None:
                logger.error("releasing clients failed", exc_info=task.exception())
            after(signum)

        task.add_done_callback(done)

    def handler(signum: int, frame: FrameType | None) -> None:
        # A fresh context: the signal interrupts whatever task is running, and one waiting in
        # sync_to_async (a heartbeat) would pass on asgiref's "single thread executor in use"
        # flag, failing the detach's database call ("would deadlock").
        loop.call_soon_threadsafe(start, signum, context=contextvars.Context())

    return handler
