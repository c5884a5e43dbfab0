"""A small Python client of the WebSocket protocol, for scripts, tests and other services.

    from streaming_app.follow import follow_stream

    async for frame in follow_stream("ws://example.com/ws/streams/<id>/"):
        if frame["type"] == "chunk":
            print(frame["chunk"])
        elif frame["type"] == "gap":  # history no longer held these
            print("missed", frame["from_seq"], "to", frame["to_seq"])

It yields ``chunk`` and ``gap`` frames in order, each once, then the ``closed`` frame, and
returns; with ``snapshots=True``, a client far behind gets one ``snapshot`` frame (the reply
assembled up to its ``seq``) instead of the chunks it missed. It acks what the caller has
taken (every ``ack_every`` chunks or a quarter of the server's window, or ``ack_interval``
seconds after the last one), so a caller that stops taking frames is paused by the server
instead of costing it memory, and it comes back with ``last_seq`` after a dropped connection,
a restart (4012) or a send-off (4013). A refusal (an ``error`` frame and a final close code)
raises :class:`StreamRefused`.

Needs the ``websockets`` package (``pip install "streaming-app[client]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .protocol import CloseCode

# Close codes after which coming back cannot help (4000 follows the ``closed`` frame).
FINAL_CODES = frozenset({
    CloseCode.STREAM_CLOSED, CloseCode.BAD_REQUEST, CloseCode.FORBIDDEN, CloseCode.NOT_FOUND,
    CloseCode.STREAM_GONE, CloseCode.DEREGISTERED, CloseCode.MESSAGE_TOO_BIG,
    CloseCode.STREAM_FULL, CloseCode.INTERNAL_ERROR,
})  # fmt: skip


class StreamRefused(Exception):
    """The server refused the client or ended it for good (the close code and its reason)."""

    def __init__(self, close_code: int, code: str, message: str) -> None:
        super().__init__(f"{close_code} {code}: {message}")
        self.close_code = close_code
        self.code = code
        self.message = message


async def ack(socket: Any, seq: int) -> None:
    """Ack ``seq``; a socket the server has closed meanwhile still has frames to read."""
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        await socket.send(json.dumps({"type": "ack", "seq": seq}))


def stream_url(url: str, **query: Any) -> str:
    """``url`` with ``query`` set in its query string."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    params.update({k: str(v) for k, v in query.items()})
    return urlunsplit(parts._replace(query=urlencode(params)))


async def follow_stream(
    url: str,
    *,
    last_seq: int = 0,
    ack_every: int = 64,
    ack_interval: float = 0.1,
    max_attempts: int = 10,
    backoff: float = 0.25,
    headers: Mapping[str, str] | None = None,
    snapshots: bool = False,
) -> AsyncGenerator[dict[str, Any]]:
    """Follow the stream at ``url`` (``ws://.../ws/streams/<id>/``) from ``last_seq``."""
    try:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'follow_stream needs websockets: pip install "streaming-app[client]"'
        ) from exc

    attempts = 0
    while True:
        error: dict[str, Any] = {}
        try:
            replay = {} if snapshots else {"replay": "chunks"}
            address = stream_url(url, last_seq=last_seq, ack=1, **replay)
            async with connect(address, additional_headers=headers) as socket:
                acked = read = last_seq
                unacked_bytes, ack_bytes = 0, 256 * 1024
                while True:
                    if read > acked:  # what was taken is acked within ack_interval
                        try:
                            text = await asyncio.wait_for(socket.recv(), ack_interval)
                        except TimeoutError:
                            await ack(socket, read)
                            acked, unacked_bytes = read, 0
                            continue
                    else:
                        text = await socket.recv()
                    frame = json.loads(text)
                    kind = frame.get("type")
                    if kind == "subscribed":
                        attempts = 0
                        ack_bytes = frame.get("window", {}).get("bytes", 4 * ack_bytes) // 4
                    elif kind == "reconnect":
                        last_seq = max(last_seq, frame["last_seq"])
                    elif kind == "error":
                        error = frame
                    elif kind == "closed":
                        yield frame
                        return
                    elif kind in ("chunk", "gap", "snapshot"):
                        seq = frame["to_seq"] if kind == "gap" else frame["seq"]
                        if seq is not None and seq <= last_seq:
                            continue  # already taken (a resume overlapped)
                        yield frame
                        if seq is not None:
                            last_seq = read = seq
                            unacked_bytes += len(text)
                            if read - acked >= ack_every or unacked_bytes >= ack_bytes:
                                await ack(socket, read)
                                acked, unacked_bytes = read, 0
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            if code in FINAL_CODES:
                raise StreamRefused(code, str(error.get("code", "")),
                                    str(error.get("message", ""))) from exc  # fmt: skip
        except (OSError, InvalidHandshake, TimeoutError):
            pass  # the server is not there (yet): try again
        attempts += 1
        if attempts >= max_attempts:
            raise StreamRefused(1006, "UNREACHABLE", f"gave up after {attempts} attempts")
        await asyncio.sleep(random.uniform(0, min(10.0, backoff * 2**attempts)))
