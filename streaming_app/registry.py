"""Streams, clients and the global limits, kept in the database so every process agrees.

Each public method is one ``database_sync_to_async`` call; the writes that must not race
(creating a stream at the limit, registering a client at the limit, closing) run in one
transaction behind a lock: a PostgreSQL advisory lock or row lock, and on SQLite the database
write lock (``"transaction_mode": "IMMEDIATE"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from asgiref.sync import AsyncToSync, SyncToAsync
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.db.models import F, Field, Model, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from .exceptions import GMIErrorCode, StreamError
from .history import StreamState
from .models import ClusterLease, Stream, StreamClient, StreamTranscript, StreamWorker
from .transcripts import Transcript

# A client's position as its worker stores it: (written seq, acked seq or None, paused).
Position = tuple[int, int | None, bool]
_POSITION_FIELDS = ("delivered_seq", "acked_seq", "paused", "last_seen_at")

if TYPE_CHECKING:  # channels is untyped; its wrapper has asgiref's signature
    from asgiref.sync import sync_to_async as database_sync_to_async
else:
    from channels.db import database_sync_to_async

T = TypeVar("T")

# Any fixed 64-bit number; names the advisory lock that serialises stream creation.
_CREATE_LOCK_KEY = 0x5354524D


def _column(model: type[Model], name: str) -> str:
    field = model._meta.get_field(name)
    assert isinstance(field, Field) and field.column
    return field.column


def _update_each(model: type[Model], fields: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Set ``fields`` of each row by primary key: one prepared UPDATE run for every row
    (``executemany``), each row being the fields' values then the key, already in the
    database's form. ``bulk_update`` builds a CASE per row and field in Python: 47 ms of CPU
    for 100 rows of 4 fields, 0.9 s for 2,000, all of it holding the GIL the worker's event
    loop needs; this is about 1 ms for 100."""
    if not rows:
        return
    meta, quote = model._meta, connection.ops.quote_name
    columns = ", ".join(f"{quote(_column(model, name))} = %s" for name in fields)
    assert meta.pk is not None
    sql = f"UPDATE {quote(meta.db_table)} SET {columns} WHERE {quote(meta.pk.column)} = %s"
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _locked(rows: QuerySet[StreamClient]) -> QuerySet[StreamClient]:
    """``rows``, locked in primary-key order as they are read (in a transaction, on databases
    with row locks). Every transaction that writes several client rows takes their locks in
    that one order before writing (after its stream's row, when it locks one): two of them, a
    close and a heartbeat say, never wait for each other in a cycle, which PostgreSQL ends by
    failing one ("deadlock detected")."""
    return rows.select_for_update().order_by("pk")


def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _LOCK_STREAM_SQL() -> str:
    return f"SELECT 1 FROM {_table(Stream)} WHERE {_quoted(Stream, 'id')} = %s FOR UPDATE"


def _quoted(model: type[Model], name: str) -> str:
    return connection.ops.quote_name(_column(model, name))


@dataclass(frozen=True)
class _Insert:
    """The conditional INSERT of a client row, built once per database vendor: its SQL
    without and with the limit's condition, the fields its values fill (in order) and the
    prepared values of those whose default is a constant."""

    sql: str
    limited: str
    fields: list[Field[Any, Any]]
    constants: dict[str, Any]


_INSERT_CLIENT: dict[str, _Insert] = {}  # per database vendor


def _insert_client(
    stream_id: str, new: NewClient, limit: float, alive_after: datetime
) -> tuple[str, list[Any]]:
    """The conditional INSERT of a client row: the stream is active, the client is not
    registered yet, and fewer than ``limit`` live clients are (when there is a limit)."""
    db = connections[DEFAULT_DB_ALIAS]  # not the proxy: each of its attributes is a lookup
    insert = _INSERT_CLIENT.get(db.vendor) or _build_insert_client()
    stamp = StreamClient._meta.get_field("connected_at").get_db_prep_save(timezone.now(), db)
    prepared = {**insert.constants, "connected_at": stamp, "last_seen_at": stamp}
    written, acked, paused = new.position
    given = {"stream_id": stream_id, "client_id": new.client_id, "transport": new.transport,
             "channel_name": new.channel_name, "worker_id": new.worker_id,
             "user_id": new.user_id, "delivered_seq": written, "acked_seq": acked,
             "paused": paused}  # fmt: skip
    params = [
        prepared[f.attname] if f.attname in prepared
        else f.get_db_prep_save(given[f.attname] if f.attname in given else f.get_default(), db)
        for f in insert.fields
    ]  # fmt: skip
    params += [stream_id, Stream.Status.ACTIVE.value, stream_id, new.client_id]
    if math.isinf(limit):
        return insert.sql, params
    cutoff = db.ops.adapt_datetimefield_value(alive_after)
    return insert.limited, [*params, stream_id, cutoff, cutoff, int(limit)]


