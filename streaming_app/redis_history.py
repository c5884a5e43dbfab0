"""History in Redis, shared by every process: the scale-out backend.

Per stream, three keys with one hash tag (so a Redis Cluster keeps them together):
``streaming:{<id>}:meta`` (head seq, closed flag, reason, last activity), ``...:log`` (a Redis
Stream whose entry ids are ``<seq>-0``, trimmed to ``HISTORY_MAX_CHUNKS``) and ``...:fail``
(pending send failures). ``append`` and ``close`` are Lua scripts: one round trip, atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError
from .history import AppendResult, Closed, Replay, StreamState

logger = logging.getLogger(__name__)

# Keys of open streams outlive idle periods by this much at least (their inactivity timeout
# closes them long before); closed streams keep their history for HISTORY_MAX_AGE_SECONDS.
OPEN_TTL_SECONDS = 24 * 3600
# How long a command waits for a free pooled connection before it fails (BACKEND_UNAVAILABLE).
POOL_TIMEOUT_SECONDS = 20

APPEND = """
-- ARGV: 1 time, 2 max chunks, 3 ttl, 4 take failures, 5 publish to, 6 inline bytes, 7.. the
-- chunks. Publish to: '' (nobody), a pub/sub channel, or 'core' and the group's place in
-- channels_redis's core layer, one per line: prefix, expiry, group expiry, capacity, group key
local meta, log, fail = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', meta) == 0 then return {-1} end
if redis.call('HGET', meta, 'closed') == '1' then
  return {-2, redis.call('HGET', meta, 'reason')}
end
if ARGV[4] == '1' then
  local failures = redis.call('HGETALL', fail)
  if #failures > 0 then
    redis.call('DEL', fail)
    local out = {0}
    for i = 1, #failures do out[#out + 1] = failures[i] end
    return out
  end
