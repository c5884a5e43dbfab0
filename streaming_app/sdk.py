"""Any agent SDK's stream becomes chunks: adapters beside :func:`~streaming_app.agents.run_agent`.

Each ``*_chunks(stream_id, stream)`` turns one SDK's async stream into ``AgentOSResponse``
chunks (text deltas as they come, tool calls once their arguments are whole, the final text and
usage last); each ``stream_*`` pushes them with ``run_agent``, so a client's Stop stops the
model at once (``wait_closed``) and an exception becomes ``handle_stream_error``. The SDKs are
duck-typed (no import here): install the one you use (``openai``, ``anthropic``).

- OpenAI Chat Completions (``client.chat.completions.create(..., stream=True,
  stream_options={"include_usage": True})``): ``delta.content`` -> ``text_delta``;
  ``delta.tool_calls`` assembled per ``index`` (id and name from the first delta, arguments
  concatenated) -> one ``tool_call_request`` when the choice finishes; ``usage`` ->
  ``final_response.usage``.
- OpenAI Responses (``client.responses.create(..., stream=True)``): ``response.output_text.delta``
  -> ``text_delta``; ``response.output_item.done`` of a ``function_call`` ->
  ``tool_call_request``; ``response.completed`` -> ``usage``.
- Anthropic Messages (``client.messages.create(..., stream=True)``): ``text_delta`` ->
  ``text_delta``; a ``tool_use`` block's ``input_json_delta`` pieces -> one
  ``tool_call_request`` at its ``content_block_stop``; usage from ``message_start`` and
  ``message_delta``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from .agents import run_agent
from .chunks import (
    AgentOSResponse,
    FinalResponseChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    ToolResultEmissionChunk,
)
from .manager import StreamingManager


def _arguments(text: str) -> Any:
    """Tool-call arguments as the model wrote them: JSON when it parses, else the text."""
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def _dump(value: Any) -> dict[str, Any] | None:
    """A usage object as a dict: pydantic models, dataclasses, mappings."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if v not in (None, {}, [])}
    dump = getattr(value, "model_dump", None)
    return dict(dump(exclude_none=True)) if dump else dict(value)