def _build_insert_client() -> _Insert:
    fields = [f for f in StreamClient._meta.concrete_fields if not f.primary_key]
    clients, streams, workers = _table(StreamClient), _table(Stream), _table(StreamWorker)
    c_stream, c_client = _quoted(StreamClient, "stream"), _quoted(StreamClient, "client_id")
    c_worker, c_seen = _quoted(StreamClient, "worker_id"), _quoted(StreamClient, "last_seen_at")
    w_id, w_seen = _quoted(StreamWorker, "id"), _quoted(StreamWorker, "last_seen_at")
    s_id, s_status = _quoted(Stream, "id"), _quoted(Stream, "status")
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    sql = (
        f"INSERT INTO {clients} ({columns}) SELECT {', '.join(['%s'] * len(fields))} "
        f"WHERE EXISTS (SELECT 1 FROM {streams} WHERE {s_id} = %s AND {s_status} = %s) "
        f"AND NOT EXISTS (SELECT 1 FROM {clients} WHERE {c_stream} = %s AND {c_client} = %s)"
    )
    limited = sql + (
        f" AND (SELECT COUNT(*) FROM {clients} WHERE {c_stream} = %s AND ("
        f"{c_worker} IN (SELECT {w_id} FROM {workers} WHERE {w_seen} >= %s) OR ("
        f"{c_worker} NOT IN (SELECT {w_id} FROM {workers}) AND {c_seen} >= %s))) < %s"
    )
    constants = {f.attname: f.get_db_prep_save(f.get_default(), connection) for f in fields
                 if f.has_default() and not callable(f.default)
                 and f.attname not in _POSITION_FIELDS}  # fmt: skip
    insert = _INSERT_CLIENT[connection.vendor] = _Insert(sql, limited, fields, constants)
    return insert


@dataclass(frozen=True)
class _Select:
    """A SELECT the ORM compiled once: its SQL, the fields its columns fill and the database's
    converters of those columns (by position)."""

    sql: str
    attnames: list[str]
    converters: dict[int, tuple[list[Any], Any]]


_STREAM_BY_ID: dict[str, _Select] = {}  # the SELECT of a stream by id, per database vendor


def stream_row(stream_id: str) -> Stream | None:
    """The stream's row, or None (synchronous). The statement is the ORM's, compiled once, and
    its row becomes a model as the ORM makes one (``from_db``, after the column converters):
    compiling it on every subscription cost more than running it, and a ``RawQuerySet``
    (which maps its columns again for each query) cost three times the query."""
    db = connections[DEFAULT_DB_ALIAS]
    select = _STREAM_BY_ID.get(db.vendor)
    if select is None:
        compiler = Stream.objects.filter(pk="").query.get_compiler(connection=db)
        sql, _ = compiler.as_sql()
        columns = [expression for expression, _, _ in compiler.select]
        select = _STREAM_BY_ID[db.vendor] = _Select(
            sql, [column.target.attname for column in columns], compiler.get_converters(columns)
        )
    with db.cursor() as cursor:
        cursor.execute(select.sql, [stream_id])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, (converters, expression) in select.converters.items():
        for convert in converters:
            values[index] = convert(values[index], expression, db)
    return Stream.from_db(db.alias, select.attnames, values)


def _already_registered(stream_id: str, client_id: str) -> StreamError:
    return StreamError(
        GMIErrorCode.RESOURCE_ALREADY_EXISTS,
        f"client {client_id!r} is already registered to stream {stream_id!r}",
        stream_id=stream_id, client_id=client_id,
    )  # fmt: skip


