"""Snapshots instead of replays: a client that joins far behind gets the reply assembled so far
in one ``snapshot`` frame and then the live tail; the snapshot kept beside the history covers
what the history trimmed; ``?replay=chunks`` still gives the chunks."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from django.test import override_settings

from streaming_app.history import MemoryHistory
from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.models import StreamTranscript
from streaming_app.redis_history import RedisHistory
from streaming_app.transcripts import Transcript, assemble, build_snapshot

from .conftest import Peer, delta
from .servers import ROOT
from .test_sse import listen

pytestmark = pytest.mark.django_db(transaction=True)

EVERY_TYPE: list[dict[str, Any]] = [
    {"type": "system_progress", "message": "thinking", "progress_percentage": 10},
    {"type": "text_delta", "text_delta": "The weather "},
    {"type": "metadata_update", "updates": {"city": "Oslo"}},
    {"type": "tool_call_request", "tool_calls": [
        {"id": "c1", "name": "forecast", "arguments": {"city": "Oslo"}}]},
    {"type": "tool_result_emission", "tool_call_id": "c1", "tool_name": "forecast",
     "tool_result": {"sky": "clear"}, "is_success": True},
    {"type": "text_delta", "text_delta": "is clear."},
    {"type": "ui_command", "ui_commands": [{"command": "show_map"}]},
    {"type": "error", "code": "SLOW_TOOL", "message": "took 3 s", "is_final": False},
    {"type": "tool_result_emission", "tool_call_id": "c9", "tool_name": "late",
     "tool_result": None, "is_success": False, "error_message": "gone"},
    {"type": "final_response", "final_response_text": "The weather is clear.",
     "final_ui_commands": [{"command": "done"}], "usage": {"total_tokens": 42}},
]  # fmt: skip


async def push_deltas(manager: StreamingManager, stream_id: str, count: int) -> str:
    """``count`` text deltas, 500 to a call; the text they make."""
    texts = [f"w{i} " for i in range(1, count + 1)]
    for start in range(0, count, 500):
        await manager.push_chunks(
            stream_id, [delta(stream_id, t) for t in texts[start : start + 500]]
        )
    return "".join(texts)


async def frames_until_close(peer: Peer) -> list[dict[str, Any]]:
    frames, _ = await peer.frames_until_close(timeout=10)
    return frames


async def test_a_late_joiner_of_a_long_reply_gets_one_snapshot_and_the_tail(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    text = await push_deltas(manager, stream_id, 20_000)
    peer = await connect(stream_id)
    assert (await peer.frame())["type"] == "subscribed"
    snapshot = await peer.frame()
    assert snapshot["type"] == "snapshot" and snapshot["seq"] == 20_000
    for word in ("tail1 ", "tail2 "):
        await manager.push_chunk(stream_id, delta(stream_id, word))
    await manager.close_stream(stream_id, "done")
    frames = await frames_until_close(peer)
    assert [f["type"] for f in frames] == ["chunk", "chunk", "closed"]  # 1 + 2 + 1 frames
    state = Transcript.from_dict(snapshot["state"])
    for f in frames[:-1]:
        assemble([(f["seq"], json.dumps(f["chunk"]))], state)
    assert state.text == text + "tail1 tail2 "
    assert state.complete and state.last_seq == 20_002


@override_settings(STREAMING_APP={"HISTORY_MAX_CHUNKS": 100})
async def test_the_snapshot_covers_what_the_history_trimmed(connect: Any, session_key: str) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    text = await push_deltas(manager, stream_id, 5_000)
    peer = await connect(stream_id)  # from seq 0: 4,900 of the chunks are gone from history
    await peer.frame()
    snapshot = await peer.frame()
    assert snapshot["type"] == "snapshot" and snapshot["seq"] == 5_000
    assert snapshot["state"]["text"] == text and snapshot["state"]["complete"]
    # The transcript saved at the close is whole too, and raw replay says what it misses.
    await manager.close_stream(stream_id, "done")
    saved = await StreamTranscript.objects.aget(stream_id=stream_id)
    assert saved.text == text and saved.complete
    raw = await connect(stream_id, query="replay=chunks")
    frames = await frames_until_close(raw)
    assert frames[0] == {"type": "gap", "from_seq": 1, "to_seq": 4_900}
    assert [f["seq"] for f in frames if f["type"] == "chunk"] == list(range(4_901, 5_001))


async def test_a_client_a_little_behind_gets_the_chunks(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    await push_deltas(manager, stream_id, 150)  # within SNAPSHOT_AFTER_CHUNKS (200)
    peer = await connect(stream_id, query="last_seq=20")
    await peer.frame()
    await manager.close_stream(stream_id, "done")
    frames = await frames_until_close(peer)
    assert [f["seq"] for f in frames if f["type"] == "chunk"] == list(range(21, 151))
    assert not any(f["type"] == "snapshot" for f in frames)


async def test_sse_gets_the_snapshot_as_an_event_with_its_seq_as_id(
    manager: StreamingManager, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    text = await push_deltas(manager, stream_id, 1_000)
    listener = await listen(stream_id, session_key)
    events = await listener.read_until("snapshot")
    assert [(e["event"], e.get("id")) for e in events] == [("subscribed", None),
                                                            ("snapshot", "1000")]  # fmt: skip
    assert events[-1]["data"]["state"]["text"] == text


async def test_a_bad_replay_value_is_refused(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id, query="replay=all")
    frames = await frames_until_close(peer)
    assert frames[0]["code"] == "INVALID_ARGUMENT" and "replay must be" in frames[0]["message"]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_stored_snapshot_is_only_replaced_by_a_newer_one(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "memory":
        history: Any = MemoryHistory(max_chunks=10, max_age_seconds=60)
    else:
        history = RedisHistory(request.getfixturevalue("redis_url"), max_chunks=10,
                               max_age_seconds=60)  # fmt: skip
    await history.open("s")
    assert await history.snapshot("s") is None
    for i in range(1, 31):
        await history.append("s", json.dumps({"type": "text_delta", "text_delta": f"{i},"}),
                             take_failures=False)  # fmt: skip
        if i in (8, 16, 24):  # what a producer does every half history
            state, seq = await build_snapshot(history, "s")
            await history.save_snapshot("s", seq, json.dumps(state.to_dict()))
    await history.save_snapshot("s", 3, '{"text": "old"}')  # an older one loses
    stored = await history.snapshot("s")
    assert stored is not None and stored[0] == 24
    state, seq = await build_snapshot(history, "s")
    assert (seq, state.text, state.complete) == (30, "".join(f"{i}," for i in range(1, 31)), True)
    await history.save_snapshot("gone", 5, "{}")  # an unknown stream keeps none
    assert await history.snapshot("gone") is None
    if isinstance(history, RedisHistory):
        await history.aclose()


def test_the_javascript_reducer_agrees_with_the_python_one() -> None:
    """The browser's reducer (streaming_app/static/streaming_app/transcript.js), run in Node
    over every chunk type, ends in the state the server's reducer does."""
    chunks = [{"stream_id": "s", **c} for c in EVERY_TYPE]
    script = (
        "const {StreamingTranscript} = require(process.argv[1]);\n"
        "let state = StreamingTranscript.empty();\n"
        "JSON.parse(process.argv[2]).forEach((c, i) => "
        "{ state = StreamingTranscript.reduce(state, i + 2, c); });\n"
        "console.log(JSON.stringify(state));\n"
    )
    js = ROOT / "streaming_app" / "static" / "streaming_app" / "transcript.js"
    out = subprocess.run(["node", "-e", script, str(js), json.dumps(chunks)],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    expected = assemble((i + 2, json.dumps(c)) for i, c in enumerate(chunks)).to_dict()
    assert json.loads(out.stdout) == expected
    assert expected["complete"] is False and expected["finished"]  # it started at seq 2
