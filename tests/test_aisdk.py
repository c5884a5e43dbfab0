"""The Vercel AI SDK's UI message stream, read by the published ``ai`` package the way
``useChat`` resumes (``DefaultChatTransport.reconnectToStream``), from a real Daphne."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import eventually
from .js_clients import JS, DroppingProxy, node_ready, run_node
from .servers import DaphneServer, manager_call
from .test_agui import EVERY_TYPE, push_code

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent


async def resume_like_use_chat(url: str, chat_id: str) -> dict[str, Any]:
    return await run_node("ui-message-stream.mjs", url, chat_id)


def headers_and_tail(url: str) -> tuple[dict[str, str], str]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return {k.lower(): v for k, v in answer.headers.items()}, answer.read().decode()


async def test_use_chat_resumes_a_reply_in_flight_and_gets_all_of_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        url = f"{server.http_url}/streams/{sid}/ui-message-stream"
        # The reply is in flight: the first chunk is out when the client comes back.
        manager_call(env, f"await m.push_chunk({sid!r}, TextDeltaChunk(stream_id={sid!r}, "
                          "text_delta='Hi. '))")  # fmt: skip
        client = asyncio.create_task(resume_like_use_chat(url, sid))
        await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE))
        seen = await client
        headers, body = await asyncio.to_thread(headers_and_tail, url)
        log = server.log()
    assert seen["errors"] == [], seen
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert body.rstrip().endswith("data: [DONE]")
    assert seen["chunks"][0] == "start" and seen["chunks"][-1] == "finish"
    message = seen["message"]
    assert message["id"] == sid and message["role"] == "assistant"
    texts = [p["text"] for p in message["parts"] if p["type"] == "text"]
    assert "".join(texts) == "Hi. The weather is clear."
    tools = [p for p in message["parts"] if p["type"].startswith("tool-")]
    assert [(p["type"], p["toolCallId"], p["input"], p["output"], p["state"]) for p in tools] == [
        ("tool-forecast", "c1", {"city": "Oslo"}, {"sky": "clear"}, "output-available")
    ]
    data = [(p["type"], p["data"]) for p in message["parts"] if p["type"].startswith("data-")]
    assert ("data-metadata", {"city": "Oslo", "a/b": 1}) in data
    assert ("data-ui-command", {"command": "show_map"}) in data
    assert message["metadata"] == {"usage": {"total_tokens": 42},
                                   "reason": "Interaction complete.", "last_seq": 10}  # fmt: skip
    assert "Traceback" not in log, log


# -- a dropped connection: the AI SDK's Chat resumes as useChat does --------------------------


async def follow_with_chat(base: str, stream_id: str) -> dict[str, Any]:
    """StreamChat (tests/js/aisdk-chat.mjs, the demo page's): ``resumeStream`` until the reply
    is whole, again after each dropped connection."""
    return await run_node("chat-resume.mjs", base, stream_id)


def parts(seen: dict[str, Any]) -> list[tuple[str, Any]]:
    """The assistant message's parts, each as (type, what it holds)."""
    [message] = seen["messages"]
    return [(p["type"], p.get("text", p.get("data", p.get("output")))) for p in message["parts"]]


async def test_a_dropped_connection_mid_reply_resumes_with_every_chunk_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        async with DroppingProxy(server.port, cuts=[2]) as proxy:
            client = asyncio.create_task(follow_with_chat(proxy.http_url, sid))
            await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE[:3], close=False))
            await eventually(lambda: proxy.dropped == 1 or client.done(), timeout=30)
            assert proxy.dropped == 1, client.result()
            await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE[3:]))
            seen = await client
        whole = await follow_with_chat(server.http_url, sid)  # no drop
        log = server.log()
    assert whole["status"] == "ready" and whole["drops"] == [], whole
    assert seen["status"] == "ready" and seen["error"] is None, seen
    assert seen["drops"] == ["terminated"]  # Node's fetch: the connection went mid-body
    assert seen["messages"] == whole["messages"]
    assert parts(seen) == [  # one text part, each tool and data part once
        ("data-progress", {"message": "thinking", "progress_percentage": None,
                           "status_code": None}),
        ("text", "The weather is clear."),
        ("data-metadata", {"city": "Oslo", "a/b": 1}),
        ("tool-forecast", {"sky": "clear"}),
        ("data-ui-command", {"command": "show_map"}),
        ("data-error", {"code": "SLOW_TOOL", "message": "took 3 s", "details": None}),
    ]  # fmt: skip
    assert seen["messages"][0]["metadata"]["usage"] == {"total_tokens": 42}
    assert "Traceback" not in log, log


async def test_many_drops_each_replay_and_the_message_is_whole_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE))
        whole = await follow_with_chat(server.http_url, sid)
        async with DroppingProxy(server.port, cuts=[1, 3, 5, 8]) as proxy:
            seen = await follow_with_chat(proxy.http_url, sid)
        log = server.log()
    assert seen["status"] == "ready", seen
    assert seen["drops"] == ["terminated"] * 4
    assert proxy.dropped == 4
    assert seen["messages"] == whole["messages"]
    assert "Traceback" not in log, log


def test_the_demo_pages_bundle_is_what_the_pinned_lock_builds(tmp_path: Path) -> None:
    """project/static/demo/aisdk-chat.js is committed: built again from tests/js (the versions
    package-lock.json pins, esbuild among them) it must be the same bytes."""
    node_ready()
    committed = JS.parent.parent / "project" / "static" / "demo" / "aisdk-chat.js"
    rebuilt = tmp_path / "aisdk-chat.js"
    built = subprocess.run(["node", str(JS / "build.mjs"), str(rebuilt)], cwd=JS,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert rebuilt.read_bytes() == committed.read_bytes(), (
        "the committed bundle differs from a build: run `npm run build --prefix tests/js`"
    )
