"""AG-UI: a stream read by the published AG-UI client (``@ag-ui/client``'s ``HttpAgent`` in
Node.js, pinned in ``tests/js``) from a real Daphne, and resumed with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import eventually
from .js_clients import DroppingProxy, node_ready, run_node
from .servers import DaphneServer, manager_call

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent

# One chunk of each type (and a tool call, a state key that needs escaping in a JSON Pointer).
EVERY_TYPE: list[dict[str, Any]] = [
    {"type": "system_progress", "message": "thinking"},
    {"type": "text_delta", "text_delta": "The weather "},
    {"type": "metadata_update", "updates": {"city": "Oslo", "a/b": 1}},
    {"type": "text_delta", "text_delta": "is clear."},
    {"type": "tool_call_request", "tool_calls": [
        {"id": "c1", "name": "forecast", "arguments": {"city": "Oslo"}}]},
    {"type": "tool_result_emission", "tool_call_id": "c1", "tool_name": "forecast",
     "tool_result": {"sky": "clear"}},
    {"type": "ui_command", "ui_commands": [{"command": "show_map"}]},
    {"type": "error", "code": "SLOW_TOOL", "message": "took 3 s", "is_final": False},
    {"type": "final_response", "final_response_text": "The weather is clear.",
     "usage": {"total_tokens": 42}},
]  # fmt: skip


def push_code(sid: str, chunks: list[dict[str, Any]], *, close: bool = True) -> str:
    """Manager code (for ``manager_call``) that pushes ``chunks`` to ``sid``, then closes it."""
    code = (f"sid = {sid!r}\nfor chunk in {chunks!r}:\n"
            "    await m.push_chunk(sid, {'stream_id': sid, **chunk})\n")  # fmt: skip
    return code + ("await m.close_stream(sid, 'Interaction complete.')\n" if close else "")


async def run_http_agent(url: str) -> dict[str, Any]:
    """HttpAgent reads ``url`` (and resumes with Last-Event-ID after a drop)."""
    return await run_node("agui-run.mjs", url)


def sse_events(body: str) -> list[tuple[str | None, dict[str, Any]]]:
    """``(id, data)`` of each event of an SSE body (comments skipped)."""
    events = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                      and not line.startswith(":"))  # fmt: skip
        if "data" in fields:
            events.append((fields.get("id"), json.loads(fields["data"])))
    return events


def read(url: str, last_event_id: str) -> list[tuple[str | None, dict[str, Any]]]:
    request = urllib.request.Request(url, headers={"Last-Event-ID": last_event_id})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return sse_events(answer.read().decode())


def refused(server: DaphneServer) -> list[int]:
    """The statuses of a stream that does not exist and of a method not allowed."""
    statuses = []
    for method in ("GET", "PUT"):
        request = urllib.request.Request(f"{server.http_url}/streams/nope/ag-ui", method=method)
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    return statuses


async def test_the_published_ag_ui_client_assembles_the_reply(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        client = asyncio.create_task(run_http_agent(f"{server.http_url}/streams/{sid}/ag-ui"))
        await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE))
        seen = await client
        resumed = await asyncio.to_thread(read, f"{server.http_url}/streams/{sid}/ag-ui", "6")
        log = server.log()
    assert seen["failure"] is None and seen["drops"] == seen["unhandled"] == [], seen
    assert seen["events"][0] == "RUN_STARTED" and seen["events"][-1] == "RUN_FINISHED"
    assistant = [m for m in seen["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in assistant if m.get("content")] == ["The weather is clear."]
    calls = [c for m in assistant for c in m.get("toolCalls") or []]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("c1", "forecast", {"city": "Oslo"})]  # fmt: skip
    tools = [m for m in seen["messages"] if m["role"] == "tool"]
    assert [(m["toolCallId"], json.loads(m["content"])) for m in tools] == [
        ("c1", {"sky": "clear"})
    ]
    assert seen["state"] == {"city": "Oslo", "a/b": 1}
    assert seen["result"] == {"usage": {"total_tokens": 42}, "reason": "Interaction complete.",
                              "last_seq": 9}  # fmt: skip
    for kind in ("STEP_STARTED", "STEP_FINISHED", "CUSTOM", "STATE_DELTA", "TOOL_CALL_RESULT"):
        assert kind in seen["events"], kind
    # Resumed after seq 6: RUN_STARTED, then only what came from seq 7 on, ids in order.
    assert resumed[0][1]["type"] == "RUN_STARTED"
    ids = [int(i) for i, _ in resumed if i is not None]
    assert ids and min(ids) == 7 and ids == sorted(ids)
    assert resumed[-1][1]["type"] == "RUN_FINISHED"
    assert "Traceback" not in log, log


async def test_a_final_error_is_run_error_and_nothing_after(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(
            env, "out = await m.create_stream()\n"
                 "await m.handle_stream_error(out, RuntimeError('tool down'))",
        )  # fmt: skip
        seen = await run_http_agent(f"{server.http_url}/streams/{sid}/ag-ui")
        refusals = await asyncio.to_thread(refused, server)
    assert refusals == [404, 405]
    assert seen["events"][0] == "RUN_STARTED"
    assert seen["events"][-1] == "RUN_ERROR"
    assert "RUN_FINISHED" not in seen["events"]
    assert seen["runErrors"] == ["tool down"]


# -- a dropped connection: HttpAgent comes back with Last-Event-ID ---------------------------


def assembled(seen: dict[str, Any]) -> dict[str, Any]:
    """What the client built: its messages, state and the run's result."""
    return {"messages": seen["messages"], "state": seen["state"], "result": seen["result"]}


