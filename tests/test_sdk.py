"""The SDK adapters with the real packages and no network: ``openai`` and ``anthropic`` pointed
at a local server that replays each provider's documented streaming wire format, pydantic-ai
with its own ``FunctionModel``, LangChain with its own fake chat model. Each asserts the exact
chunks pushed, tool calls split across many deltas included."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from streaming_app.chunks import (
    FinalResponseChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    ToolResultEmissionChunk,
)
from streaming_app.manager import StreamingManager
from streaming_app.sdk import (
    stream_anthropic,
    stream_langchain,
    stream_openai_chat,
    stream_openai_responses,
    stream_pydantic_ai,
)

from .conftest import RecordingClient

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.database_independent]


def sse(events: list[tuple[str | None, Any]]) -> bytes:
    out = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        body = data if isinstance(data, str) else json.dumps(data)
        out.append(f"{head}data: {body}\n\n")
    return "".join(out).encode()


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-test", "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": finish}]}  # fmt: skip


def tool_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


OPENAI_CHAT = sse([
    (None, chat_chunk({"role": "assistant", "content": ""})),
    (None, chat_chunk({"content": "Let me "})),
    (None, chat_chunk({"content": "check."})),
    (None, chat_chunk(tool_delta(0, id="call_1", type="function",
                                 function={"name": "forecast", "arguments": ""}))),
    (None, chat_chunk(tool_delta(0, function={"arguments": '{"ci'}))),
    (None, chat_chunk(tool_delta(1, id="call_2", type="function",
                                 function={"name": "clock", "arguments": '{"tz"'}))),
    (None, chat_chunk(tool_delta(0, function={"arguments": 'ty": "Os'}))),
    (None, chat_chunk(tool_delta(1, function={"arguments": ': "UTC"}'}))),
    (None, chat_chunk(tool_delta(0, function={"arguments": 'lo"}'}))),
    (None, chat_chunk({}, "tool_calls")),
    (None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-test", "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}}),
    (None, "[DONE]"),
])  # fmt: skip

OPENAI_RESPONSES = sse([
    ("response.created", {"type": "response.created", "sequence_number": 0,
                          "response": {"id": "resp_1", "object": "response",
                                       "status": "in_progress", "output": [],
                                       "model": "gpt-test"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1,
                                    "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                    "delta": "Sunny "}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 2,
                                    "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                    "delta": "today."}),
    ("response.function_call_arguments.delta", {
        "type": "response.function_call_arguments.delta", "sequence_number": 3,
        "item_id": "fc_1", "output_index": 1, "delta": '{"city":'}),
    ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": 4,
                                   "output_index": 1, "item": {
                                       "type": "function_call", "id": "fc_1", "call_id": "call_9",
                                       "name": "forecast", "arguments": '{"city": "Oslo"}',
                                       "status": "completed"}}),
    ("response.completed", {"type": "response.completed", "sequence_number": 5, "response": {
        "id": "resp_1", "object": "response", "status": "completed", "output": [],
        "model": "gpt-test", "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}}),
])  # fmt: skip

ANTHROPIC = sse([
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "model": "claude-test", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Checking "}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "the sky."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "forecast", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '"Oslo"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                          "stop_sequence": None},
                       "usage": {"output_tokens": 30}}),
    ("message_stop", {"type": "message_stop"}),
])  # fmt: skip

BODIES = {"/v1/chat/completions": OPENAI_CHAT, "/v1/responses": OPENAI_RESPONSES,
          "/v1/messages": ANTHROPIC}  # fmt: skip


class Replay(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = BODIES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in body.split(b"\n\n"):  # event by event, as a provider sends them
            if piece:
                self.wfile.write(piece + b"\n\n")
                self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def pushed(run: Any) -> list[dict[str, Any]]:
    """Run an adapter into a new stream; what its client received (the chunks' own fields)."""
    manager = StreamingManager()
    await manager.initialize()
    sid = await manager.create_stream()
    client = RecordingClient("reader")
    await manager.register_client(sid, client)
    assert await run(sid, manager)
    await manager.shutdown()
    keep = {TextDeltaChunk: ("text_delta",), ToolCallRequestChunk: ("tool_calls",),
            FinalResponseChunk: ("final_response_text", "usage"),
            ToolResultEmissionChunk: ("tool_call_id", "tool_name", "tool_result",
                                      "is_success")}  # fmt: skip
    return [{"type": str(c.type), **{f: getattr(c, f) for f in keep[type(c)]}}
            for c in client.chunks]  # fmt: skip


async def test_openai_chat_completions(provider: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{provider}/v1", api_key="test", max_retries=0)

    async def run(sid: str, manager: StreamingManager) -> bool:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "weather?"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        return await stream_openai_chat(sid, stream, manager=manager)

    chunks = await pushed(run)
    await client.close()
    assert chunks == [
        {"type": "text_delta", "text_delta": "Let me "},
        {"type": "text_delta", "text_delta": "check."},
        {"type": "tool_call_request", "tool_calls": [
            {"id": "call_1", "name": "forecast", "arguments": {"city": "Oslo"}},
            {"id": "call_2", "name": "clock", "arguments": {"tz": "UTC"}}]},
        {"type": "final_response", "final_response_text": "Let me check.",
         "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}},
    ]  # fmt: skip


async def test_openai_responses(provider: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{provider}/v1", api_key="test", max_retries=0)

    async def run(sid: str, manager: StreamingManager) -> bool:
        stream = await client.responses.create(model="gpt-test", input="weather?", stream=True)
        return await stream_openai_responses(sid, stream, manager=manager)

    chunks = await pushed(run)
    await client.close()
    assert chunks == [
        {"type": "text_delta", "text_delta": "Sunny "},
        {"type": "text_delta", "text_delta": "today."},
        {"type": "tool_call_request", "tool_calls": [
            {"id": "call_9", "name": "forecast", "arguments": {"city": "Oslo"}}]},
        {"type": "final_response", "final_response_text": "Sunny today.",
         "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}},
    ]  # fmt: skip


async def test_anthropic_messages(provider: str) -> None:
    from anthropic import AsyncAnthropic

    client = AsyncAnthropic(base_url=provider, api_key="test", max_retries=0)

    async def run(sid: str, manager: StreamingManager) -> bool:
        stream = await client.messages.create(
            model="claude-test", max_tokens=100, stream=True,
            messages=[{"role": "user", "content": "weather?"}],
        )  # fmt: skip
        return await stream_anthropic(sid, stream, manager=manager)

    chunks = await pushed(run)
    await client.close()
    assert chunks[:3] == [
        {"type": "text_delta", "text_delta": "Checking "},
        {"type": "text_delta", "text_delta": "the sky."},
        {"type": "tool_call_request", "tool_calls": [
            {"id": "toolu_1", "name": "forecast", "arguments": {"city": "Oslo"}}]},
    ]  # fmt: skip
    final = chunks[3]
    assert (final["type"], final["final_response_text"]) == ("final_response", "Checking the sky.")
    assert final["usage"]["input_tokens"] == 12 and final["usage"]["output_tokens"] == 30
    assert len(chunks) == 4


async def test_pydantic_ai_with_its_function_model() -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel

    async def model(messages: list[ModelMessage], info: AgentInfo) -> Any:
        answered = any(isinstance(part, ToolReturnPart) for message in messages
                       if isinstance(message, ModelRequest) for part in message.parts)  # fmt: skip
        if not answered:  # the arguments arrive in two pieces
            yield {0: DeltaToolCall(name="forecast", json_args='{"ci', tool_call_id="call_1")}
            yield {0: DeltaToolCall(json_args='ty": "Oslo"}')}
        else:
            yield "The sky "
            yield "is clear."

    agent = Agent(FunctionModel(stream_function=model))

    @agent.tool_plain
    def forecast(city: str) -> dict[str, str]:
        return {"sky": "clear", "city": city}

    async def run(sid: str, manager: StreamingManager) -> bool:
        async with agent.run_stream_events("weather?") as events:
            return await stream_pydantic_ai(sid, events, manager=manager)

    chunks = await pushed(run)
    assert chunks[:4] == [
        {"type": "tool_call_request", "tool_calls": [
            {"id": "call_1", "name": "forecast", "arguments": {"city": "Oslo"}}]},
        {"type": "tool_result_emission", "tool_call_id": "call_1", "tool_name": "forecast",
         "tool_result": {"sky": "clear", "city": "Oslo"}, "is_success": True},
        {"type": "text_delta", "text_delta": "The sky "},
        {"type": "text_delta", "text_delta": "is clear."},
    ]  # fmt: skip
    final = chunks[4]
    assert (final["type"], final["final_response_text"]) == ("final_response", "The sky is clear.")
    assert final["usage"]["requests"] == 2
    assert len(chunks) == 5


async def test_langchain_astream_events_of_a_graph_with_its_fake_chat_model() -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
    from langchain_core.outputs import ChatGenerationChunk
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool

    class ToolCallingFake(GenericFakeChatModel):
        """LangChain's fake chat model, streaming a tool call in pieces as real models do."""

        def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
            for piece in ({"index": 0, "id": "call_1", "name": "forecast", "args": '{"ci'},
                          {"index": 0, "args": 'ty": "Oslo"}'}):  # fmt: skip
                message = AIMessageChunk(content="", tool_call_chunks=[piece])  # type: ignore[list-item]
                yield ChatGenerationChunk(message=message)

    @tool
    def forecast(city: str) -> str:
        """The forecast for a city."""
        return f"clear over {city}"

    talker = GenericFakeChatModel(messages=iter([AIMessage(content="The sky is clear.")]))

    async def graph(question: str) -> str:  # model -> tool -> model, as an agent graph runs
        decided = await ToolCallingFake(messages=iter([])).ainvoke(question)
        call = decided.tool_calls[0]
        result = await forecast.ainvoke(call)
        assert isinstance(result, ToolMessage)
        answer = await talker.ainvoke([decided, result])
        return str(answer.content)

    async def run(sid: str, manager: StreamingManager) -> bool:
        events = RunnableLambda(graph).astream_events("weather?", version="v2")
        return await stream_langchain(sid, events, manager=manager)

    assert await pushed(run) == [
        {"type": "tool_call_request", "tool_calls": [
            {"id": "call_1", "name": "forecast", "arguments": {"city": "Oslo"}}]},
        {"type": "tool_result_emission", "tool_call_id": "call_1", "tool_name": "forecast",
         "tool_result": "clear over Oslo", "is_success": True},
        {"type": "text_delta", "text_delta": "The"},
        {"type": "text_delta", "text_delta": " "},
        {"type": "text_delta", "text_delta": "sky"},
        {"type": "text_delta", "text_delta": " "},
        {"type": "text_delta", "text_delta": "is"},
        {"type": "text_delta", "text_delta": " "},
        {"type": "text_delta", "text_delta": "clear."},
        {"type": "final_response", "final_response_text": "The sky is clear.", "usage": None},
    ]  # fmt: skip
