"""What the commands share: a manager that can reach the processes serving the clients."""

from __future__ import annotations

from django.core.management.base import CommandError

from streaming_app.manager import StreamingManager, get_streaming_manager


def reaching_manager(verb: str) -> StreamingManager:
    """This process's manager, when what it does reaches the serving processes.

    On a process-local channel layer or history (the embedded default: in-memory layer,
    ``MemoryHistory``) a command runs in a process of its own that no client is connected to:
    it could mark streams closed, but nobody would be told. Raises ``CommandError`` saying what
    to set instead of reporting a success for nothing.
    """
    manager = get_streaming_manager()
    if not manager.crosses_processes:
        raise CommandError(
            f"Cannot {verb} from a command on a process-local channel layer and history (the "
            "embedded default): the processes serving the clients would never hear of it. Set "
            "REDIS_URL (CHANNEL_LAYERS on channels_redis and STREAMING_APP['HISTORY_BACKEND'] = "
            "'streaming_app.redis_history.RedisHistory' with STREAMING_APP['REDIS_URL']), or "
            "close streams from the admin, which runs in the serving process."
        )
    return manager
