"""The Vercel AI SDK's UI message stream: ``GET /streams/<stream_id>/ui-message-stream``.

What ``useChat`` (React, Vue, Svelte) reads, with the ``x-vercel-ai-ui-message-stream: v1``
header: Server-Sent Events whose data are UI message chunks, ending with ``[DONE]``. Point
``DefaultChatTransport``'s ``prepareReconnectToStreamRequest`` at it and ``useChat``'s
``resume`` reconnects to a reply in flight: with no ``Last-Event-ID`` it replays the stream
from its start (``resumeStreamIsReplay``, the SDK's default), then follows it live. Same
Follower as the other transports: authorisation, limits, the admin, send-error policy. The last
part of each chunk carries ``id: <seq>``; a client that kept its message and comes back with
``Last-Event-ID`` (or ``?last_seq=N``) gets what follows, the stream read from its start and the
chunks it has rebuilding this response's state (the open text part, usage) unsent.

Mapping (README, "Vercel AI SDK"): ``start`` first (``messageId``: the stream id);
``text_delta`` -> ``text-start`` (once per text part) + ``text-delta``; ``tool_call_request``
-> ``tool-input-available`` per call; ``tool_result_emission`` -> ``tool-output-available``
(or ``tool-output-error``); ``metadata_update`` -> ``data-metadata``; ``system_progress`` ->
``data-progress``; ``ui_command`` -> ``data-ui-command``; ``gap`` -> ``data-gap``; a final
``error`` -> ``error``; ``closed`` -> ``text-end``, ``finish`` (``messageMetadata``: reason,
last seq, usage) and ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import ServerFrame
from .sse import EventStream, Scope, TranslatedStream, serve


class UIMessageStream(TranslatedStream):
    """One UI message stream: the Follower's frames, written as UI message chunks."""

    transport = "ai-sdk"
    response_headers = (
        *EventStream.response_headers, (b"x-vercel-ai-ui-message-stream", b"v1"),
    )  # fmt: skip

    def __init__(self, scope: Scope, send: Any) -> None:
        super().__init__(scope, send)
        self.text_id: str | None = None  # the open text part
        self.streamed_text = False
        self.started_message = False
        self.done = False
        self.metadata: dict[str, Any] = {}

    def track(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> None:
        self.parts(kind, frame, seq)

    def encode(self, events: list[Any], seq: int | None) -> bytes:
        texts = ["data: [DONE]\n\n" if p == "[DONE]" else f"data: {json.dumps(p)}\n\n"
                 for p in events]  # fmt: skip
        if seq is not None:
            texts[-1] = f"id: {seq}\n{texts[-1]}"
        return "".join(texts).encode()

    def translate(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> list[Any]:
        if self.done:
            return []
        parts = self.parts(kind, frame, seq)
        if parts and not self.started_message:
            self.started_message = True
            parts.insert(0, {"type": "start", "messageId": self.stream_id})
        return parts

    def parts(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> list[Any]:
        if kind is ServerFrame.SUBSCRIBED:
            self.started_message = True
            return [{"type": "start", "messageId": self.stream_id}]
        if kind is ServerFrame.CHUNK:
            return self.chunk(frame["chunk"], seq or 0)
        if kind is ServerFrame.GAP:
            return [{"type": "data-gap", "data": {"from_seq": frame["from_seq"],
                                                  "to_seq": frame["to_seq"]}}]  # fmt: skip
        if kind is ServerFrame.CLOSED:
            return self.finish("stop", {"reason": frame.get("reason", ""),
                                        "last_seq": frame.get("last_seq")})  # fmt: skip
        if kind is ServerFrame.ERROR:
            return [*self.end_text(), {"type": "error", "errorText": frame.get("message", "")},
                    *self.finish("error", {})]  # fmt: skip
        return []  # reconnect: the response ends, useChat resumes; pong

    def finish(self, reason: str, metadata: dict[str, Any]) -> list[Any]:
        self.done = True
        return [*self.end_text(), {"type": "finish", "finishReason": reason,
                                   "messageMetadata": {**self.metadata, **metadata}},
                "[DONE]"]  # fmt: skip

    def end_text(self) -> list[Any]:
        if self.text_id is None:
            return []
        text_id, self.text_id = self.text_id, None
        return [{"type": "text-end", "id": text_id}]

    def text(self, delta: str, seq: int) -> list[Any]:
        parts: list[Any] = []
        if self.text_id is None:
            self.text_id = f"{self.stream_id}-t{seq}"
            parts.append({"type": "text-start", "id": self.text_id})
        parts.append({"type": "text-delta", "id": self.text_id, "delta": delta})
        return parts

    def chunk(self, chunk: dict[str, Any], seq: int) -> list[Any]:
        kind = chunk.get("type")
        if kind == "text_delta":
            if not chunk.get("text_delta"):
                return []
            self.streamed_text = True
            return self.text(chunk["text_delta"], seq)
        if kind == "tool_call_request":
            return [*self.end_text(), *({"type": "tool-input-available",
                                         "toolCallId": str(c.get("id")),
                                         "toolName": str(c.get("name")),
                                         "input": c.get("arguments") or {}}
                                        for c in chunk.get("tool_calls", []))]  # fmt: skip
        if kind == "tool_result_emission":
            call_id = str(chunk["tool_call_id"])
            if not chunk.get("is_success", True):
                return [{"type": "tool-output-error", "toolCallId": call_id,
                         "errorText": str(chunk.get("error_message") or "failed")}]  # fmt: skip
            return [{"type": "tool-output-available", "toolCallId": call_id,
                     "output": chunk.get("tool_result")}]  # fmt: skip
        if kind == "metadata_update":
            return [{"type": "data-metadata", "data": chunk.get("updates", {})}]
        if kind == "system_progress":
            return [{"type": "data-progress", "data": {k: chunk.get(k) for k in
                     ("message", "progress_percentage", "status_code")}}]  # fmt: skip
        if kind == "ui_command":
            return [{"type": "data-ui-command", "data": c} for c in chunk["ui_commands"]]
        if kind == "final_response":
            parts: list[Any] = []
            final = chunk.get("final_response_text")
            if final and not self.streamed_text:
                parts += self.text(final, seq)
            parts += self.end_text()
            parts += [{"type": "data-ui-command", "data": c}
                      for c in chunk.get("final_ui_commands") or []]  # fmt: skip
            if chunk.get("usage") is not None:
                self.metadata["usage"] = chunk["usage"]
            return parts
        if kind == "error":
            error = {"type": "error", "errorText": str(chunk.get("message", ""))}
            if chunk.get("is_final", True):
                return [*self.end_text(), error, *self.finish("error", {})]
            return [{"type": "data-error", "data": {k: chunk.get(k) for k in
                                                    ("code", "message", "details")}}]  # fmt: skip
        return []


async def ui_message_stream(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI app of the UI message stream endpoint (route it with ``sse_urlpatterns``)."""
    await serve(UIMessageStream, ("GET",), scope, receive, send)
