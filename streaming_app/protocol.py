"""The wire protocol: server frame types, client frame types and WebSocket close codes.

Every server frame is a JSON object with a ``type``. SSE carries the same objects as events.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from typing import Any


class ServerFrame(StrEnum):
    # {"client_id", "stream_id", "seq", "window"?}: seq = last seq pushed so far; with ?ack=1,
    # window = {"chunks", "bytes"}: how far the server sends ahead of the client's acks
    SUBSCRIBED = "subscribed"
    CHUNK = "chunk"  # {"seq", "chunk"}
    GAP = "gap"  # {"from_seq", "to_seq"}: chunks history no longer holds
    # {"seq", "state"}: the reply up to seq, assembled (a client far behind, instead of chunks)
    SNAPSHOT = "snapshot"
    CLOSED = "closed"  # {"reason", "last_seq"}
    ERROR = "error"  # {"code", "message"}: a problem with the client's request
    PONG = "pong"  # answer to a client "ping"
    RECONNECT = "reconnect"  # {"reason", "last_seq"}: come back with last_seq (4012, 4013)


class ClientFrame(StrEnum):
    PING = "ping"
    CANCEL = "cancel"
    ACK = "ack"  # {"seq"}: every chunk up to seq was read (turns flow control on)


class CloseCode(IntEnum):
    """WebSocket close codes the server uses, each with one meaning.

    Servers may only send 1000 and 3000-4999 (RFC 6455 section 7.4), so the 4xxx codes mirror
    the standard ones where one exists (4012 ~ 1012 Service Restart, 4413 ~ HTTP 413).
    """

    NORMAL = 1000  # the client asked to close
    SERVICE_RESTART = 4012  # deploy/worker shutdown: reconnect later with last_seq
    TOO_FAR_BEHIND = 4013  # the client did not read (or ack) in time: reconnect with last_seq
    MESSAGE_TOO_BIG = 4413  # a client frame over MAX_CLIENT_FRAME_BYTES
    STREAM_CLOSED = 4000  # the stream was closed; the closed frame has the reason
    BAD_REQUEST = 4400  # malformed URL or query (e.g. last_seq not an integer)
    FORBIDDEN = 4403  # not allowed to see this stream
    NOT_FOUND = 4404  # no such stream
    STREAM_GONE = 4410  # the stream was already closed when the client subscribed
    DEREGISTERED = 4411  # the manager removed this client (deregister, send failures)
    STREAM_FULL = 4429  # max_clients_per_stream reached
    INTERNAL_ERROR = 4500  # a bug in the server (logged with its traceback)
    UNAVAILABLE = 4503  # the streaming backend is not reachable


def chunk_frame(seq: int, chunk_json: str) -> str:
    """The ``chunk`` frame for an already encoded chunk, built without re-encoding it."""
    return f'{{"type":"chunk","seq":{seq},"chunk":{chunk_json}}}'


def frame(kind: ServerFrame, **fields: Any) -> str:
    """Any other server frame as JSON text."""
    return json.dumps({"type": str(kind), **fields}, separators=(",", ":"))
