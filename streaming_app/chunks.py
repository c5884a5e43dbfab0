"""AgentOSResponse chunk types as typed objects, their validation and their one JSON form.

A chunk that is not one of these types, misses a field, has a field of the wrong type, is not
JSON-serialisable or is over ``MAX_CHUNK_BYTES`` is refused with ``StreamError(INVALID_ARGUMENT)``
before anything is sent.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from .exceptions import GMIErrorCode, StreamError


class ChunkType(StrEnum):
    """The ``type`` of every AgentOSResponse chunk."""

    TEXT_DELTA = "text_delta"
    SYSTEM_PROGRESS = "system_progress"
    TOOL_CALL_REQUEST = "tool_call_request"
    TOOL_RESULT_EMISSION = "tool_result_emission"
    UI_COMMAND = "ui_command"
    FINAL_RESPONSE = "final_response"
    ERROR = "error"
    METADATA_UPDATE = "metadata_update"


def now_iso() -> str:
    """The current UTC time as the ISO 8601 string chunks carry in ``timestamp``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(kw_only=True)
class AgentOSResponse:
    """Fields every chunk carries. Subclasses add their own and set ``type``."""

    type: ClassVar[ChunkType]

    stream_id: str
    gmi_instance_id: str = ""
    persona_id: str = ""
    is_final: bool = False
    timestamp: str = field(default_factory=now_iso)
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, hint, conforms in _checks(type(self)):
            value = getattr(self, name)
            if not conforms(value):
                raise _invalid(
                    f"{self.type} chunk field {name!r} must be {_describe(hint)}, "
                    f"not {type(value).__name__}",
                    stream_id=self.stream_id if isinstance(self.stream_id, str) else None,
                )

    def to_wire(self) -> dict[str, Any]:
        """The chunk's JSON form: its fields plus ``type``; ``metadata`` only when set."""
        data: dict[str, Any] = {"type": str(self.type)}
        for name, _, _ in _checks(type(self)):
            value = getattr(self, name)
            if name == "metadata" and value is None:
                continue
            data[name] = value
        return data


@dataclass(kw_only=True)
class TextDeltaChunk(AgentOSResponse):
    """A piece of the response text, to be appended to what came before."""

    type: ClassVar[ChunkType] = ChunkType.TEXT_DELTA
    text_delta: str


@dataclass(kw_only=True)
class SystemProgressChunk(AgentOSResponse):
    """What the agent is doing right now (e.g. "Searching the web")."""

    type: ClassVar[ChunkType] = ChunkType.SYSTEM_PROGRESS
    message: str
    progress_percentage: float | None = None
    status_code: str | None = None


@dataclass(kw_only=True)
class ToolCallRequestChunk(AgentOSResponse):
    """The agent asks for tool calls: each ``{"id", "name", "arguments"}``."""

    type: ClassVar[ChunkType] = ChunkType.TOOL_CALL_REQUEST
    tool_calls: list[dict[str, Any]]
    rationale: str | None = None


@dataclass(kw_only=True)
class ToolResultEmissionChunk(AgentOSResponse):
    """The result of one tool call."""

    type: ClassVar[ChunkType] = ChunkType.TOOL_RESULT_EMISSION
    tool_call_id: str
    tool_name: str
    tool_result: Any
    is_success: bool = True
    error_message: str | None = None


@dataclass(kw_only=True)
class UICommandChunk(AgentOSResponse):
    """Instructions for the user interface (each a ``{"command", ...}`` mapping)."""

    type: ClassVar[ChunkType] = ChunkType.UI_COMMAND
    ui_commands: list[dict[str, Any]]


@dataclass(kw_only=True)
class FinalResponseChunk(AgentOSResponse):
    """The complete answer of a turn."""

    type: ClassVar[ChunkType] = ChunkType.FINAL_RESPONSE
    is_final: bool = True
    final_response_text: str | None = None
    final_ui_commands: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ErrorChunk(AgentOSResponse):
    """An error in the agent's processing, for the user to see."""

    type: ClassVar[ChunkType] = ChunkType.ERROR
    is_final: bool = True
    code: str
    message: str
    details: dict[str, Any] | None = None


