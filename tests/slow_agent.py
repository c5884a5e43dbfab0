"""A test agent that talks slowly: a chunk, then more than 10 s of silence, for a minute."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from streaming_app.chunks import AgentOSResponse, FinalResponseChunk, TextDeltaChunk

GAP_SECONDS = float(os.environ.get("SLOW_AGENT_GAP_SECONDS", "12"))
GAPS = int(os.environ.get("SLOW_AGENT_GAPS", "5"))


async def agent(message: str, stream_id: str) -> AsyncIterator[AgentOSResponse]:
    """``GAPS`` silences of ``GAP_SECONDS`` between text deltas, then the final response."""
    for index in range(GAPS):
        yield TextDeltaChunk(stream_id=stream_id, text_delta=f"part {index} ")
        await asyncio.sleep(GAP_SECONDS)
    text = "".join(f"part {index} " for index in range(GAPS))
    yield FinalResponseChunk(stream_id=stream_id, final_response_text=text)
