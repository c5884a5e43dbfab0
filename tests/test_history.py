"""Both history backends: sequence numbers, bounded retention, close and send failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from streaming_app.exceptions import GMIErrorCode, StreamError
from streaming_app.history import AppendResult, Closed, History, MemoryHistory
from streaming_app.redis_history import RedisHistory

Make = Callable[..., History]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Build a history of each backend (Redis: this session's own redis-server)."""
    built: list[RedisHistory] = []

    def build(max_chunks: int = 100, max_age: float = 3600) -> History:
        if request.param == "memory":
            return MemoryHistory(max_chunks=max_chunks, max_age_seconds=max_age)
        url = request.getfixturevalue("redis_url")
        built.append(RedisHistory(url, max_chunks=max_chunks, max_age_seconds=max_age))
        return built[-1]

    yield build
    for history in built:
        await history.aclose()


def clock(monkeypatch: pytest.MonkeyPatch, start: float) -> list[float]:
    """A settable time.time for both backends."""
    now = [start]
    for module in ("streaming_app.history", "streaming_app.redis_history"):
        monkeypatch.setattr(f"{module}.time.time", lambda: now[0])
    return now


async def test_sequence_numbers_and_reads(make: Make) -> None:
    history = make()
    await history.open("s")
    seqs = [(await history.append("s", f'"{i}"', take_failures=False)).seq for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    replay = await history.read_after("s", 2)
    assert replay.entries == [(3, '"2"'), (4, '"3"'), (5, '"4"')]
    assert replay.head_seq == 5
    assert (await history.read_after("s", 1, up_to=3)).entries == [(2, '"1"'), (3, '"2"')]
    assert (await history.read_after("s", 5)).entries == []
    assert (await history.read_after("unknown", 0)).head_seq == 0


async def test_retention_by_count_and_age(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    history = make(max_chunks=3, max_age=10)
    now = clock(monkeypatch, 1000.0)
    await history.open("s")
    for i in range(5):
        await history.append("s", str(i), take_failures=False)
    assert [seq for seq, _ in (await history.read_after("s", 0)).entries] == [3, 4, 5]
    assert (await history.states(["s"]))["s"].first_seq == 3
    now[0] += 11
    assert (await history.read_after("s", 0)).entries == []
    state = (await history.states(["s"]))["s"]
    assert (state.head_seq, state.first_seq) == (5, 6)


async def test_close_is_idempotent_and_stops_appends(make: Make) -> None:
    history = make()
    await history.open("s")
    await history.append("s", "1", take_failures=False)
    assert await history.close("s", "done") == Closed(head_seq=1, was_open=True, reason="done")
    assert await history.close("s", "again") == Closed(head_seq=1, was_open=False, reason="done")
    with pytest.raises(StreamError) as info:
        await history.append("s", "2", take_failures=False)
    assert info.value.code is GMIErrorCode.STREAM_CLOSED
    assert (await history.states(["s"]))["s"].close_reason == "done"
    assert await history.close("unknown", "x") is None
    with pytest.raises(StreamError) as info:
        await history.append("unknown", "1", take_failures=False)
    assert info.value.code is GMIErrorCode.RESOURCE_NOT_FOUND


async def test_failures_are_taken_once_instead_of_appending(make: Make) -> None:
    history = make()
    await history.open("s")
    await history.record_failure("s", "c1", "boom")
    assert (await history.append("s", "1", take_failures=False)).seq == 1
    result = await history.append("s", "2", take_failures=True)
    assert (result.seq, result.failed_clients) == (None, {"c1": "boom"})
    assert (await history.append("s", "2", take_failures=True)).seq == 2


async def test_forget(make: Make) -> None:
    history = make()
    for stream_id in ("a", "b"):
        await history.open(stream_id)
    await history.forget("a")
    assert set(await history.states(["a", "b", "c"])) == {"b"}


async def test_states_of_more_streams_than_one_call_takes(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streaming_app.redis_history.STATES_BATCH", 2)
    history = make()
    for index, stream_id in enumerate("abcde"):
        await history.open(stream_id)
        for n in range(index):
            await history.append(stream_id, str(n), take_failures=False)
    await history.close("d", 'tab\there, and a quote " in the reason')
    states = await history.states(["a", "x", "b", "c", "d", "e"])
    assert {k: (s.head_seq, s.first_seq) for k, s in states.items()} == {
        "a": (0, 1),
        "b": (1, 1),
        "c": (2, 1),
        "d": (3, 1),
        "e": (4, 1),
    }
    assert (
        states["d"].closed and states["d"].close_reason == 'tab\there, and a quote " in the reason'
    )
    assert not states["e"].closed and states["e"].last_activity > 0


async def test_memory_history_expires_closed_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    history = MemoryHistory(max_chunks=100, max_age_seconds=10)
    for stream_id in ("a", "b", "c"):
        await history.open(stream_id)
    await history.forget("a")
    await history.close("b", "done")
    assert history.expire_closed() == []
    clock = __import__("time").time() + 11
    monkeypatch.setattr("streaming_app.history.time.time", lambda: clock)
    assert history.expire_closed() == ["b"]
    assert set(await history.states(["a", "b", "c"])) == {"c"}


async def test_redis_history_survives_a_server_that_closes_idle_connections(
    redis_url: str,
) -> None:
    import asyncio

    import redis

    history = RedisHistory(redis_url, max_chunks=10, max_age_seconds=60)
    with redis.Redis.from_url(redis_url) as admin:
        admin.config_set("timeout", 1)  # the server drops connections idle for 1 s
        try:
            await history.open("idle")
            await asyncio.gather(*(history.append("idle", str(i), take_failures=False)
                                   for i in range(5)))  # several pooled connections  # fmt: skip
            await asyncio.sleep(2.5)  # all of them closed by the server meanwhile
            await asyncio.gather(*(history.read_after("idle", 0) for _ in range(5)))
            assert (await history.append("idle", "after", take_failures=False)).seq == 6
        finally:
            admin.config_set("timeout", 0)
            await history.aclose()


async def test_memory_history_stays_within_its_total_budget_dropping_the_oldest_first() -> None:
    from streaming_app.history import MemoryHistory

    history = MemoryHistory(max_chunks=1000, max_age_seconds=3600, max_total_bytes=1000)
    for sid in ("old", "new"):
        await history.open(sid)
    for i in range(10):  # 10 x 100 bytes: exactly the budget
        await history.append("old", f'"{i:098d}"', take_failures=False)
    assert history.size == 1000 and history.evicted == 0
    for i in range(4):
        await history.append("new", f'"{i:098d}"', take_failures=False)
        assert history.size <= 1000
    states = await history.states(["old", "new"])
    assert (states["old"].first_seq, states["old"].head_seq) == (5, 10)  # its 4 oldest went
    assert (states["new"].first_seq, states["new"].head_seq) == (1, 4)
    assert history.evicted == 4
    replay = await history.read_after("old", 0)
    assert [seq for seq, _ in replay.entries] == [5, 6, 7, 8, 9, 10]  # a client gets a gap first
    await history.forget("old")
    assert history.size == 400


async def test_the_same_redis_read_asked_at_once_is_one_round_trip(redis_url: str) -> None:
    """Every follower of a stream in a worker reads a chunk that came by seq at once: one
    XRANGE serves them all (counted by Redis itself)."""
    import redis

    history = RedisHistory(redis_url, max_chunks=100, max_age_seconds=60)
    await history.open("s")
    for i in range(3):
        await history.append("s", f'"{i}"', take_failures=False)

    def xranges() -> int:
        with redis.Redis.from_url(redis_url) as client:
            stats = client.info("commandstats").get("cmdstat_xrange", {"calls": 0})
            return int(stats["calls"])

    before = xranges()
    replays = await asyncio.gather(*(history.read_after("s", 1, 2) for _ in range(5)))
    assert [r.entries for r in replays] == [[(2, '"1"')]] * 5
    assert xranges() - before == 1
    await history.read_after("s", 1, 2)  # a read after those is a read of its own
    assert xranges() - before == 2
    await history.aclose()


# -- RedisHistory's pipelined push connection ---------------------------------------------


async def test_concurrent_appends_share_one_connection_and_each_gets_its_own_reply(
    redis_url: str,
) -> None:
    """Pushes to many streams at once are written back to back on one connection; replies
    come in order and each reaches its own caller, an error reply included."""
    import redis

    history = RedisHistory(redis_url, max_chunks=100, max_age_seconds=60)
    try:
        for stream_id in "abcd":
            await history.open(stream_id)
        with redis.Redis.from_url(redis_url) as admin:
            admin.delete("streaming:{c}:meta")
            admin.set("streaming:{c}:meta", "not a hash")  # its append gets an error reply
            before = admin.info("clients")["connected_clients"]
            results = await asyncio.gather(
                *(history.append(s, f'"{s}{i}"', take_failures=False)
                  for i in range(50) for s in "abcd"),
                return_exceptions=True,
            )  # fmt: skip
            assert admin.info("clients")["connected_clients"] - before <= 1
        seqs: dict[str, list[int]] = {"a": [], "b": [], "d": []}
        for index, result in enumerate(results):
            stream_id = "abcd"[index % 4]
            if stream_id == "c":
                assert isinstance(result, redis.ResponseError), result
            else:
                assert isinstance(result, AppendResult) and result.seq is not None, result
                seqs[stream_id].append(result.seq)
        assert all(s == list(range(1, 51)) for s in seqs.values()), seqs
        replay = await history.read_after("b", 0)
        assert [c for _, c in replay.entries] == [f'"b{i}"' for i in range(50)]
    finally:
        await history.aclose()


async def test_a_cancelled_append_leaves_the_next_replies_in_step(redis_url: str) -> None:
    """A push cancelled while its reply is on the way (its caller stopped) ran all the same;
    the reply is read and dropped, and the pushes after it get their own."""
    history = RedisHistory(redis_url, max_chunks=100, max_age_seconds=60)
    try:
        await history.open("s")
        await history.append("s", '"warm"', take_failures=False)  # connected
        cancelled = asyncio.ensure_future(history.append("s", '"x"', take_failures=False))
        await asyncio.sleep(0)  # written, waiting for its reply
        cancelled.cancel()
        assert (await history.append("s", '"y"', take_failures=False)).seq == 3
        assert cancelled.cancelled()
        assert [c for _, c in (await history.read_after("s", 1)).entries] == ['"x"', '"y"']
    finally:
        await history.aclose()


async def test_appends_go_on_after_the_connection_is_killed_or_the_scripts_flushed(
    redis_url: str,
) -> None:
    import redis

    history = RedisHistory(redis_url, max_chunks=100, max_age_seconds=60)
    try:
        await history.open("s")
        await history.append("s", '"1"', take_failures=False)
        with redis.Redis.from_url(redis_url) as admin:
            admin.script_flush()  # as after a restart: the next call gets NOSCRIPT, loads it
            assert (await history.append("s", '"2"', take_failures=False)).seq == 2
            killed = admin.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
        reader = history._client().pipe._reader
        if reader is not None:  # its reader sees the connection close, and ends
            await asyncio.wait_for(reader, 10)
        assert (await history.append("s", '"3"', take_failures=False)).seq == 3
        with redis.Redis.from_url(redis_url) as admin:  # now with pushes on their way
            pushes = [asyncio.ensure_future(history.append("s", f'"{n}"', take_failures=False))
                      for n in range(4, 9)]  # fmt: skip
            await asyncio.sleep(0)
            admin.client_kill_filter(_type="normal", skipme=True)
            outcomes = await asyncio.gather(*pushes, return_exceptions=True)
        ran = [o.seq for o in outcomes if isinstance(o, AppendResult) and o.seq is not None]
        failed = [o for o in outcomes if not isinstance(o, AppendResult)]
        assert all(isinstance(o, redis.ConnectionError) for o in failed), failed
        head = (await history.read_after("s", 0)).head_seq  # replies still in step: each its own
        assert ran == sorted(ran) and len(set(ran)) == len(ran) and all(q <= head for q in ran)
        assert (await history.append("s", '"last"', take_failures=False)).seq == head + 1
    finally:
        await history.aclose()