def content_events(seen: dict[str, Any]) -> list[str]:
    """The events that carry the reply (not the run's or a message's opening, which a resumed
    response sends again)."""
    return [e for e in seen["events"] if e not in ("RUN_STARTED", "TEXT_MESSAGE_START")]


async def test_a_dropped_connection_mid_reply_resumes_with_every_chunk_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        async with DroppingProxy(server.port, cuts=[2]) as proxy:
            client = asyncio.create_task(run_http_agent(f"{proxy.http_url}/streams/{sid}/ag-ui"))
            # The first three chunks; the connection drops after the second (mid-message).
            await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE[:3], close=False))
            await eventually(lambda: proxy.dropped == 1 or client.done(), timeout=30)
            assert proxy.dropped == 1, client.result()
            await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE[3:]))
            seen = await client
        whole = await run_http_agent(f"{server.http_url}/streams/{sid}/ag-ui")  # no drop
        log = server.log()
    assert whole["failure"] is None and whole["drops"] == [], whole
    assert seen["failure"] is None, seen
    assert [d["lastEventId"] for d in seen["drops"]] == ["2"]
    assert seen["unhandled"] == [d["error"] for d in seen["drops"]]  # the client's own leak
    assert assembled(seen) == assembled(whole)
    assert content_events(seen) == content_events(whole)
    assert [m["content"] for m in seen["messages"] if m["role"] == "assistant"] == [
        "The weather is clear."
    ]
    assert "Traceback" not in log, log


async def test_many_drops_each_resume_where_the_last_left_off(
    env: dict[str, str], tmp_path: Path
) -> None:
    node_ready()
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        sid = manager_call(env, "out = await m.create_stream()")
        await asyncio.to_thread(manager_call, env, push_code(sid, EVERY_TYPE))
        whole = await run_http_agent(f"{server.http_url}/streams/{sid}/ag-ui")
        async with DroppingProxy(server.port, cuts=[1, 2, 1, 3]) as proxy:
            seen = await run_http_agent(f"{proxy.http_url}/streams/{sid}/ag-ui")
        log = server.log()
    assert seen["failure"] is None, seen
    assert [d["lastEventId"] for d in seen["drops"]] == ["1", "3", "4", "7"]
    assert seen["unhandled"] == [d["error"] for d in seen["drops"]]
    assert assembled(seen) == assembled(whole)
    assert content_events(seen) == content_events(whole)
    assert "Traceback" not in log, log
