"""A test agent that talks slowly: a chunk, then a long silence, and so on, for a minute.

Select it with ``STREAMING_APP["AGENT"] = "tests.slow_agent.agent"``. The message is the list
of silences in seconds (``"12 12 12"``); anything else means :data:`DEFAULT_GAPS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from streaming_app.chunks import AgentOSResponse, FinalResponseChunk, TextDeltaChunk

# Five silences of 12 s: a 60 s turn, each silence longer than redis-py 8's default socket
# timeout (5 s) and channels_redis's blocking pop (5 s) together with their margins.
DEFAULT_GAPS = (12.0, 12.0, 12.0, 12.0, 12.0)


def gaps_of(message: str) -> tuple[float, ...]:
    """The silences a message asks for."""
    try:
        gaps = tuple(float(word) for word in message.split())
    except ValueError:
        return DEFAULT_GAPS
    return gaps or DEFAULT_GAPS


def part(index: int) -> str:
    return f"part {index} "


async def agent(message: str, stream_id: str) -> AsyncIterator[AgentOSResponse]:
    """A text delta before each silence, then the final response with the whole text."""
    gaps = gaps_of(message)
    for index, gap in enumerate(gaps):
        yield TextDeltaChunk(stream_id=stream_id, text_delta=part(index))
        await asyncio.sleep(gap)
    text = "".join(part(index) for index in range(len(gaps)))
    yield FinalResponseChunk(stream_id=stream_id, final_response_text=text)