def _closed(stream: Stream, client_id: str) -> StreamError:
    return StreamError(
        GMIErrorCode.STREAM_CLOSED, f"stream {stream.pk!r} is closed ({stream.close_reason})",
        stream_id=stream.pk, client_id=client_id, details={"reason": stream.close_reason},
    )  # fmt: skip


def _refusal(stream_id: str, client_id: str, limit: float, alive_after: datetime) -> NoReturn:
    """Why a client row was not inserted, as the error to raise."""
    stream = Stream.objects.filter(pk=stream_id).first()
    if stream is None:
        raise _not_found(stream_id)
    if not stream.is_active:
        raise _closed(stream, client_id)
    clients = StreamClient.objects.filter(stream_id=stream_id)
    if clients.filter(client_id=client_id).exists():
        raise _already_registered(stream_id, client_id)
    count = clients.filter(alive(alive_after)).count()
    raise StreamError(
        GMIErrorCode.RATE_LIMIT_EXCEEDED,
        f"max_clients_per_stream ({limit:g}) reached for stream {stream_id!r}",
        stream_id=stream_id, client_id=client_id, details={"limit": limit, "clients": count},
    )  # fmt: skip


__all__ = ["Gathered", "Registry", "StreamLimits", "database_sync_to_async", "gathered"]


@dataclass(frozen=True)
class NewStream:
    requested_id: str | None
    owner_id: int | None
    session_hash: str
    gmi_instance_id: str
    persona_id: str
    metadata: dict[str, Any]
    inactivity_timeout_ms: int | None


@dataclass(frozen=True)
class NewClient:
    client_id: str
    transport: str
    channel_name: str
    worker_id: str
    user_id: int | None
    position: Position = (0, None, False)  # as the row starts: the heartbeat has nothing to write


@dataclass(frozen=True)
class ClientRef:
    stream_id: str
    client_id: str
    channel_name: str
    worker_id: str


@dataclass(frozen=True)
class ActiveStream:
    id: str
    inactivity_timeout_ms: int | None
    last_activity_at: datetime


def _not_found(stream_id: str) -> StreamError:
    return StreamError(
        GMIErrorCode.RESOURCE_NOT_FOUND, f"stream {stream_id!r} does not exist", stream_id=stream_id
    )


def alive(cutoff: datetime) -> Q:
    """Client rows not known to be dead: their worker's heartbeat is newer than ``cutoff``, or
    (a worker that has not sent one yet) the row itself is."""
    fresh = StreamWorker.objects.filter(last_seen_at__gte=cutoff).values("id")
    known = StreamWorker.objects.values("id")
    return Q(worker_id__in=fresh) | (~Q(worker_id__in=known) & Q(last_seen_at__gte=cutoff))


@dataclass(frozen=True)
class StreamLimits:
    """What ``create_stream`` enforces: active streams in all, per owner, per anonymous
    session, and streams one owner (or session) may start per minute."""

    total: float
    per_owner: float = math.inf
    per_session: float = math.inf
    per_minute: float = math.inf


def _check_own_limits(new: NewStream, limits: StreamLimits) -> None:
    """Raise RATE_LIMIT_EXCEEDED when the new stream's owner (or anonymous session) is at its
    limit of active streams or of streams started in the last minute. The message and
    details speak of the caller's own streams only."""
    if new.owner_id is not None:
        own, cap, whose = Q(owner_id=new.owner_id), limits.per_owner, "max_streams_per_owner"
    elif new.session_hash:
        own, cap, whose = Q(session_hash=new.session_hash, owner__isnull=True), \
            limits.per_session, "max_streams_per_session"  # fmt: skip
    else:
        return  # a stream of the application's own (a task, a script): the global limit only
    mine = Stream.objects.filter(own)
    active = mine.filter(status=Stream.Status.ACTIVE).count()
    if active >= cap:
        raise StreamError(
            GMIErrorCode.RATE_LIMIT_EXCEEDED,
            f"you have {active} active streams, the most allowed ({cap:g}): wait for one to "
            "end, or cancel one",
            stream_id=new.requested_id,
            details={"limit": whose, "active": active, "max": cap},
        )
    now = timezone.now()
    recent = list(
        mine.filter(created_at__gt=now - timedelta(minutes=1))
        .order_by("created_at")
        .values_list("created_at", flat=True)[: int(min(limits.per_minute, 10**9))]
    )
    if len(recent) >= limits.per_minute:
        retry_after = max(1, math.ceil((recent[0] + timedelta(minutes=1) - now).total_seconds()))
        raise StreamError(
            GMIErrorCode.RATE_LIMIT_EXCEEDED,
            f"you started {len(recent)} streams in the last minute, the most allowed "
            f"({limits.per_minute:g}): try again in {retry_after} s",
            stream_id=new.requested_id,
            details={"limit": "max_new_streams_per_minute", "retry_after": retry_after},
        )


