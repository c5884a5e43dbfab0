"""The Vercel AI SDK's UI message stream, read by the published ``ai`` package the way
``useChat`` resumes (``DefaultChatTransport.reconnectToStream``), from a real Daphne."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .js_clients import node_ready, run_node
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