@dataclass(kw_only=True)
class MetadataUpdateChunk(AgentOSResponse):
    """Changes to the conversation's metadata."""

    type: ClassVar[ChunkType] = ChunkType.METADATA_UPDATE
    updates: dict[str, Any]


CHUNK_CLASSES: dict[str, type[AgentOSResponse]] = {
    cls.type: cls
    for cls in (
        TextDeltaChunk,
        SystemProgressChunk,
        ToolCallRequestChunk,
        ToolResultEmissionChunk,
        UICommandChunk,
        FinalResponseChunk,
        ErrorChunk,
        MetadataUpdateChunk,
    )
}


def parse_chunk(data: Mapping[str, Any]) -> AgentOSResponse:
    """Build the typed chunk a wire mapping describes; raises ``StreamError(INVALID_ARGUMENT)``."""
    if not isinstance(data, Mapping):
        raise _invalid(f"a chunk must be a mapping, not {type(data).__name__}")
    stream_id = data.get("stream_id")
    stream_id = stream_id if isinstance(stream_id, str) else None
    kind = data.get("type")
    cls = CHUNK_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _invalid(
            f"unknown chunk type {kind!r}; expected one of {', '.join(CHUNK_CLASSES)}",
            stream_id=stream_id,
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"type"})
    if unknown:
        raise _invalid(
            f"{kind} chunk has unknown fields: {', '.join(unknown)}", stream_id=stream_id
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise _invalid(f"{kind} chunk is missing fields: {', '.join(missing)}", stream_id=stream_id)
    return cls(**{k: v for k, v in data.items() if k != "type"})


def encode_chunk(
    chunk: AgentOSResponse | Mapping[str, Any], *, stream_id: str, max_bytes: int
) -> str:
    """Validate a chunk for ``stream_id`` and return its compact JSON text.

    Raises ``StreamError(INVALID_ARGUMENT)`` for any chunk that cannot be sent as it is.
    """
    typed = chunk if isinstance(chunk, AgentOSResponse) else parse_chunk(chunk)
    if typed.stream_id != stream_id:
        raise _invalid(
            f"chunk belongs to stream {typed.stream_id!r}, not {stream_id!r}", stream_id=stream_id
        )
    try:
        text = json.dumps(
            typed.to_wire(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise _invalid(f"chunk is not JSON-serialisable: {exc}", stream_id=stream_id) from exc
    # (a code point is at most 4 bytes in UTF-8: most chunks need no encoding to know)
    if len(text) * 4 > max_bytes and (size := len(text.encode())) > max_bytes:
        raise _invalid(
            f"chunk is {size} bytes, over the limit of {max_bytes} (MAX_CHUNK_BYTES)",
            stream_id=stream_id,
            details={"size": size, "limit": max_bytes},
        )
    return text


def _invalid(
    message: str, *, stream_id: str | None = None, details: dict[str, Any] | None = None
) -> StreamError:
    return StreamError(GMIErrorCode.INVALID_ARGUMENT, message, stream_id=stream_id, details=details)


Check = Callable[[Any], bool]
_CHECKS: dict[type[AgentOSResponse], list[tuple[str, Any, Check]]] = {}


def _checks(cls: type[AgentOSResponse]) -> list[tuple[str, Any, Check]]:
    """Each field of a chunk class with its type and the check of a value against it, built
    once per class: a chunk is checked on every push, its hints are not read again."""
    checks = _CHECKS.get(cls)
    if checks is None:
        hints = typing.get_type_hints(cls)
        checks = _CHECKS[cls] = [
            (f.name, hints[f.name], _checker(hints[f.name])) for f in dataclasses.fields(cls)
        ]
    return checks


def _checker(hint: Any) -> Check:
    """A function telling whether a value is of the type ``hint`` (as JSON would carry it)."""
    if hint is Any:
        return lambda value: True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        alternatives = [_checker(arg) for arg in typing.get_args(hint)]
        return lambda value: any(conforms(value) for conforms in alternatives)
    if hint is type(None):
        return lambda value: value is None
    if hint is float:
        return lambda value: isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        item_conforms = _checker(item)
        return lambda value: isinstance(value, list) and all(item_conforms(v) for v in value)
    if origin is dict:
        return lambda value: isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return lambda value: isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    return getattr(origin or hint, "__name__", str(hint))