def _lock_for_create() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CREATE_LOCK_KEY])


@dataclass
class _Call:
    run: Callable[[], Any]
    future: asyncio.Future[Any]


def _run_each(runs: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    """Run each call in turn (in the database's thread): its result, or the exception it
    raised, without stopping the others."""
    outcomes: list[tuple[bool, Any]] = []
    for run in runs:
        try:
            outcomes.append((True, run()))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes


class Gathered:
    """Database calls that come together share one trip to the database's thread.

    Each socket that connects or leaves makes one short database call (register, remove),
    and the thread hop costs more than its statements. The calls made while a trip is under
    way wait for it to end, then all go in the next one, each run on its own (its own result
    or exception, in the order made). A call alone goes at once, as before; in a connect
    storm (every browser coming back after a deploy) the hops are shared. A call whose caller
    was cancelled before its trip started is not run. ``trips`` and ``calls`` count them.

    A call whose database work belongs to a thread of its own goes alone, as
    ``database_sync_to_async`` sends it: under ``async_to_sync`` (the calling thread) or in a
    ``ThreadSensitiveContext`` (Django's per-request thread).
    """

    def __init__(self) -> None:
        self.trips = self.calls = 0
        self._waiting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Call]] = (
            weakref.WeakKeyDictionary()
        )
        self._trips: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, run: Callable[[], T]) -> T:
        if getattr(AsyncToSync.executors, "current", None) or (
            SyncToAsync.thread_sensitive_context.get(None)
        ):
            self.trips, self.calls = self.trips + 1, self.calls + 1
            return await database_sync_to_async(run)()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._waiting.setdefault(loop, []).append(_Call(run, future))
        if loop not in self._trips:
            self._trips[loop] = loop.create_task(self._travel(loop))
        return await future

    async def _travel(self, loop: asyncio.AbstractEventLoop) -> None:
        calls: list[_Call] = []
        try:
            while calls := [c for c in self._waiting.pop(loop, []) if not c.future.done()]:
                self.trips, self.calls = self.trips + 1, self.calls + len(calls)
                outcomes = await database_sync_to_async(_run_each)([c.run for c in calls])
                for call, (ok, value) in zip(calls, outcomes, strict=True):
                    if call.future.done():  # its caller was cancelled meanwhile
                        continue
                    if ok:
                        call.future.set_result(value)
                    else:
                        call.future.set_exception(value)
        except BaseException as exc:  # the trip itself failed or was cancelled
            for call in [*calls, *self._waiting.pop(loop, [])]:
                if call.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    call.future.cancel()
                else:
                    call.future.set_exception(exc)
            raise
        finally:
            self._trips.pop(loop, None)


gathered = Gathered()  # the calls of connect storms: users, registrations and removals of clients


