"""Transcripts: one reducer over the chunks, saved with the close, once, by whoever closes."""

from __future__ import annotations

import json
import re

import pytest
from django.test import override_settings

from streaming_app.chunks import (
    ErrorChunk,
    FinalResponseChunk,
    MetadataUpdateChunk,
    SystemProgressChunk,
    TextDeltaChunk,
    ToolCallRequestChunk,
    ToolResultEmissionChunk,
    UICommandChunk,
)
from streaming_app.manager import StreamingManager
from streaming_app.models import StreamTranscript
from streaming_app.transcripts import Transcript, assemble

from .servers import manager_call, run_python

pytestmark = pytest.mark.django_db(transaction=True)


def every_type(sid: str) -> list[object]:
    return [
        SystemProgressChunk(stream_id=sid, message="thinking", progress_percentage=10),
        TextDeltaChunk(stream_id=sid, text_delta="The weather "),
        ToolCallRequestChunk(
            stream_id=sid,
            tool_calls=[{"id": "c1", "name": "forecast", "arguments": {"city": "Oslo"}}],
        ),
        ToolResultEmissionChunk(
            stream_id=sid, tool_call_id="c1", tool_name="forecast", tool_result={"sky": "clear"}
        ),
        MetadataUpdateChunk(stream_id=sid, updates={"city": "Oslo"}),
        UICommandChunk(stream_id=sid, ui_commands=[{"command": "show_map"}]),
        TextDeltaChunk(stream_id=sid, text_delta="is clear."),
        ErrorChunk(stream_id=sid, code="SLOW_TOOL", message="took 3 s", is_final=False),
        FinalResponseChunk(
            stream_id=sid, final_response_text="The weather is clear.", usage={"total_tokens": 42}
        ),
    ]


def test_the_reducer_assembles_every_chunk_type() -> None:
    chunks = every_type("s")
    entries = [(n, json.dumps(c.to_wire())) for n, c in enumerate(chunks, 1)]  # type: ignore[attr-defined]
    t = assemble(entries)
    assert t.text == "The weather is clear."
    assert t.tool_calls == [{"id": "c1", "name": "forecast", "arguments": {"city": "Oslo"},
                             "result": {"sky": "clear"}, "is_success": True,
                             "error_message": None}]  # fmt: skip
    assert t.ui_commands == [{"command": "show_map"}]
    assert t.progress == [{"message": "thinking", "progress_percentage": 10, "status_code": None}]
    assert t.errors == [{"code": "SLOW_TOOL", "message": "took 3 s", "details": None}]
    assert (t.metadata, t.usage) == ({"city": "Oslo"}, {"total_tokens": 42})
    assert (t.first_seq, t.last_seq, t.complete, t.history_lost) == (1, 9, True, False)
    # Without a final response the deltas are the text; a hole in seq is not complete.
    partial = assemble([(1, '{"type":"text_delta","text_delta":"a"}'),
                        (3, '{"type":"text_delta","text_delta":"c"}')])  # fmt: skip
    assert (partial.text, partial.complete) == ("ac", False)


async def test_a_close_saves_the_transcript_once() -> None:
    manager = StreamingManager()
    await manager.initialize()
    sid = await manager.create_stream()
    pushed = every_type(sid)
    for chunk in pushed:
        await manager.push_chunk(sid, chunk)  # type: ignore[arg-type]
    await manager.close_stream(sid, "Interaction complete.")
    await manager.close_stream(sid, "again")  # closed already: nothing more is saved
    saved = await StreamTranscript.objects.aget(stream_id=sid)
    expected = assemble([(n, json.dumps(c.to_wire())) for n, c in enumerate(pushed, 1)])  # type: ignore[attr-defined]
    assert saved.text == expected.text
    columns = ("text", "first_seq", "last_seq", "complete", "history_lost")
    assert saved.data == {k: v for k, v in expected.to_dict().items() if k not in columns}
    assert (saved.close_reason, saved.first_seq, saved.last_seq, saved.complete) == (
        "Interaction complete.", 1, 9, True,
    )  # fmt: skip
    assert await StreamTranscript.objects.acount() == 1
    await manager.shutdown()


@pytest.mark.parametrize(
    ("limits", "expected"),
    [  # the history keeps 3 chunks: the snapshot beside it has the rest
        ({"HISTORY_MAX_CHUNKS": 3}, ("abcde", 1, 5, True)),
        # the process's byte budget dropped them before any snapshot took them: said so
        ({"HISTORY_MAX_TOTAL_BYTES": 700}, ("cde", 3, 5, False)),
    ],
)
async def test_a_trimmed_history_still_makes_a_whole_transcript_unless_nothing_kept_it(
    limits: dict[str, int], expected: tuple[str, int, int, bool]
) -> None:
    with override_settings(STREAMING_APP=limits):
        manager = StreamingManager()
        await manager.initialize()
        sid = await manager.create_stream()
        for word in ("a", "b", "c", "d", "e"):
            await manager.push_chunk(sid, TextDeltaChunk(stream_id=sid, text_delta=word))
        await manager.close_stream(sid)
        saved = await StreamTranscript.objects.aget(stream_id=sid)
        assert (saved.text, saved.first_seq, saved.last_seq, saved.complete) == expected
        await manager.shutdown()


def test_the_transcript_survives_its_producer_and_says_when_history_was_lost(
    env: dict[str, str], redis_url: str
) -> None:
    # A producer pushes and dies without closing; an operator's process closes the stream.
    sid = manager_call(env, "out = await m.create_stream()\n"
                            "for w in ('hello ', 'world'):\n"
                            "    await m.push_chunk(out, TextDeltaChunk(stream_id=out, "
                            "text_delta=w))")  # fmt: skip
    manager_call(env, f"await m.close_stream({sid!r}, 'closed by ops')")
    lost = manager_call(env, "out = await m.create_stream()")
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()  # Redis restarted empty
    manager_call(env, f"await m.close_stream({lost!r}, 'after the restart')")
    rows = run_python(
        "import json\n"
        "from streaming_app.models import StreamTranscript\n"
        "print(json.dumps({t.stream_id: [t.text, t.complete, t.history_lost, t.close_reason]"
        " for t in StreamTranscript.objects.all()}))\n", env=env,
    )  # fmt: skip
    assert json.loads(rows) == {
        sid: ["hello world", True, False, "closed by ops"],
        lost: ["", False, True, "after the restart"],
    }
    assert Transcript().complete  # an empty stream's transcript is complete


async def test_the_admin_shows_the_transcript_to_those_who_may_read_it() -> None:
    from django.contrib.auth.models import User
    from django.test import AsyncClient

    from streaming_app.manager import get_streaming_manager

    manager = get_streaming_manager()
    sid = await manager.create_stream()
    for chunk in every_type(sid):
        await manager.push_chunk(sid, chunk)  # type: ignore[arg-type]
    await manager.close_stream(sid)
    url = f"/admin/streaming_app/stream/{sid}/change/"
    root, staff = AsyncClient(), AsyncClient()
    await root.aforce_login(await User.objects.acreate_superuser("root", password="pw"))
    await staff.aforce_login(await User.objects.acreate_user("ops", is_staff=True))
    page = (await root.get(url)).content.decode()
    assert "The weather is clear." in page
    assert "<td>forecast</td>" in page and "{&quot;sky&quot;: &quot;clear&quot;}" in page
    assert re.search(r"<details><summary>\d+ raw chunks</summary><ol><li value=\"1\">", page)
    assert "The weather is clear." not in (await staff.get(url)).content.decode()
