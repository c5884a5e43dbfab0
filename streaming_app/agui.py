"""AG-UI: a stream read by any AG-UI client, ``GET`` or ``POST /streams/<stream_id>/ag-ui``.

The same Follower as the other transports (authorisation, limits, resume, the one event
handler): only the frames it writes are AG-UI events, built with the ``ag-ui-protocol``
package's own types and ``EventEncoder`` (Server-Sent Events). The last event of each chunk
carries ``id: <seq>`` (the cursor moves once all of a chunk's events are in), so
``Last-Event-ID`` (or ``?last_seq=N``) resumes after it: the response reads the stream from its
start, the chunks the client has only rebuild its state (the open message, whether text was
streamed, usage), and an open message is reopened with its own id before it goes on. The run is
the stream: ``threadId`` and ``runId`` are the stream id. ``POST`` (what ``HttpAgent`` sends)
reads the stream as ``GET`` does: its ``RunAgentInput`` is not used (the agent is already
running; start it with your own view).

Mapping (README, "AG-UI"): ``subscribed`` -> RUN_STARTED; ``text_delta`` ->
TEXT_MESSAGE_START (once per message) + TEXT_MESSAGE_CONTENT; ``tool_call_request`` ->
TOOL_CALL_START/ARGS/END per call; ``tool_result_emission`` -> TOOL_CALL_RESULT;
``metadata_update`` -> STATE_DELTA (JSON Patch ``add`` per key); ``system_progress`` ->
STEP_STARTED + STEP_FINISHED; ``ui_command`` -> CUSTOM ``ui_command``; ``final_response`` ->
its text as a message when none was streamed, TEXT_MESSAGE_END; ``error`` -> RUN_ERROR when
final (the run ends there), else CUSTOM ``error``; ``gap`` -> CUSTOM ``gap``; ``closed`` ->
TEXT_MESSAGE_END + RUN_FINISHED (its reason and usage in ``result``).
"""

from __future__ import annotations

import json
from typing import Any