def _add_client(
    stream_id: str, new: NewClient, limit: float, alive_after: datetime,
    authorize: Callable[[str], Stream] | None,
) -> None:  # fmt: skip
    """:meth:`Registry.add_client`'s database work (synchronous)."""
    if authorize is not None:
        stream = authorize(stream_id)
        if not stream.is_active:
            raise _closed(stream, new.client_id)
    sql, params = _insert_client(stream_id, new, limit, alive_after)
    db = connections[DEFAULT_DB_ALIAS]
    locks = db.features.has_select_for_update
    try:
        if locks and _one_message():
            with db.cursor() as cursor:
                cursor.execute(f"{_LOCK_STREAM_SQL()}; {sql}", [stream_id, *params])
                cursor.nextset()  # the INSERT's result
                inserted = cursor.rowcount == 1
        else:
            atomic = transaction.atomic() if locks else contextlib.nullcontext()
            with atomic, db.cursor() as cursor:
                if locks:
                    cursor.execute(_LOCK_STREAM_SQL(), [stream_id])
                cursor.execute(sql, params)
                inserted = cursor.rowcount == 1
    except IntegrityError:  # pragma: no cover - the row lock makes this unreachable
        raise _already_registered(stream_id, new.client_id) from None
    if not inserted:
        _refusal(stream_id, new.client_id, limit, alive_after)


def _one_message() -> bool:
    """Whether the row lock and the INSERT can go to the database as one query message:
    PostgreSQL through psycopg 3 with client-side binding (Django's default), in autocommit.
    PostgreSQL runs such a message as one transaction and each statement with a snapshot of
    its own, so the INSERT counts the registration the lock waited for, as after ``BEGIN``,
    the lock and the INSERT, then ``COMMIT``: one round trip instead of four."""
    if connection.vendor != "postgresql":
        return False
    from django.db.backends.postgresql.psycopg_any import is_psycopg3  # type: ignore[import-untyped]

    return (
        is_psycopg3
        and connection.settings_dict["OPTIONS"].get("server_side_binding") is not True
        and not connection.in_atomic_block
        and connection.get_autocommit()
    )


def _beat(worker_id: str) -> None:
    """The worker's row says it is alive now (created if it is new)."""
    StreamWorker.objects.bulk_create(
        [StreamWorker(id=worker_id, last_seen_at=timezone.now())],
        update_conflicts=True, unique_fields=["id"], update_fields=["last_seen_at"],
    )  # fmt: skip


_REMOVE_CLIENT: dict[str, tuple[str, str, str]] = {}  # per database vendor


def _remove_client_sql(db: Any) -> tuple[str, str, str]:
    """The removal's statements (built once per vendor): the one that returns the deleted
    row, and the SELECT and DELETE for databases without ``RETURNING``."""
    table, pk = _table(StreamClient), _quoted(StreamClient, "id")
    found = (f"{table} WHERE {_quoted(StreamClient, 'stream')} = %s "
             f"AND {_quoted(StreamClient, 'client_id')} = %s")  # fmt: skip
    returned = f"{_quoted(StreamClient, 'channel_name')}, {_quoted(StreamClient, 'worker_id')}"
    sql = _REMOVE_CLIENT[db.vendor] = (
        f"DELETE FROM {found} RETURNING {returned}",
        f"SELECT {pk}, {returned} FROM {found}",
        f"DELETE FROM {table} WHERE {pk} = %s",
    )
    return sql


def _deletes_returning(db: Any) -> bool:
    """Whether a DELETE can return the deleted rows (databases that return inserted ones
    return deleted ones too: PostgreSQL, SQLite 3.35+, MariaDB 10.5+)."""
    return bool(db.features.can_return_columns_from_insert)


def _remove_client(stream_id: str, client_id: str) -> ClientRef | None:
    """:meth:`Registry.remove_client`'s database work (synchronous): one ``DELETE ...
    RETURNING`` where the database has it (PostgreSQL, SQLite 3.35+), else a SELECT and a
    DELETE by primary key."""
    db = connections[DEFAULT_DB_ALIAS]
    returning, select, delete = _REMOVE_CLIENT.get(db.vendor) or _remove_client_sql(db)
    with db.cursor() as cursor:
        if _deletes_returning(db):
            cursor.execute(returning, [stream_id, client_id])
            row = cursor.fetchone()
            return None if row is None else ClientRef(stream_id, client_id, row[0], row[1])
        cursor.execute(select, [stream_id, client_id])
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(delete, [row[0]])
        if cursor.rowcount != 1:  # another worker removed it meanwhile
            return None
    return ClientRef(stream_id, client_id, row[1], row[2])


