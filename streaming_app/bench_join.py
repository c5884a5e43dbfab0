"""Benchmark rows of issue 12: joining a long reply late, with one ``snapshot`` frame against
the replay of every chunk (``?replay=chunks``).

A reply of N text deltas is pushed (in this process: the in-memory layer and history, as the
embedded default runs); then a client joins at seq 0 both ways, through the WebSocket consumer
itself (Channels' ``WebsocketCommunicator``, no socket), and reads until it has the full text.
Counted: frames and bytes the server sent, and the time from connecting to the full text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.test import override_settings

from .chunks import TextDeltaChunk
from .manager import get_streaming_manager
from .routing import websocket_urlpatterns
from .transcripts import Transcript, assemble

SESSION = "bench-join-session"


@dataclass
class JoinResult:
    mode: str  # "snapshot" or "replay"
    deltas: int
    frames: int
    bytes: int
    seconds: float
    text_ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def join(stream_id: str, mode: str, text: str, deltas: int) -> JoinResult:
    query = "?ack=1&replay=chunks" if mode == "replay" else "?ack=1"  # acking, as our clients do
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns),
                                         f"/ws/streams/{stream_id}/{query}")  # fmt: skip
    communicator.scope["user"] = AnonymousUser()
    communicator.scope["session"] = SimpleNamespace(session_key=SESSION)
    started = time.perf_counter()
    connected, _ = await communicator.connect()
    assert connected
    frames = size = 0
    state = Transcript()
    try:
        while state.last_seq < deltas:
            output = await communicator.receive_output(30)
            if output["type"] != "websocket.send":
                break
            frames += 1
            size += len(output["text"].encode())
            frame = json.loads(output["text"])
            if frame["type"] == "snapshot":
                state = Transcript.from_dict(frame["state"])
            elif frame["type"] == "chunk":
                assemble([(frame["seq"], json.dumps(frame["chunk"]))], state)
            else:
                continue
            if state.last_seq % 64 == 0 or frame["type"] == "snapshot":
                ack = {"type": "ack", "seq": state.last_seq}
                await communicator.send_to(text_data=json.dumps(ack))
        seconds = time.perf_counter() - started
    finally:
        await communicator.disconnect()
    return JoinResult(mode, deltas, frames, size, seconds, state.text == text)


async def snapshot_against_replay(deltas: int = 20_000) -> list[JoinResult]:
    """Push a reply of ``deltas`` words, then join it late both ways (the history holds all of
    it, so the replay can give the whole text too)."""
    user = dict(getattr(settings, "STREAMING_APP", {}))
    with override_settings(STREAMING_APP={**user, "HISTORY_MAX_CHUNKS": deltas}):
        return await _snapshot_against_replay(deltas)


async def _snapshot_against_replay(deltas: int) -> list[JoinResult]:
    manager = get_streaming_manager()  # the one the consumer uses
    stream_id = await manager.create_stream(session_key=SESSION)
    try:
        words = [f"w{i} " for i in range(1, deltas + 1)]
        for start in range(0, deltas, 500):
            batch = words[start : start + 500]
            await manager.push_chunks(
                stream_id, [TextDeltaChunk(stream_id=stream_id, text_delta=w) for w in batch]
            )
        text = "".join(words)
        return [await join(stream_id, mode, text, deltas) for mode in ("snapshot", "replay")]
    finally:
        await manager.close_stream(stream_id, "benchmark done")


def render(results: list[dict[str, Any]]) -> list[str]:
    """The rows (``JoinResult.to_dict()``) as printed lines."""
    lines = ["", f"Late join of a {results[0]['deltas']:,}-delta reply (in process, through the "
             "consumer; the history holds all of it)",
             f"  {'join':<10}{'frames':>9}{'bytes':>13}{'time to text':>15}  whole"]  # fmt: skip
    for r in results:
        whole = "yes" if r["text_ok"] else "NO"
        lines.append(f"  {r['mode']:<10}{r['frames']:>9,}{r['bytes']:>13,}"
                     f"{r['seconds'] * 1000:>12.0f} ms  {whole}")  # fmt: skip
    snap, replay = results
    lines.append(f"  snapshot/replay: frames {snap['frames'] / replay['frames']:.4f}x, bytes "
                 f"{snap['bytes'] / replay['bytes']:.3f}x, "
                 f"time {snap['seconds'] / replay['seconds']:.3f}x")  # fmt: skip
    return lines