from ag_ui.core import (
    BaseEvent,
    CustomEvent,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    StateDeltaEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.encoder import EventEncoder

from .manager import StreamingManager
from .protocol import ServerFrame
from .sse import Scope, TranslatedStream, serve


def _pointer(key: str) -> str:
    """A JSON Pointer to a top-level key (RFC 6901 escapes)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class AgUiStream(TranslatedStream):
    """One AG-UI event stream: the Follower's frames, written as AG-UI events."""

    transport = "ag-ui"

    def __init__(self, scope: Scope, send: Any) -> None:
        super().__init__(scope, send)
        self.encoder = EventEncoder()
        self.message_id: str | None = None  # the open text message
        self.streamed_text = False  # some text went out as deltas
        self.run_started = False
        self.run_over = False  # RUN_ERROR or RUN_FINISHED went out: nothing may follow
        self.result: dict[str, Any] = {}
        self.reopen = False  # a message the client has open goes on: announce it again

    async def subscribe(self, manager: StreamingManager, last_seq: int) -> bool:
        self.reopen = last_seq > 0
        return await super().subscribe(manager, last_seq)

    def track(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> None:
        self.events(kind, frame, seq)

    def encode(self, events: list[Any], seq: int | None) -> bytes:
        head = f"id: {seq}\n" if seq is not None else ""
        body = "".join(self.encoder.encode(e) for e in events[:-1])
        return (body + head + self.encoder.encode(events[-1])).encode()

    # -- frames to events ------------------------------------------------------------

    def translate(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> list[Any]:
        """The AG-UI events of one frame; RUN_STARTED before the first (a closed stream's
        replay has no ``subscribed`` frame)."""
        if self.run_over:
            return []
        events: list[Any] = []
        if self.reopen and kind is not ServerFrame.SUBSCRIBED:
            self.reopen = False
            if self.message_id is not None:
                events.append(TextMessageStartEvent(message_id=self.message_id, role="assistant"))
        events += self.events(kind, frame, seq)
        if events and not self.run_started:
            self.run_started = True
            events.insert(0, RunStartedEvent(thread_id=self.stream_id, run_id=self.stream_id))
        return events

    def events(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> list[Any]:
        sid = self.stream_id
        if kind is ServerFrame.SUBSCRIBED:
            self.run_started = True
            return [RunStartedEvent(thread_id=sid, run_id=sid)]
        if kind is ServerFrame.CHUNK:
            return self.chunk(frame["chunk"], seq or 0)
        if kind is ServerFrame.GAP:
            return [CustomEvent(name="gap", value={"from_seq": frame["from_seq"],
                                                   "to_seq": frame["to_seq"]})]  # fmt: skip
        if kind is ServerFrame.CLOSED:
            self.run_over = True
            result = {"reason": frame.get("reason", ""), "last_seq": frame.get("last_seq")}
            return [
                *self.end_message(),
                RunFinishedEvent(thread_id=sid, run_id=sid, result={**self.result, **result}),
            ]
        if kind is ServerFrame.ERROR:  # refused or failed after the response started
            self.run_over = True
            return [
                *self.end_message(),
                RunErrorEvent(message=frame.get("message", ""), code=frame.get("code")),
            ]
        return []  # reconnect (the client comes back with Last-Event-ID), pong

    def end_message(self) -> list[BaseEvent]:
        if self.message_id is None:
            return []
        message_id, self.message_id = self.message_id, None
        return [TextMessageEndEvent(message_id=message_id)]

    def start_message(self, seq: int) -> list[BaseEvent]:
        if self.message_id is not None:
            return []
        self.message_id = f"{self.stream_id}-m{seq}"
        return [TextMessageStartEvent(message_id=self.message_id, role="assistant")]

    def chunk(self, chunk: dict[str, Any], seq: int) -> list[Any]:
        kind = chunk.get("type")
        events: list[BaseEvent] = []
        if kind == "text_delta":
            if chunk.get("text_delta"):  # AG-UI content deltas are never empty
                events += self.start_message(seq)
                events.append(TextMessageContentEvent(message_id=self.message_id or "",
                                                      delta=chunk["text_delta"]))  # fmt: skip
                self.streamed_text = True
        elif kind == "tool_call_request":
            parent = self.message_id
            events += self.end_message()
            for call in chunk.get("tool_calls", []):
                call_id = str(call.get("id"))
                events.append(ToolCallStartEvent(tool_call_id=call_id,
                                                 tool_call_name=str(call.get("name")),
                                                 parent_message_id=parent))  # fmt: skip
                arguments = json.dumps(call.get("arguments") or {})
                events.append(ToolCallArgsEvent(tool_call_id=call_id, delta=arguments))
                events.append(ToolCallEndEvent(tool_call_id=call_id))
        elif kind == "tool_result_emission":
            events += self.end_message()
            result = chunk.get("tool_result")
            if not chunk.get("is_success", True):
                result = {"error": chunk.get("error_message"), "result": result}
            events.append(ToolCallResultEvent(
                message_id=f"{self.stream_id}-r{seq}", tool_call_id=str(chunk["tool_call_id"]),
                content=_text(result), role="tool",
            ))  # fmt: skip
        elif kind == "metadata_update":
            ops = [{"op": "add", "path": _pointer(k), "value": v}
                   for k, v in chunk.get("updates", {}).items()]  # fmt: skip
            if ops:
                events.append(StateDeltaEvent.model_validate({"delta": ops}))
        elif kind == "system_progress":
            name = str(chunk.get("message", ""))
            events += [StepStartedEvent(step_name=name), StepFinishedEvent(step_name=name)]
        elif kind == "ui_command":
            events += [CustomEvent(name="ui_command", value=c) for c in chunk["ui_commands"]]
        elif kind == "final_response":
            final = chunk.get("final_response_text")
            if final and not self.streamed_text:
                events += self.start_message(seq)
                events.append(TextMessageContentEvent(message_id=self.message_id or "",
                                                      delta=final))  # fmt: skip
            events += self.end_message()
            events += [CustomEvent(name="ui_command", value=c)
                       for c in chunk.get("final_ui_commands") or []]  # fmt: skip
            if chunk.get("usage") is not None:
                self.result["usage"] = chunk["usage"]
        elif kind == "error":
            if chunk.get("is_final", True):
                self.run_over = True
                events += self.end_message()
                events.append(RunErrorEvent(message=str(chunk.get("message", "")),
                                            code=chunk.get("code")))  # fmt: skip
            else:
                events.append(CustomEvent(name="error", value={
                    k: chunk.get(k) for k in ("code", "message", "details")}))  # fmt: skip
        return events


async def ag_ui_events(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI app of the AG-UI endpoint (route it with ``sse_urlpatterns``)."""
    await serve(AgUiStream, ("GET", "POST"), scope, receive, send)
