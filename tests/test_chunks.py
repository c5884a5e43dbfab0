"""AgentOSResponse chunk types: construction, validation and the one JSON form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streaming_app.chunks import (
    CHUNK_CLASSES,
    ChunkType,
    ErrorChunk,
    FinalResponseChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    encode_chunk,
    parse_chunk,
)
from streaming_app.exceptions import GMIErrorCode, StreamError

EXAMPLES: dict[str, dict[str, Any]] = {
    "text_delta": {"text_delta": "Hel"},
    "system_progress": {"message": "Searching", "progress_percentage": 40},
    "tool_call_request": {"tool_calls": [{"id": "1", "name": "search", "arguments": {}}]},
    "tool_result_emission": {"tool_call_id": "1", "tool_name": "search", "tool_result": [1]},
    "ui_command": {"ui_commands": [{"command": "scroll"}]},
    "final_response": {"final_response_text": "Hello"},
    "error": {"code": "E", "message": "boom"},
    "metadata_update": {"updates": {"title": "Weather"}},
}


def test_all_eight_types_exist() -> None:
    assert set(CHUNK_CLASSES) == {t.value for t in ChunkType} == set(EXAMPLES)


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_wire_form_round_trips(kind: str) -> None:
    wire = {"type": kind, "stream_id": "s", "persona_id": "p", **EXAMPLES[kind]}
    chunk = parse_chunk(wire)
    assert type(chunk) is CHUNK_CLASSES[kind]
    text = encode_chunk(chunk, stream_id="s", max_bytes=10_000)
    again = json.loads(text)
    assert again["type"] == kind
    assert again["persona_id"] == "p"
    assert parse_chunk(again) == chunk
    assert {"stream_id", "gmi_instance_id", "persona_id", "is_final", "timestamp"} <= set(again)


def test_common_fields_and_defaults() -> None:
    chunk = TextDeltaChunk(stream_id="s", text_delta="x", metadata={"k": 1})
    assert chunk.timestamp.endswith("Z")
    assert chunk.is_final is False
    assert FinalResponseChunk(stream_id="s").is_final is True
    assert ErrorChunk(stream_id="s", code="c", message="m").is_final is True
    assert "metadata" not in TextDeltaChunk(stream_id="s", text_delta="x").to_wire()
    assert chunk.to_wire()["metadata"] == {"k": 1}


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        ({"type": "poem", "stream_id": "s"}, "unknown chunk type"),
        ({"stream_id": "s", "text_delta": "x"}, "unknown chunk type"),
        ({"type": "text_delta", "stream_id": "s"}, "missing fields: text_delta"),
        ({"type": "text_delta", "stream_id": "s", "text_delta": "x", "hue": 1}, "unknown fields"),
        ({"type": "text_delta", "stream_id": "s", "text_delta": None}, "must be str"),
        ({"type": "text_delta", "stream_id": 5, "text_delta": "x"}, "must be str"),
        ({"type": "text_delta", "stream_id": "s", "text_delta": "x", "is_final": "no"}, "bool"),
        ({"type": "tool_call_request", "stream_id": "s", "tool_calls": ["x"]}, "tool_calls"),
        ({"type": "system_progress", "stream_id": "s", "message": "m",
          "progress_percentage": True}, "progress_percentage"),
    ],
)  # fmt: skip
def test_invalid_chunks_are_refused(wire: dict[str, Any], fragment: str) -> None:
    with pytest.raises(StreamError) as info:
        parse_chunk(wire)
    assert info.value.code is GMIErrorCode.INVALID_ARGUMENT
    assert fragment in info.value.message


def test_typed_constructor_validates_too() -> None:
    with pytest.raises(StreamError):
        ToolCallRequestChunk(stream_id="s", tool_calls="search")  # type: ignore[arg-type]


def test_encode_refuses_unserialisable_foreign_and_oversized_chunks() -> None:
    odd = parse_chunk({"type": "tool_result_emission", "stream_id": "s", "tool_call_id": "1",
                       "tool_name": "t", "tool_result": float("nan")})  # fmt: skip
    cases = [
        (odd, "s", 1000, "not JSON-serialisable"),
        (TextDeltaChunk(stream_id="s", text_delta="x"), "t", 1000, "belongs to stream"),
        (TextDeltaChunk(stream_id="s", text_delta="é" * 600), "s", 1000, "over the limit"),
    ]
    for chunk, stream_id, limit, fragment in cases:
        with pytest.raises(StreamError) as info:
            encode_chunk(chunk, stream_id=stream_id, max_bytes=limit)
        assert fragment in info.value.message
        assert info.value.stream_id == stream_id
