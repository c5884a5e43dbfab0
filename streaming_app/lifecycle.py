"""Process lifecycle: let a Daphne worker's clients go cleanly when the worker stops.

Daphne runs Twisted's asyncio reactor and has no ASGI lifespan; a "before shutdown" trigger is
the hook it offers. On SIGTERM the worker deregisters its clients and tells them to reconnect
(close code 4012) before Twisted tears the connections down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manager import StreamingManager

logger = logging.getLogger(__name__)

_installed: set[int] = set()


def install_shutdown_hook(manager: StreamingManager) -> bool:
    """In a process run by Twisted's reactor (Daphne), detach ``manager``'s worker before the
    reactor stops; True when installed (once per manager)."""
    reactor: Any = sys.modules.get("twisted.internet.reactor")
    if reactor is None or id(manager) in _installed:
        return False
    from twisted.internet.defer import Deferred

    def before_shutdown() -> Any:
        if not manager.is_initialized:
            return None
        logger.info("worker %s stopping: releasing its clients", manager.worker_id)
        return Deferred.fromFuture(asyncio.ensure_future(manager.detach_worker()))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    _installed.add(id(manager))
    return True