async def openai_chat_chunks(
    stream_id: str, stream: AsyncIterable[Any]
) -> AsyncIterator[AgentOSResponse]:
    """Chunks of an OpenAI Chat Completions stream (the first choice)."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] | None = None

    def requested() -> list[AgentOSResponse]:
        if not calls:
            return []
        tool_calls = [{"id": c["id"], "name": c["name"], "arguments": _arguments(c["arguments"])}
                      for _, c in sorted(calls.items())]  # fmt: skip
        calls.clear()
        return [ToolCallRequestChunk(stream_id=stream_id, tool_calls=tool_calls)]

    async for event in stream:
        if getattr(event, "usage", None) is not None:
            usage = _dump(event.usage)
        for choice in getattr(event, "choices", None) or []:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None and delta.content:
                text.append(delta.content)
                yield TextDeltaChunk(stream_id=stream_id, text_delta=delta.content)
            for piece in (delta.tool_calls if delta is not None else None) or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                if piece.id:
                    call["id"] = piece.id
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            if choice.finish_reason is not None:
                for chunk in requested():
                    yield chunk
    for chunk in requested():
        yield chunk
    yield FinalResponseChunk(stream_id=stream_id, final_response_text="".join(text), usage=usage)


async def openai_responses_chunks(
    stream_id: str, stream: AsyncIterable[Any]
) -> AsyncIterator[AgentOSResponse]:
    """Chunks of an OpenAI Responses API stream."""
    text: list[str] = []
    usage: dict[str, Any] | None = None
    async for event in stream:
        kind = getattr(event, "type", "")
        if kind == "response.output_text.delta" and event.delta:
            text.append(event.delta)
            yield TextDeltaChunk(stream_id=stream_id, text_delta=event.delta)
        elif kind == "response.output_item.done" and event.item.type == "function_call":
            item = event.item
            yield ToolCallRequestChunk(stream_id=stream_id, tool_calls=[{
                "id": item.call_id, "name": item.name, "arguments": _arguments(item.arguments),
            }])  # fmt: skip
        elif kind == "response.completed":
            usage = _dump(getattr(event.response, "usage", None))
    yield FinalResponseChunk(stream_id=stream_id, final_response_text="".join(text), usage=usage)


async def anthropic_chunks(
    stream_id: str, stream: AsyncIterable[Any]
) -> AsyncIterator[AgentOSResponse]:
    """Chunks of an Anthropic Messages stream."""
    text: list[str] = []
    blocks: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    async for event in stream:
        kind = getattr(event, "type", "")
        if kind == "message_start":
            usage.update(_dump(event.message.usage) or {})
        elif kind == "content_block_start" and event.content_block.type == "tool_use":
            block = event.content_block
            blocks[event.index] = {"id": block.id, "name": block.name, "json": ""}
        elif kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta" and delta.text:
                text.append(delta.text)
                yield TextDeltaChunk(stream_id=stream_id, text_delta=delta.text)
            elif delta.type == "input_json_delta" and event.index in blocks:
                blocks[event.index]["json"] += delta.partial_json
        elif kind == "content_block_stop" and event.index in blocks:
            block = blocks.pop(event.index)
            yield ToolCallRequestChunk(stream_id=stream_id, tool_calls=[{
                "id": block["id"], "name": block["name"], "arguments": _arguments(block["json"]),
            }])  # fmt: skip
        elif kind == "message_delta" and getattr(event, "usage", None) is not None:
            usage.update(_dump(event.usage) or {})
    yield FinalResponseChunk(stream_id=stream_id, final_response_text="".join(text),
                             usage=usage or None)  # fmt: skip


async def pydantic_ai_chunks(
    stream_id: str, events: AsyncIterable[Any]
) -> AsyncIterator[AgentOSResponse]:
    """Chunks of a pydantic-ai run (``agent.run_stream_events(...)``'s events): text parts and
    their deltas, each tool call when pydantic-ai calls it and its result, the output and
    usage last."""
    text: list[str] = []
    final: str | None = None
    usage: dict[str, Any] | None = None
    async for event in events:
        kind = getattr(event, "event_kind", "")
        if kind == "part_start" and getattr(event.part, "part_kind", "") == "text":
            piece = event.part.content
        elif kind == "part_delta" and getattr(event.delta, "part_delta_kind", "") == "text":
            piece = event.delta.content_delta
        else:
            piece = ""
        if piece:
            text.append(piece)
            yield TextDeltaChunk(stream_id=stream_id, text_delta=piece)
        elif kind == "function_tool_call":
            part = event.part
            yield ToolCallRequestChunk(stream_id=stream_id, tool_calls=[{
                "id": part.tool_call_id, "name": part.tool_name, "arguments": part.args_as_dict(),
            }])  # fmt: skip
        elif kind == "function_tool_result":
            part = event.part
            failed = getattr(part, "part_kind", "") == "retry-prompt"
            yield ToolResultEmissionChunk(
                stream_id=stream_id, tool_call_id=part.tool_call_id,
                tool_name=part.tool_name or "", tool_result=None if failed else part.content,
                is_success=not failed, error_message=str(part.content) if failed else None,
            )  # fmt: skip
        elif kind == "agent_run_result":
            output = event.result.output
            final = output if isinstance(output, str) else json.dumps(output, default=str)
            run_usage = event.result.usage  # a property now, a method in pydantic-ai 0.x
            usage = _dump(run_usage() if inspect.ismethod(run_usage) else run_usage)
    final = final if final is not None else "".join(text)
    yield FinalResponseChunk(stream_id=stream_id, final_response_text=final, usage=usage)


async def langchain_chunks(
    stream_id: str, events: AsyncIterable[Mapping[str, Any]]
) -> AsyncIterator[AgentOSResponse]:
    """Chunks of LangChain's ``astream_events(..., version="v2")`` (a chat model, a chain or a
    graph): the models' text as it streams, their tool calls (``tool_call_chunks`` assembled
    per index, sent when the model ends), tools run by the graph and their results, usage."""
    text: list[str] = []
    calls: dict[tuple[str, int], dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    async for event in events:
        kind, data = event.get("event"), event.get("data", {})
        if kind == "on_chat_model_stream":
            chunk = data["chunk"]
            content = chunk.content if isinstance(chunk.content, str) else ""
            if content:
                text.append(content)
                yield TextDeltaChunk(stream_id=stream_id, text_delta=content)
            for piece in getattr(chunk, "tool_call_chunks", None) or []:
                key = (event.get("run_id", ""), piece.get("index") or 0)
                call = calls.setdefault(key, {"id": "", "name": "", "args": ""})
                call["id"] = piece.get("id") or call["id"]
                call["name"] += piece.get("name") or ""
                call["args"] += piece.get("args") or ""
        elif kind == "on_chat_model_end":
            run = event.get("run_id", "")
            mine = sorted((k, c) for k, c in calls.items() if k[0] == run)
            for key, _ in mine:
                calls.pop(key)
            if mine:
                yield ToolCallRequestChunk(stream_id=stream_id, tool_calls=[
                    {"id": c["id"], "name": c["name"], "arguments": _arguments(c["args"])}
                    for _, c in mine])  # fmt: skip
            for name, value in (getattr(data.get("output"), "usage_metadata", None) or {}).items():
                if isinstance(value, int):
                    usage[name] = usage.get(name, 0) + value
        elif kind == "on_tool_end":
            output = data.get("output")
            call_id = getattr(output, "tool_call_id", None) or event.get("run_id", "")
            result = getattr(output, "content", output)
            yield ToolResultEmissionChunk(stream_id=stream_id, tool_call_id=str(call_id),
                                          tool_name=str(event.get("name", "")),
                                          tool_result=result)  # fmt: skip
    yield FinalResponseChunk(stream_id=stream_id, final_response_text="".join(text),
                             usage=usage or None)  # fmt: skip


async def stream_pydantic_ai(
    stream_id: str, events: AsyncIterable[Any], *, manager: StreamingManager | None = None,
    close: bool = True,
) -> bool:  # fmt: skip
    """Push a pydantic-ai run's events into a stream (see :func:`run_agent`)."""
    return await run_agent(stream_id, pydantic_ai_chunks(stream_id, events), manager=manager,
                           close=close)  # fmt: skip