end
local core, keys, names = nil, {}, {}
if string.sub(ARGV[5], 1, 5) == 'core\\n' then
  -- the group's members as channels_redis's core group_send finds them (stale ones dropped),
  -- by the sorted set each is read from: one per process for its own channels ('...!')
  local prefix, expiry, group_expiry, capacity, group =
    string.match(ARGV[5], '^core\\n([^\\n]*)\\n(%d+)\\n(%d+)\\n(%d+)\\n(.+)$')
  core = {expiry = tonumber(expiry), capacity = tonumber(capacity), full = 0}
  local now = math.floor(tonumber(ARGV[1]))
  redis.call('ZREMRANGEBYSCORE', group, 0, now - tonumber(group_expiry))
  for _, channel in ipairs(redis.call('ZRANGE', group, 0, -1)) do
    local bang = string.find(channel, '!', 1, true)
    local key = prefix .. (bang and string.sub(channel, 1, bang) or channel)
    if names[key] == nil then
      names[key] = {}
      keys[#keys + 1] = key
      redis.call('ZREMRANGEBYSCORE', key, 0, now - core.expiry)
    end
    table.insert(names[key], channel)
  end
end
local seq = 0
local refresh = false
local inline = tonumber(ARGV[6])
for i = 7, #ARGV do
  seq = redis.call('HINCRBY', meta, 'head', 1)
  redis.call('XADD', log, 'MAXLEN', ARGV[2], seq .. '-0', 't', ARGV[1], 'c', ARGV[i])
  if seq % 64 == 1 then refresh = true end
  if ARGV[5] ~= '' then
    -- fan-out in the same round trip: the event as channels_redis sends it (plus 'at', the
    -- push time, for the delivery latency metric); a chunk over the inline size is announced
    -- by its seq only: its followers read it from the history
    local event = {type = 'stream.chunk', seq = seq, at = ARGV[1]}
    if #ARGV[i] <= inline then event['chunk'] = ARGV[i] end
    if core then
      -- as the core layer's group_send: a member naming its channels, after a 12-byte prefix
      -- (the seq: the member is unique by its channels and seq), unless the set is full
      local unique = string.sub(string.format('%020d', seq), -12)
      for _, key in ipairs(keys) do
        if redis.call('ZCOUNT', key, '-inf', '+inf') < core.capacity then
          event['__asgi_channel__'] = names[key]
          redis.call('ZADD', key, ARGV[1], unique .. cmsgpack.pack(event))
          redis.call('EXPIRE', key, core.expiry)
        else
          core.full = core.full + 1
        end
      end
    else
      redis.call('PUBLISH', ARGV[5], cmsgpack.pack(event))
    end
  end
end
redis.call('HSET', meta, 'last_activity', ARGV[1])
if refresh then  -- refreshing the keys' lifetime now and then is enough
  redis.call('EXPIRE', meta, ARGV[3])
  redis.call('EXPIRE', log, ARGV[3])
end
if core then return {seq, core.full} end
return {seq}
"""

SAVE_SNAPSHOT = """
-- a newer snapshot only, of a stream that still exists
local meta = KEYS[1]
if redis.call('EXISTS', meta) == 1
    and tonumber(redis.call('HGET', meta, 'snap_seq') or '-1') < tonumber(ARGV[1]) then
  redis.call('HSET', meta, 'snap_seq', ARGV[1], 'snap', ARGV[2])
end
return 0
"""

CLOSE = """
local meta = KEYS[1]
if redis.call('EXISTS', meta) == 0 then return {-1, 0, ''} end
local was_open = 0
if redis.call('HGET', meta, 'closed') ~= '1' then
  redis.call('HSET', meta, 'closed', '1', 'reason', ARGV[1], 'closed_at', ARGV[2])
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
  was_open = 1
end
return {tonumber(redis.call('HGET', meta, 'head')), was_open, redis.call('HGET', meta, 'reason')}
"""


STATES = """
-- KEYS: each stream's meta and log keys in turn. One JSON reply for all of them (parsed in C,
-- not element by element): per stream [head, closed, reason, last_activity, closed_at, the
-- oldest entry's id, its time], false where absent.
local out = {}
for i = 1, #KEYS, 2 do
  local m = redis.call('HMGET', KEYS[i], 'head', 'closed', 'reason', 'last_activity', 'closed_at')
  local first, first_t = redis.call('XRANGE', KEYS[i + 1], '-', '+', 'COUNT', 1), false
  local first_id = false
  if #first > 0 then
    first_id = first[1][1]
    local fields = first[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 't' then first_t = fields[j + 1] end
    end
  end
  out[#out + 1] = {m[1], m[2], m[3], m[4], m[5], first_id, first_t}
end
return cjson.encode(out)
"""
READ = """
-- KEYS: meta, log. ARGV: 1 min id (exclusive, '(' prefixed), 2 max id ('+' or an id), 3 the
-- oldest time still held. One JSON reply, parsed in C: [head, [seq, chunk, seq, chunk, ...]].
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2])
local held, cutoff = {}, tonumber(ARGV[3])
for i = 1, #entries do
  local fields, t, c = entries[i][2], nil, nil
  for j = 1, #fields, 2 do
    if fields[j] == 't' then t = fields[j + 1] elseif fields[j] == 'c' then c = fields[j + 1] end
  end
  if tonumber(t) >= cutoff then
    held[#held + 1] = tonumber((string.gsub(entries[i][1], '-.*', '')))
    held[#held + 1] = c
  end
end
return cjson.encode({redis.call('HGET', KEYS[1], 'head') or 0, held})
"""
# Streams per STATES call: one reply stays small, and Redis is not held long.
STATES_BATCH = 500


def _keys(stream_id: str) -> tuple[str, str, str]:
    base = f"streaming:{{{stream_id}}}"
    return f"{base}:meta", f"{base}:log", f"{base}:fail"


@dataclass(frozen=True)
class _Client:
    """One event loop's connection pool and scripts."""

    redis: Redis
    append: AsyncScript
    close: AsyncScript
    states: AsyncScript
    read: AsyncScript
    pipe: Pipelined

    async def aclose(self) -> None:
        await self.pipe.aclose()
        await self.redis.aclose()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(*args: bytes) -> bytes:
    """A command in RESP, the protocol's own framing: its arguments as bulk strings."""
    return b"*%d\r\n%s" % (len(args), b"".join(map(_bulk, args)))


class Pipelined:
    """One connection of the pool kept for the scripts (pushes, reads, closes), pipelined:
    the commands of one turn of the event loop go out in one write, and one task reads the
    replies, in order, for their waiters. Concurrent pushes (or the catch-up reads of clients
    connecting at once) share it without waiting for each other or for the pool, and a
    socket write (a system call: tens of microseconds) serves all of them. A push costs the
    producer its part of a write, one wake-up and the reply; redis-py's command machinery,
    the pool's locks and its metrics cost as much again (measured in ``streaming_bench``).
    The reader also notices at once a connection the server closed (an idle timeout): the
    next command reconnects."""

    def __init__(self, pool: BlockingConnectionPool) -> None:
        self._pool = pool
        self._connection: AbstractConnection | None = None
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._unsent: list[bytes] = []  # this turn's commands, written at its end
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, command: bytes) -> Any:
        """Send one packed command; its reply (a Redis error reply raised as redis-py's)."""
        connection = self._connection
        if connection is None or not connection.is_connected or self._reader is None:
            connection = await self._connect()
        writer = connection._writer  # redis-py's asyncio StreamWriter for the socket
        assert writer is not None
        if writer.transport.get_write_buffer_size() > 2**20:
            await writer.drain()  # Redis is slower than the pushes: wait for the socket
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # The command and its waiter's place in line go together, with no await between:
        # the replies come in the order of the commands.
        self._waiters.append(waiter)
        self._unsent.append(command)
        if len(self._unsent) == 1:
            loop.call_soon(self._write)
        return await waiter

    def _write(self) -> None:
        # What is unsent is the current connection's: a connection that dies takes its
        # unsent commands (and their waiters) with it.
        unsent, self._unsent = self._unsent, []
        connection = self._connection
        if unsent and connection is not None and connection._writer is not None:
            connection._writer.writelines(unsent)

    async def _connect(self) -> AbstractConnection:
        async with self._connecting:
            connection = self._connection
            if connection is None or not connection.is_connected or self._reader is None:
                if connection is None:
                    connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                await connection.connect()
                self._reader = asyncio.ensure_future(self._read(connection))
            return connection

    async def _read(self, connection: AbstractConnection) -> None:
        waiters = self._waiters
        try:
            while True:
                try:
                    reply = await connection.read_response(timeout=math.inf)  # idle is fine
                except ResponseError as exc:  # an error reply: the stream is still in step
                    reply = exc
                if not waiters:
                    raise RedisConnectionError("a reply that no command waits for")
                waiter = waiters.popleft()
                if waiter.done():  # its caller was cancelled: the command ran all the same
                    continue
                if isinstance(reply, ResponseError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except BaseException as exc:
            # The connection is gone (or the loop is closing): whatever waits fails, and the
            # next command reconnects. Whether a command in flight ran is unknown.
            if waiters and not isinstance(exc, asyncio.CancelledError):
                logger.warning("redis push connection lost with %d command(s) in flight: %s",
                               len(waiters), exc)  # fmt: skip
            error = exc if isinstance(exc, Exception) else RedisConnectionError("connection closed")
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
            self._unsent.clear()  # their waiters just failed: never sent on a new connection
            # Let go of the connection before anything waits: a command from now on takes a
            # fresh one (and a reader of its own), never this one while it closes.
            self._reader = self._connection = None
            try:
                await connection.disconnect(nowait=True)
            finally:
                await self._pool.release(connection)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._connection is not None:
            await self._pool.release(self._connection)
            self._connection = None


class RedisHistory:
    """The History protocol over Redis (redis-py's asyncio client, one per event loop)."""

    shared = True

    def __init__(
        self, url: str, *, max_chunks: int, max_age_seconds: float, max_connections: int = 200
    ) -> None:
        self.url = url
        self.max_chunks = max_chunks
        self.max_age_seconds = max_age_seconds
        self.max_connections = max_connections
        self._clients: dict[asyncio.AbstractEventLoop, _Client] = {}
        self._reads: dict[tuple[str, int, int | None], asyncio.Future[Replay]] = {}

    @classmethod
    def from_settings(cls) -> RedisHistory:
        """Built from ``REDIS_URL``, ``HISTORY_MAX_CHUNKS`` and ``HISTORY_MAX_AGE_SECONDS``."""
        if not app_settings.REDIS_URL:
            raise StreamError(
                GMIErrorCode.INVALID_ARGUMENT, "RedisHistory needs STREAMING_APP['REDIS_URL']"
            )
        return cls(
            app_settings.REDIS_URL,
            max_chunks=app_settings.HISTORY_MAX_CHUNKS,
            max_age_seconds=app_settings.HISTORY_MAX_AGE_SECONDS,
            max_connections=app_settings.REDIS_MAX_CONNECTIONS,
        )

    def publish_prefix(self, layer_target: tuple[str, str] | None) -> str:
        """The layer's group channel prefix when the layer's Redis is this history's."""
        if layer_target is None or _server(layer_target[0]) != _server(self.url):
            return ""
        return layer_target[1]

    def expire_closed(self) -> list[str]:
        return []  # Redis expires closed streams' keys itself

    def _client(self) -> _Client:
        # redis-py's connections belong to the loop that opened them: one client per loop.
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            # A server with an idle timeout closes pooled connections: ping one that was idle
            # before using it, and reconnect once when the server closed it. (A command is
            # retried only after a connection error: a server that closed the connection did
            # not run it.) A burst beyond max_connections waits for a connection (up to
            # POOL_TIMEOUT_SECONDS) instead of failing at once with "Too many connections": a
            # stream's close has each of its clients in this process read history at once.
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections, timeout=POOL_TIMEOUT_SECONDS,
                health_check_interval=10, retry=Retry(NoBackoff(), 1),
            )  # fmt: skip
            client = Redis.from_pool(pool)
            append, close, states, read = map(client.register_script, (APPEND, CLOSE, STATES, READ))
            entry = _Client(client, append, close, states, read, Pipelined(pool))
            self._clients[loop] = entry
            self._close_with(loop)
        return entry

    def _close_with(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the loop's connections when the loop closes (sync callers run each call in a
        loop of its own, as channels_redis's layers also handle)."""
        original = loop.close

        def close() -> None:
            entry = self._clients.pop(loop, None)
            if entry is not None and not loop.is_running():
                loop.run_until_complete(entry.aclose())
            loop.close = original  # type: ignore[method-assign]
            original()

        loop.close = close  # type: ignore[method-assign]

    @property
    def _ttl(self) -> int:
        return max(1, int(self.max_age_seconds))

    async def _evalsha(self, script: AsyncScript, keys: Sequence[str], *args: bytes) -> Any:
        """Run one of the scripts on the pipelined connection; one Redis does not know yet
        (new, restarted, flushed) is loaded, then run again. Scripts are the server's, not a
        connection's: each is loaded once, not on every connect (the sync facade connects
        for each call)."""
        pipe = self._client().pipe
        command = pack(b"EVALSHA", script.sha.encode(), b"%d" % len(keys),
                       *(key.encode() for key in keys), *args)  # fmt: skip
        try:
            return await pipe.execute(command)
        except NoScriptError:
            source = script.script
            text = source.encode() if isinstance(source, str) else bytes(source)
            await pipe.execute(pack(b"SCRIPT", b"LOAD", text))
            return await pipe.execute(command)

    async def open(self, stream_id: str) -> None:
        client = self._client().redis
        meta, log, fail = _keys(stream_id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(meta, log, fail)
            pipe.hset(meta, mapping={"head": 0, "closed": 0, "last_activity": time.time()})
            pipe.expire(meta, OPEN_TTL_SECONDS)
            await pipe.execute()

    async def append(
        self, stream_id: str, chunk_json: str, *, take_failures: bool, publish_to: str = ""
    ) -> AppendResult:
        """Append; when ``publish_to`` names a Redis pub/sub channel (or a group of
        channels_redis's core layer, see ``StreamLayer.group_target``), send the
        ``stream.chunk`` event there in the same round trip."""
        return await self.append_many(stream_id, [chunk_json], take_failures=take_failures,
                                      publish_to=publish_to)  # fmt: skip

    async def append_many(
        self, stream_id: str, chunk_jsons: Sequence[str], *, take_failures: bool,
        publish_to: str = "",
    ) -> AppendResult:  # fmt: skip
        """Append several chunks in one round trip (one script call); ``seq`` is the last."""
        client = self._client()
        result: list[Any] = await self._evalsha(
            client.append, _keys(stream_id),
            repr(time.time()).encode(), b"%d" % self.max_chunks, b"%d" % OPEN_TTL_SECONDS,
            b"1" if take_failures else b"0",
            publish_to.encode(), b"%d" % app_settings.INLINE_CHUNK_BYTES,
            *(chunk.encode() for chunk in chunk_jsons),
        )  # fmt: skip
        status = int(result[0])
        if status == -1:
            raise StreamError(
                GMIErrorCode.RESOURCE_NOT_FOUND,
                f"stream {stream_id!r} does not exist",
                stream_id=stream_id,
            )
        if status == -2:
            reason = _text(result[1])
            raise StreamError(
                GMIErrorCode.STREAM_CLOSED,
                f"stream {stream_id!r} is closed ({reason})",
                stream_id=stream_id,
                details={"reason": reason},
            )
        if status == 0:
            pairs = [_text(v) for v in result[1:]]
            return AppendResult(
                seq=None, failed_clients=dict(zip(pairs[::2], pairs[1::2], strict=True))
            )
        if len(result) > 1 and int(result[1]):  # as channels_redis says it, where it would
            logger.info("stream %s: %d channel(s) over capacity in its group at seq %d",
                        stream_id, int(result[1]), status)  # fmt: skip
        return AppendResult(seq=status)

    async def read_after(self, stream_id: str, after_seq: int, up_to: int | None = None) -> Replay:
        """One round trip for the same read asked by several followers at once (every client
        of a stream in this worker reading a chunk that came by seq)."""
        key = (stream_id, after_seq, up_to)
        pending = self._reads.get(key)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = asyncio.ensure_future(self._read_after(stream_id, after_seq, up_to))
            self._reads[key] = pending

            def forget(done: asyncio.Future[Replay]) -> None:
                if self._reads.get(key) is done:
                    del self._reads[key]

            pending.add_done_callback(forget)
        return await asyncio.shield(pending)

    async def _read_after(self, stream_id: str, after_seq: int, up_to: int | None) -> Replay:
        meta, log, _ = _keys(stream_id)
        end = "+" if up_to is None else f"{up_to}-0"
        cutoff = time.time() - self.max_age_seconds
        start = f"({after_seq}-0".encode()
        reply = await self._evalsha(
            self._client().read, (meta, log), start, end.encode(), repr(cutoff).encode()
        )
        head, flat = json.loads(reply)
        if not isinstance(flat, list):  # Lua's cjson writes an empty table as {}
            flat = []
        return Replay(entries=list(zip(flat[::2], flat[1::2], strict=True)), head_seq=int(head))

    async def close(self, stream_id: str, reason: str) -> Closed | None:
        head, was_open, first_reason = await self._evalsha(
            self._client().close, _keys(stream_id),
            reason.encode(), repr(time.time()).encode(), b"%d" % self._ttl,
        )  # fmt: skip
        if int(head) == -1:
            return None
        return Closed(int(head), bool(int(was_open)), _text(first_reason))

    async def states(self, stream_ids: Iterable[str]) -> dict[str, StreamState]:
        ids = list(stream_ids)
        script = self._client().states
        result = {}
        cutoff = time.time() - self.max_age_seconds
        for start in range(0, len(ids), STATES_BATCH):
            batch = ids[start : start + STATES_BATCH]
            keys = [key for stream_id in batch for key in _keys(stream_id)[:2]]
            reply = json.loads(await self._evalsha(script, keys))
            for stream_id, row in zip(batch, reply, strict=True):
                head, closed, reason, last_activity, closed_at, first_id, first_t = row
                if not head:
                    continue
                head_seq = int(head)
                first_seq = head_seq + 1
                if first_id and float(first_t or 0) >= cutoff:
                    first_seq = int(first_id.split("-")[0])
                result[stream_id] = StreamState(
                    head_seq=head_seq,
                    first_seq=first_seq,
                    closed=closed == "1",
                    close_reason=reason or "",
                    last_activity=float(last_activity or 0),
                    closed_at=float(closed_at or 0),
                )
        return result

    async def record_failure(self, stream_id: str, client_id: str, message: str) -> None:
        client = self._client().redis
        _, _, fail = _keys(stream_id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(fail, client_id, message)
            pipe.expire(fail, OPEN_TTL_SECONDS)
            await pipe.execute()

    async def aclose(self) -> None:
        """Close this event loop's connections (at shutdown)."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry.aclose()

    async def forget(self, stream_id: str) -> None:
        client = self._client().redis
        await client.delete(*_keys(stream_id))

    async def snapshot(self, stream_id: str) -> tuple[int, str] | None:
        client = self._client().redis
        meta, _, _ = _keys(stream_id)
        seq, state = await client.hmget(meta, ["snap_seq", "snap"])
        return (int(seq), _text(state)) if seq is not None and state is not None else None

    async def save_snapshot(self, stream_id: str, seq: int, state_json: str) -> None:
        client = self._client().redis
        meta, _, _ = _keys(stream_id)
        await client.eval(SAVE_SNAPSHOT, 1, meta, seq, state_json)


def _server(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "localhost", parts.port or 6379)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
