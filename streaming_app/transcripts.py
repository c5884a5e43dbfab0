"""What a stream said, assembled: one reducer over its chunks, saved when the stream closes.

:func:`reduce` folds one chunk (its JSON form) into a :class:`Transcript`; the same fold runs
wherever a reply is assembled, so they agree. When a stream closes, in whichever process closes
it (its producer, an operator, the sweeper finishing a close or closing an idle stream), the
manager assembles the transcript from the history and the registry saves it with the closed
row, in one transaction: a stream's transcript is saved once, and a producer that died does not
lose it. A history that no longer held every chunk (trimmed, or lost with a Redis restart) is
said so in ``complete`` / ``history_lost``.

The same state is a stream's *snapshot*: kept beside the history (advanced by the producing
process every ``HISTORY_MAX_CHUNKS // 2`` chunks, so it covers what the history trims) and sent
as one ``snapshot`` frame to a client that joins far behind, instead of every delta
(:func:`build_snapshot`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .history import History

PAGE = 500  # chunks read from history at a time while assembling


@dataclass
class Transcript:
    """The assembled reply of one stream."""

    # The text as parts, joined when read: a reply of thousands of deltas is assembled in
    # linear time (``+=`` on an attribute copies the whole text each time).
    text_parts: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    ui_commands: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    first_seq: int = 0  # the first chunk assembled (1 when nothing was missing)
    last_seq: int = 0
    complete: bool = True  # every chunk from seq 1 to last_seq was assembled
    history_lost: bool = False
    finished: bool = False  # a final response came

    @property
    def text(self) -> str:
        if len(self.text_parts) > 1:
            self.text_parts[:] = ["".join(self.text_parts)]
        return self.text_parts[0] if self.text_parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self.text_parts[:] = [value]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["text_parts"]
        return {"text": self.text, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)} - {"text_parts"}
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.text = str(data.get("text", ""))
        return state


def reduce(state: Transcript, seq: int, chunk: dict[str, Any]) -> Transcript:
    """Fold one chunk (its JSON form, as pushed) into ``state``; returns ``state``."""
    if state.first_seq == 0:
        state.first_seq = seq
        state.complete = state.complete and seq == 1
    elif seq != state.last_seq + 1:
        state.complete = False
    state.last_seq = seq
    kind = chunk.get("type")
    if kind == "text_delta":
        state.text_parts.append(chunk.get("text_delta", ""))
    elif kind == "final_response":
        state.finished = True
        final = chunk.get("final_response_text")
        if final is not None:
            state.text = final  # the producer's own assembly of the reply wins
        state.ui_commands += chunk.get("final_ui_commands") or []
        if chunk.get("usage") is not None:
            state.usage = chunk["usage"]
    elif kind == "tool_call_request":
        for call in chunk.get("tool_calls", []):
            state.tool_calls.append({
                "id": call.get("id"), "name": call.get("name"),
                "arguments": call.get("arguments"), "result": None, "is_success": None,
                "error_message": None,
            })  # fmt: skip
    elif kind == "tool_result_emission":
        call = next((c for c in state.tool_calls if c["id"] == chunk.get("tool_call_id")), None)
        if call is None:  # a result without its request (trimmed): keep it anyway
            call = {"id": chunk.get("tool_call_id"), "name": chunk.get("tool_name"),
                    "arguments": None}  # fmt: skip
            state.tool_calls.append(call)
        call.update(result=chunk.get("tool_result"), is_success=chunk.get("is_success", True),
                    error_message=chunk.get("error_message"))  # fmt: skip
    elif kind == "ui_command":
        state.ui_commands += chunk.get("ui_commands", [])
    elif kind == "system_progress":
        state.progress.append({k: chunk.get(k) for k in
                               ("message", "progress_percentage", "status_code")})  # fmt: skip
    elif kind == "metadata_update":
        state.metadata.update(chunk.get("updates", {}))
    elif kind == "error":
        state.errors.append({k: chunk.get(k) for k in ("code", "message", "details")})
    return state


def assemble(entries: Iterable[tuple[int, str]], state: Transcript | None = None) -> Transcript:
    """The transcript of ``(seq, chunk_json)`` entries in seq order (a history replay), or
    ``state`` with them folded in."""
    state = Transcript() if state is None else state
    for seq, chunk_json in entries:
        reduce(state, seq, json.loads(chunk_json))
    return state


async def build_snapshot(
    history: History, stream_id: str, up_to: int | None = None
) -> tuple[Transcript, int]:
    """The stream's state at its head (or at ``up_to``) and that seq: the stored snapshot with
    what the history holds after it folded in, a page at a time. Chunks neither covers make it
    ``complete: false``."""
    stored = await history.snapshot(stream_id)
    state, after = Transcript(), 0
    if stored is not None:
        after, state = stored[0], Transcript.from_dict(json.loads(stored[1]))
    start = after
    while True:
        end = after + PAGE if up_to is None else min(up_to, after + PAGE)
        replay = await history.read_after(stream_id, after, end)
        assemble(replay.entries, state)
        head = replay.head_seq if up_to is None else min(up_to, replay.head_seq)
        if end >= head:
            break
        after = end
    if state.last_seq < head:  # the newest chunks are not held
        state.complete = False
    return state, max(head, start)