async def stream_langchain(
    stream_id: str, events: AsyncIterable[Mapping[str, Any]], *,
    manager: StreamingManager | None = None, close: bool = True,
) -> bool:  # fmt: skip
    """Push LangChain ``astream_events(version="v2")`` into a stream (see :func:`run_agent`)."""
    return await run_agent(stream_id, langchain_chunks(stream_id, events), manager=manager,
                           close=close)  # fmt: skip


async def stream_openai_chat(
    stream_id: str, stream: AsyncIterable[Any], *, manager: StreamingManager | None = None,
    close: bool = True,
) -> bool:  # fmt: skip
    """Push an OpenAI Chat Completions stream into a stream (see :func:`run_agent`)."""
    return await run_agent(stream_id, openai_chat_chunks(stream_id, stream), manager=manager,
                           close=close)  # fmt: skip


async def stream_openai_responses(
    stream_id: str, stream: AsyncIterable[Any], *, manager: StreamingManager | None = None,
    close: bool = True,
) -> bool:  # fmt: skip
    """Push an OpenAI Responses stream into a stream (see :func:`run_agent`)."""
    return await run_agent(stream_id, openai_responses_chunks(stream_id, stream),
                           manager=manager, close=close)  # fmt: skip


async def stream_anthropic(
    stream_id: str, stream: AsyncIterable[Any], *, manager: StreamingManager | None = None,
    close: bool = True,
) -> bool:  # fmt: skip
    """Push an Anthropic Messages stream into a stream (see :func:`run_agent`)."""
    return await run_agent(stream_id, anthropic_chunks(stream_id, stream), manager=manager,
                           close=close)  # fmt: skip
