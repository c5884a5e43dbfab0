"""Wiring agents into streams: run an agent or pipe any async text stream (an LLM SDK's) into
a stream, with errors turned into ``handle_stream_error`` and completion into a final response
and a close. Also the deterministic local agent the demo and the tests use.

An *agent* is an async generator function ``agent(message, stream_id)`` yielding chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.utils.module_loading import import_string

from .chunks import (
    AgentOSResponse,
    FinalResponseChunk,
    MetadataUpdateChunk,
    SystemProgressChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    ToolResultEmissionChunk,
    UICommandChunk,
)
from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError
from .manager import StreamingManager, get_streaming_manager

logger = logging.getLogger(__name__)

Agent = Callable[[str, str], AsyncIterator[AgentOSResponse]]
COMPLETE_REASON = "Interaction complete."


def get_agent() -> Agent:
    """The agent named by ``STREAMING_APP["AGENT"]``."""
    agent: Agent = import_string(app_settings.AGENT)
    return agent


async def run_agent(
    stream_id: str,
    chunks: AsyncIterable[AgentOSResponse],
    *,
    manager: StreamingManager | None = None,
    close: bool = True,
) -> bool:
    """Push every chunk into the stream, then close it; True when the agent ran to its end.

    An exception in the agent becomes ``handle_stream_error``. When the stream is closed
    meanwhile (a client's Stop, an operator), the agent is stopped at once, even while it waits
    for its model, and False is returned.
    """
    manager = manager or get_streaming_manager()
    closed = asyncio.ensure_future(manager.wait_closed(stream_id))
    iterator = aiter(chunks)
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({step, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                logger.info("stream %s closed (%s): agent stopped", stream_id, closed.result())
                return False
            try:
                chunk = step.result()
            except StopAsyncIteration:
                break
            await manager.push_chunk(stream_id, chunk)
    except StreamError as exc:
        await _aclose(iterator)
        if exc.code is GMIErrorCode.STREAM_CLOSED:
            logger.info("stream %s was closed while its agent ran; stopping it", stream_id)
            return False
        await _report(manager, stream_id, exc)
        return False
    except Exception as exc:
        logger.exception("agent of stream %s failed", stream_id)
        await _report(manager, stream_id, exc)
        return False
    finally:
        closed.cancel()
    if close:
        await manager.close_stream(stream_id, COMPLETE_REASON)
    return True


async def stream_text(
    stream_id: str,
    texts: AsyncIterable[str],
    *,
    manager: StreamingManager | None = None,
    close: bool = True,
    **chunk_fields: Any,
) -> bool:
    """Pipe an async iterator of text (any LLM SDK's token stream) into a stream: a
    ``text_delta`` per piece, then a ``final_response`` with the whole text, then a close."""

    async def chunks() -> AsyncIterator[AgentOSResponse]:
        parts: list[str] = []
        async for text in texts:
            parts.append(text)
            yield TextDeltaChunk(stream_id=stream_id, text_delta=text, **chunk_fields)
        yield FinalResponseChunk(
            stream_id=stream_id, final_response_text="".join(parts), **chunk_fields
        )

    return await run_agent(stream_id, chunks(), manager=manager, close=close)


def stream_text_sync(stream_id: str, texts: Iterable[str], **chunk_fields: Any) -> bool:
    """:func:`stream_text` for synchronous code (a Celery task, a management command): pipes
    a plain iterator of text, e.g. a synchronous LLM SDK stream."""
    return async_to_sync(stream_text)(stream_id, _from_sync(texts), **chunk_fields)


async def _from_sync(texts: Iterable[str]) -> AsyncIterator[str]:
    iterator = iter(texts)

    def step() -> tuple[bool, str]:
        for text in iterator:
            return True, text
        return False, ""

    while True:  # each step may block on the network: run it off the event loop
        more, text = await sync_to_async(step, thread_sensitive=False)()
        if not more:
            return
        yield text


async def _report(manager: StreamingManager, stream_id: str, exc: BaseException) -> None:
    try:
        await manager.handle_stream_error(stream_id, exc)
    except StreamError:
        logger.exception("could not report the error of stream %s", stream_id)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def local_agent(
    message: str, stream_id: str, *, delay: float = 0.04,
    history: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[AgentOSResponse]:  # fmt: skip
    """A deterministic agent: progress, a tool call and its result, the answer token by
    token, a UI command, a metadata update and the final response. No network. With
    ``history`` (the conversation's earlier ``(message, reply)`` turns) it says which turn
    this is and what was asked first."""
    ids: dict[str, Any] = {
        "stream_id": stream_id,
        "gmi_instance_id": "local-gmi",
        "persona_id": "local-echo",
    }
    words = re.findall(r"\S+", message) or ["(nothing)"]
    yield SystemProgressChunk(message="Reading your message", progress_percentage=10.0, **ids)
    await asyncio.sleep(delay)
    call = {"id": "call-1", "name": "word_count", "arguments": {"text": message}}
    yield ToolCallRequestChunk(tool_calls=[call], rationale="Count the words first.", **ids)
    await asyncio.sleep(delay)
    yield ToolResultEmissionChunk(
        tool_call_id="call-1", tool_name="word_count", tool_result={"words": len(words)}, **ids
    )
    yield SystemProgressChunk(message="Writing the answer", progress_percentage=50.0, **ids)
    answer = (
        f"You said {len(words)} word{'s' if len(words) != 1 else ''}. "
        f"Here they are back, one at a time: {' '.join(words)}. "
        "This reply comes from the deterministic local agent, streamed token by token."
    )
    if history:
        answer += (f" This is turn {len(history) + 1} of our conversation; "
                   f"you first asked: {history[0][0][:80]}")  # fmt: skip
    tokens = re.findall(r"\s*\S+", answer)
    for token in tokens:
        await asyncio.sleep(delay)
        yield TextDeltaChunk(text_delta=token, **ids)
    yield UICommandChunk(ui_commands=[{"command": "highlight", "target": "reply"}], **ids)
    yield MetadataUpdateChunk(updates={"tokens": len(tokens), "words": len(words)}, **ids)
    yield FinalResponseChunk(
        final_response_text=answer, usage={"output_tokens": len(tokens)}, **ids
    )


_running: set[asyncio.Task[bool]] = set()


def start_agent(
    stream_id: str, message: str, agent: Agent | None = None, *,
    history: Sequence[tuple[str, str]] = (),
) -> asyncio.Task[bool]:  # fmt: skip
    """Run an agent for a stream in the background of this process's event loop.

    ``history`` (the conversation's earlier ``(message, reply)`` turns) is passed to agents
    that take a ``history`` keyword. The task is kept until it ends, so it is not
    garbage-collected mid-reply.
    """
    agent = agent or get_agent()
    takes_history = "history" in inspect.signature(agent).parameters
    if takes_history:
        chunks = agent(message, stream_id, history=history)  # type: ignore[call-arg]
    else:
        chunks = agent(message, stream_id)
    task = asyncio.get_running_loop().create_task(
        run_agent(stream_id, chunks), name=f"agent-{stream_id}"
    )
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
