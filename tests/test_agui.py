"""AG-UI: a stream read by the published AG-UI client (``@ag-ui/client``'s ``HttpAgent`` in
Node.js, pinned in ``tests/js``) from a real Daphne, and resumed with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .servers import DaphneServer, manager_call

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent

JS = Path(__file__).resolve().parent / "js"

PUSH_EVERY_TYPE = """
sid = {sid!r}
for chunk in [
    {{"type": "system_progress", "message": "thinking"}},
    {{"type": "text_delta", "text_delta": "The weather "}},
    {{"type": "metadata_update", "updates": {{"city": "Oslo", "a/b": 1}}}},
    {{"type": "text_delta", "text_delta": "is clear."}},
    {{"type": "tool_call_request", "tool_calls": [
        {{"id": "c1", "name": "forecast", "arguments": {{"city": "Oslo"}}}}]}},
    {{"type": "tool_result_emission", "tool_call_id": "c1", "tool_name": "forecast",
      "tool_result": {{"sky": "clear"}}}},
    {{"type": "ui_command", "ui_commands": [{{"command": "show_map"}}]}},
    {{"type": "error", "code": "SLOW_TOOL", "message": "took 3 s", "is_final": False}},
    {{"type": "final_response", "final_response_text": "The weather is clear.",
      "usage": {{"total_tokens": 42}}}},
]:
    await m.push_chunk(sid, {{"stream_id": sid, **chunk}})
await m.close_stream(sid, "Interaction complete.")
"""


def node_ready() -> None:
    assert shutil.which("node"), "Node.js is needed (the README's test command installs it)"
    assert (JS / "node_modules" / "@ag-ui" / "client").is_dir(), (
        "run `npm ci --prefix tests/js` (the README's test command does)"
    )


async def run_http_agent(url: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "node", str(JS / "agui-run.mjs"), url, cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


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
        await asyncio.to_thread(manager_call, env, PUSH_EVERY_TYPE.format(sid=sid))
        seen = await client
        resumed = await asyncio.to_thread(read, f"{server.http_url}/streams/{sid}/ag-ui", "6")
        log = server.log()
    assert "failure" not in seen, seen
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