class Registry:
    """The database side of the manager: no method is called per chunk."""

    @database_sync_to_async
    def create_stream(self, new: NewStream, *, limits: StreamLimits) -> str:
        """Insert an active stream unless a limit is reached; its id.

        The global limit, then the owner's (or the anonymous session's) active streams and
        streams started in the last minute, all counted under the one create lock.
        """
        with transaction.atomic():
            _lock_for_create()
            if Stream.objects.filter(status=Stream.Status.ACTIVE).count() >= limits.total:
                # Nothing about other users' streams: no count, no owners.
                raise StreamError(
                    GMIErrorCode.RATE_LIMIT_EXCEEDED,
                    "max_concurrent_streams reached: no new stream can start now, try again "
                    "in a moment",
                    stream_id=new.requested_id,
                    details={"limit": "max_concurrent_streams", "retry_after": 5},
                )
            _check_own_limits(new, limits)
            fields = {
                "owner_id": new.owner_id,
                "session_hash": new.session_hash,
                "gmi_instance_id": new.gmi_instance_id,
                "persona_id": new.persona_id,
                "metadata": new.metadata,
                "inactivity_timeout_ms": new.inactivity_timeout_ms,
            }
            if new.requested_id is not None:
                if Stream.objects.filter(pk=new.requested_id).exists():
                    raise StreamError(
                        GMIErrorCode.RESOURCE_ALREADY_EXISTS,
                        f"stream {new.requested_id!r} already exists",
                        stream_id=new.requested_id,
                    )
                return Stream.objects.create(id=new.requested_id, **fields).id
            while True:  # a clash of generated ids just draws another one
                stream_id = uuid.uuid4().hex
                if not Stream.objects.filter(pk=stream_id).exists():
                    return Stream.objects.create(id=stream_id, **fields).id

    @database_sync_to_async
    def delete_stream(self, stream_id: str) -> None:
        with transaction.atomic():  # the stream's row, then its clients', as a close does
            list(Stream.objects.select_for_update().filter(pk=stream_id).values_list("pk"))
            list(_locked(StreamClient.objects.filter(stream_id=stream_id)).values_list("pk"))
            Stream.objects.filter(pk=stream_id).delete()

    @database_sync_to_async
    def get_stream(self, stream_id: str) -> Stream:
        """The stream's row; raises ``StreamError(RESOURCE_NOT_FOUND)``."""
        try:
            return Stream.objects.select_related("owner").get(pk=stream_id)
        except Stream.DoesNotExist:
            raise _not_found(stream_id) from None

    async def add_client(
        self, stream_id: str, new: NewClient, *, limit: float, alive_after: datetime,
        authorize: Callable[[str], Stream] | None = None,
    ) -> None:  # fmt: skip
        """Insert a client row unless the stream is unknown, closed, full or has it already.

        Clients of workers known to be dead (no heartbeat since ``alive_after``) do not count.
        One conditional INSERT does it (every condition in its WHERE); on PostgreSQL it runs
        after a lock on the stream's row, so that concurrent registrations count each other.
        Only a refused registration reads more, to say why. ``authorize`` (the stream's id ->
        its row, or it raises) runs first, in the same call. Registrations made together share
        a trip to the database's thread (:class:`Gathered`).
        """
        await gathered(lambda: _add_client(stream_id, new, limit, alive_after, authorize))

    async def remove_client(self, stream_id: str, client_id: str) -> ClientRef | None:
        """Delete a client row; what it was, or None when there was none. One plain statement
        where the database returns deleted rows, else two (every socket that leaves runs
        this): the ORM's delete collects related rows first.
        Removals made together share a trip to the database's thread (:class:`Gathered`)."""
        return await gathered(lambda: _remove_client(stream_id, client_id))

    @database_sync_to_async
    def stream_exists(self, stream_id: str) -> bool:
        return Stream.objects.filter(pk=stream_id).exists()

    @database_sync_to_async
    def close_stream(
        self, stream_id: str, reason: str, transcript: Transcript | None = None
    ) -> list[ClientRef] | None:
        """Mark the stream closed, save its transcript with it, drop its clients; None if it
        was closed already (its transcript was saved then)."""
        with transaction.atomic():
            updated = Stream.objects.filter(pk=stream_id, status=Stream.Status.ACTIVE).update(
                status=Stream.Status.CLOSED, closed_at=timezone.now(), close_reason=reason
            )
            if not updated:
                if not Stream.objects.filter(pk=stream_id).exists():
                    raise _not_found(stream_id)
                return None
            if transcript is not None:
                data = transcript.to_dict()
                columns = ("text", "first_seq", "last_seq", "complete", "history_lost")
                fields = {key: data.pop(key) for key in columns}
                StreamTranscript.objects.update_or_create(
                    stream_id=stream_id, defaults={**fields, "data": data, "close_reason": reason}
                )
            rows = StreamClient.objects.filter(stream_id=stream_id)
            refs = [
                ClientRef(stream_id, c.client_id, c.channel_name, c.worker_id)
                for c in _locked(rows).only("client_id", "channel_name", "worker_id")
            ]
            rows.delete()
            return refs

    @database_sync_to_async
    def record_activity(self, states: dict[str, StreamState]) -> None:
        """Copy chunk counts and last activity from the history onto the rows (one prepared
        UPDATE, run per stream)."""
        adapt = connection.ops.adapt_datetimefield_value
        rows = [
            (state.head_seq, adapt(datetime.fromtimestamp(state.last_activity, tz=UTC)), stream_id)
            for stream_id, state in states.items()
        ]
        _update_each(Stream, ("chunk_count", "last_activity_at"), rows)

    @database_sync_to_async
    def acquire_lease(self, name: str, holder: str, ttl: timedelta) -> bool:
        """Take or renew the lease ``name`` for ``ttl``; whether ``holder`` has it. One
        statement when it is renewed or held by another: a conditional UPDATE, atomic on
        every database."""
        now = timezone.now()
        taken = ClusterLease.objects.filter(
            Q(holder=holder) | Q(expires_at__lt=now), name=name
        ).update(holder=holder, expires_at=now + ttl)
        if taken:
            return True
        try:
            with transaction.atomic():
                ClusterLease.objects.create(name=name, holder=holder, expires_at=now + ttl)
        except IntegrityError:  # it exists and another worker holds it
            return False
        return True

    @database_sync_to_async
    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (a worker stopping): another takes it at its next pass."""
        ClusterLease.objects.filter(name=name, holder=holder).delete()

    @database_sync_to_async
    def activity(self, stream_ids: list[str]) -> dict[str, tuple[int, datetime]]:
        """Chunk count and last activity as the rows have them (copied by the sweeper)."""
        rows = Stream.objects.filter(pk__in=stream_ids).values_list(
            "pk", "chunk_count", "last_activity_at"
        )
        return {pk: (count, last) for pk, count, last in rows}

    @database_sync_to_async
    def active_stream_ids(self) -> list[str]:
        return list(
            Stream.objects.filter(status=Stream.Status.ACTIVE)
            .order_by("created_at")
            .values_list("id", flat=True)
        )

    @database_sync_to_async
    def active_streams(self) -> list[ActiveStream]:
        return [
            ActiveStream(*row)
            for row in Stream.objects.filter(status=Stream.Status.ACTIVE).values_list(
                "id", "inactivity_timeout_ms", "last_activity_at"
            )
        ]

    @database_sync_to_async
    def client_count(self, stream_id: str) -> int:
        """Clients registered to a stream (0 once closed); raises if the stream is unknown."""
        if not Stream.objects.filter(pk=stream_id).exists():
            raise _not_found(stream_id)
        return StreamClient.objects.filter(stream_id=stream_id).count()

    @database_sync_to_async
    def read_seqs(self, stream_id: str) -> dict[str, int]:
        """What each client read (its ack, else what was written to it) as of its worker's
        last heartbeat."""
        rows = StreamClient.objects.filter(stream_id=stream_id)
        read = Coalesce("acked_seq", "delivered_seq")
        return dict(rows.annotate(read=read).values_list("client_id", "read"))

    @database_sync_to_async
    def add_send_failure(self, stream_id: str, client_id: str) -> None:
        StreamClient.objects.filter(stream_id=stream_id, client_id=client_id).update(
            send_failures=F("send_failures") + 1
        )

    @database_sync_to_async
    def heartbeat(
        self,
        worker_id: str,
        held: set[tuple[str, str]],
        positions: dict[tuple[str, str], Position],
        held_at: datetime,
        *,
        read_rows: bool = True,
    ) -> set[tuple[str, str]]:
        """Mark the worker alive, store clients' positions, delete its rows for clients it
        does not hold; the held clients of active streams whose rows are gone (another worker
        reaped them).

        Without ``read_rows`` and with no position to store (an idle worker), its rows are
        counted first: as many as it holds, and only its own row is written (two statements,
        however many clients). A row it does not hold, or one gone, changes the count and the
        rows are read as always. (A row gone and one left behind in the same pass would cancel
        out: the caller reads the rows every few passes anyway.)"""
        with transaction.atomic():
            if not positions and not read_rows:
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"SELECT COUNT(*) FROM {_table(StreamClient)} "
                        f"WHERE {_quoted(StreamClient, 'worker_id')} = %s",
                        [worker_id],
                    )
                    (count,) = cursor.fetchone()
                if count == len(held):
                    _beat(worker_id)
                    return set()
            with connection.cursor() as cursor:  # every row of this worker
                cursor.execute(
                    f"SELECT {_quoted(StreamClient, 'id')}, {_quoted(StreamClient, 'stream')}, "
                    f"{_quoted(StreamClient, 'client_id')} FROM {_table(StreamClient)} "
                    f"WHERE {_quoted(StreamClient, 'worker_id')} = %s",
                    [worker_id],
                )
                present = {(s, c): pk for pk, s, c in cursor.fetchall()}
            stale = [pk for key, pk in present.items() if key not in held]
            now = connection.ops.adapt_datetimefield_value(timezone.now())
            moved = [
                (written, acked, paused, now, present[key])
                for key, (written, acked, paused) in positions.items()
                if key in present
            ]
            if (stale or moved) and connection.features.has_select_for_update:
                touched = StreamClient.objects.filter(pk__in=[*stale, *(r[-1] for r in moved)])
                list(_locked(touched).values_list("pk"))
            if stale:  # a row newer than the list of held clients may be a registration under way
                StreamClient.objects.filter(pk__in=stale, connected_at__lt=held_at).delete()
            _update_each(StreamClient, _POSITION_FIELDS, moved)
            missing = held - set(present)
            if missing:  # a closed stream's rows went with the close: not lost, closing
                active = set(
                    Stream.objects.filter(
                        pk__in={stream_id for stream_id, _ in missing}, status=Stream.Status.ACTIVE
                    ).values_list("pk", flat=True)
                )
                missing = {key for key in missing if key[0] in active}
            _beat(worker_id)  # last: as fresh as it can be when the transaction commits
        return missing

    @database_sync_to_async
    def reap_dead_clients(
        self, older_than: timedelta, *, alive_worker: str, dry_run: bool = False
    ) -> list[ClientRef]:
        """Delete clients of workers that stopped sending heartbeats (and those workers' rows);
        what was (or would be) removed. ``alive_worker`` (the caller's) is alive whatever its
        row says: it is running this."""
        cutoff = timezone.now() - older_than
        with transaction.atomic():
            rows = StreamClient.objects.exclude(alive(cutoff)).exclude(worker_id=alive_worker)
            refs = [
                ClientRef(c.stream_id, c.client_id, c.channel_name, c.worker_id)
                for c in _locked(rows)
            ]
            if not dry_run:
                rows.delete()
                StreamWorker.objects.filter(last_seen_at__lt=cutoff).exclude(
                    pk=alive_worker
                ).delete()
        return refs

    @database_sync_to_async
    def remove_worker(self, worker_id: str) -> list[ClientRef]:
        """Delete every client served by one worker, and the worker (its graceful stop)."""
        with transaction.atomic():
            rows = StreamClient.objects.filter(worker_id=worker_id)
            refs = [
                ClientRef(c.stream_id, c.client_id, c.channel_name, c.worker_id)
                for c in _locked(rows)
            ]
            rows.delete()
            StreamWorker.objects.filter(pk=worker_id).delete()
            ClusterLease.objects.filter(holder=worker_id).delete()  # another takes over
        return refs
