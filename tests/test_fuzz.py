"""Fuzzing a live worker: garbage in, a clean refusal out, and the stream goes on untouched.

One Daphne worker on Redis; one stream; an observer socket follows it while a producer process
pushes text chunks. Meanwhile well over 1,000 generated inputs (seeded, so every run throws the
same ones) hit the same worker:

* client frames on sockets subscribed to that stream: binary, random bytes, invalid UTF-8,
  deep nesting, huge numbers, wrong types, fragments, oversize frames (never a ``cancel``,
  which would end the stream);
* WebSocket paths: long, traversal, NUL, unicode and empty ids, odd ``last_seq`` values, odd
  ``Origin`` headers;
* SSE requests with odd ``Last-Event-ID`` headers, ``last_seq`` queries, ids, methods, hosts,
  and malformed HTTP.

Each must be answered (within a timeout) by an ``error`` frame, a close code or an HTTP 4xx,
never a 5xx, a 1011, a 4500 or silence; no client stays registered; the observer (and every
frame-fuzzing socket) gets every chunk once and in order, then ``closed``; the worker's log has
no traceback and no ERROR, and every line in it was started by a logger, not by a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import string
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streaming_app.protocol import CloseCode

from .servers import DaphneServer, manager_call, read_frames, start_python, with_settings

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent

SEED = 20_240_610
MAX_SEQ = 2**63 - 1
FRAME_LIMIT = 4096  # MAX_CLIENT_FRAME_BYTES (the default): above it, error frame and 4413
DAPHNE_MAX_MESSAGE = 1024 * 1024  # Daphne's --websocket_max_message_size: above it, 1009
ANSWER_TIMEOUT = 15.0  # seconds for any one answer: past it, the input counts as unanswered
CONCURRENCY = 50  # fresh connections in flight at once
POOL_SOCKETS = 10  # long-lived subscribed sockets that each take a share of the frames
MIN_CHUNKS = 200  # the producer pushes at least this many, and goes on until the fuzz ends

# What counts as an answer, besides the app's own error frames, 4xxx close codes (the README's
# protocol table) and HTTP 4xx:
# * A text frame that is not UTF-8 (RFC 6455 8.1) and a message above Daphne's 1 MiB limit
#   never reach the app: autobahn fails the connection. It would say 1007 / 1009, but Daphne
#   keeps autobahn's default failByDrop=True, so it drops the TCP connection at once instead:
#   the client sees 1006 (no close frame). Either is accepted for those inputs only; a hang is
#   not (every wait has ANSWER_TIMEOUT).
# * A request line or header line above Twisted's LineReceiver.MAX_LENGTH (16 KiB) is dropped
#   by Twisted's HTTP server before Daphne sees it, without a status line. Accepted for those
#   inputs only (``None`` in their statuses); shorter odd requests must get a status.
# * After its answer the server closes; autobahn then waits 1 s (closeHandshakeTimeout, not set
#   by Daphne) for the client's close frame and otherwise aborts the line (RST). On a loaded
#   machine that happens: the client sees 1006 after the error frame (taken as the close code
#   that error goes with, ERROR_CLOSES), and at worst the RST discards what it had not read
#   yet, the handshake response too. An input that got no answer at all is therefore sent
#   once more (Fuzz.connect_answered, listed in the summary); it must be answered then.
# Never an answer: 1011 or 4500 (a bug), 4503 (the backend under a load this small), HTTP 5xx,
# a 200 for garbage, 1006 or a dropped line elsewhere, or nothing within ANSWER_TIMEOUT.
DROPPED = 1006  # the close code a client sees when the server drops the line
TWISTED_LINE_LIMIT = 16384
ERROR_CLOSES = {"frame_too_big": 4413, "INVALID_ARGUMENT": 4400, "RESOURCE_NOT_FOUND": 4404}

PRODUCER = """
import asyncio, os
from streaming_app.chunks import TextDeltaChunk
from streaming_app.manager import get_streaming_manager

async def main():
    m = get_streaming_manager()
    seq = 0
    while seq < {minimum} or not os.path.exists({stop!r}):
        chunk = TextDeltaChunk(stream_id={sid!r}, text_delta=f"chunk {{seq + 1}}")
        seq = await m.push_chunk({sid!r}, chunk)
        await asyncio.sleep(0.01)
    print(f"PUSHED={{seq}}", flush=True)

asyncio.run(main())
"""

COUNT = """
for _ in range(50):
    out = await m.get_client_count_for_stream({sid!r})
    if out == {want}:
        break
    await asyncio.sleep(0.2)
"""

# Lines of the worker's log that mean something went wrong while it was being fuzzed: logged
# at ERROR or above, a traceback, Daphne killing or failing an application instance.
BAD_LOG_LINES = re.compile(
    r"^(\S+ \S+ (ERROR|CRITICAL) |Traceback )|took too long to shut down|Unhandled error|"
    r"Exception inside application"
)
# How every line of the worker's log starts: the logging format of streaming_app and Daphne,
# Daphne's access log, and Django's console handler (message only; it escapes control
# characters). Anything else was written by a client: a newline in an id or header that starts
# a line of its own (a forged ERROR or Traceback, or a real one hidden).
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"|\S+ - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\] "
    r"|Not Found: "
)


@dataclass
class Outcome:
    """What one connection was answered: an HTTP status (handshake refused), the frames and
    the close code, or why there was no answer."""

    status: int | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    failure: str | None = None

    def __str__(self) -> str:
        if self.failure is not None:
            return f"no answer: {self.failure}"
        if self.status is not None:
            return f"HTTP {self.status}"
        shown = [f for f in self.frames if f.get("type") != "chunk"]
        chunks = len(self.frames) - len(shown)
        return f"close {self.close_code} after {chunks} chunk(s) and {shown}"


class Fuzz:
    """The live worker, the stream, the tally of inputs and the answers that were wrong."""

    def __init__(self, server: DaphneServer, stream_id: str) -> None:
        self.server = server
        self.stream_id = stream_id
        self.problems: list[str] = []
        self.retried: list[str] = []
        self.counts: Counter[str] = Counter()
        self.limit = asyncio.Semaphore(CONCURRENCY)

    def wrong(self, kind: str, sent: object, answer: object) -> None:
        self.problems.append(f"{kind}: {shorten(sent)} -> {shorten(answer)}")

    def url(self, path: str) -> str:
        return self.server.ws_url + path

    async def connect(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        action: Callable[[Any], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Open ``path``; with ``action``, run it once subscribed. Everything received until
        the server closes."""
        if headers is None:
            headers = {"Origin": self.server.http_url}
        outcome = Outcome()
        async with self.limit:
            try:
                async with (
                    asyncio.timeout(ANSWER_TIMEOUT),
                    websockets.connect(
                        self.url(path), additional_headers=headers, max_size=None,
                        open_timeout=ANSWER_TIMEOUT, close_timeout=ANSWER_TIMEOUT,
                    ) as ws,
                ):  # fmt: skip
                    if action is not None:
                        try:
                            outcome.frames.append(json.loads(await ws.recv()))
                            if outcome.frames[0].get("type") == "subscribed":
                                await action(ws)
                        except ConnectionClosed:
                            pass  # refused or closed while sending: the frames say why
                    outcome.frames += await read_frames(ws)
                    outcome.close_code = ws.close_code
            except InvalidStatus as exc:
                outcome.status = int(exc.response.status_code)
            except (TimeoutError, OSError, InvalidHandshake, ValueError) as exc:
                cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
                outcome.failure = f"{type(exc).__name__}: {exc}{cause}"
        return outcome

    async def connect_answered(
        self, kind: str, path: str, *, may_drop: bool = False, **options: Any
    ) -> Outcome:
        """:meth:`connect`, and once more when the server dropped the line before any answer
        (autobahn's closing-handshake abort, see ERROR_CLOSES), unless ``may_drop``."""
        outcome = await self.connect(path, **options)
        if not may_drop and unanswered(outcome):
            self.retried.append(f"{kind} {shorten(path, 80)}: {outcome}")
            outcome = await self.connect(path, **options)
        return outcome

    async def http(self, request: bytes) -> tuple[int | None, bytes, str | None]:
        """Send one raw HTTP request; the status, the head of the body, or why none came."""
        async with self.limit:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
                    writer.write(request)
                    await writer.drain()
                    line = await reader.readline()
                    match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
                    if match is None:
                        return None, b"", f"no status line: {line[:200]!r}"
                    status = int(match.group(1))
                    while (await reader.readline()).strip():  # the headers
                        pass
                    body = b"" if status == 200 else await reader.read(2000)
                    return status, body, None
            except (TimeoutError, OSError) as exc:
                return None, b"", f"{type(exc).__name__}: {exc}"
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()


def unanswered(outcome: Outcome) -> bool:
    """The line was dropped before the handshake response or any error frame."""
    if "InvalidMessage" in (outcome.failure or ""):
        return True
    errors = [f for f in outcome.frames if f.get("type") == "error"]
    return outcome.close_code == DROPPED and not errors


def close_code(outcome: Outcome) -> int | None:
    """The close code; for a line dropped after the error frame (autobahn's closing-handshake
    abort), the code that error goes with."""
    last = outcome.frames[-1] if outcome.frames else {}
    if outcome.close_code == DROPPED and last.get("type") == "error":
        return ERROR_CLOSES.get(str(last.get("code")), DROPPED)
    return outcome.close_code


def shorten(value: object, limit: int = 240) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def check_chunks(frames: list[dict[str, Any]], after: int) -> str | None:
    """None when the chunk frames are seq ``after``+1, +2, ... each with its own text."""
    seqs = [f["seq"] for f in frames if f.get("type") == "chunk"]
    if seqs != list(range(after + 1, after + 1 + len(seqs))):
        return f"chunks out of order after {after}: {seqs}"
    texts = [f["chunk"]["text_delta"] for f in frames if f.get("type") == "chunk"]
    if texts != [f"chunk {seq}" for seq in seqs]:
        return f"chunk texts do not match their seqs: {texts}"
    return None


# -- generated inputs --------------------------------------------------------------------------


def random_text(rng: random.Random, length: int) -> str:
    """Any Unicode but surrogates (a text frame must be UTF-8), weighted to odd characters."""
    pools = [
        string.printable,
        "\x00\x01\x1f\x7f\u0085\u00a0\u2028\u2029\u202e\ufeff\ufffd",
        '{}[]":,\\0123456789eE+-.',
    ]
    out = []
    for _ in range(length):
        pick = rng.random()
        if pick < 0.6:
            out.append(rng.choice(rng.choice(pools)))
        else:
            code = rng.randrange(0x110000)
            out.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd")
    return "".join(out)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, MAX_SEQ, MAX_SEQ + 1, -(2**64), 10**400, rng.getrandbits(256)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 5e-324, float("inf"), float("-inf"), float("nan")])
    if kind in (4, 5):
        return random_text(rng, rng.randrange(0, 40))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {random_text(rng, rng.randrange(0, 8)): random_json(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}  # fmt: skip


def is_cancel(payload: str) -> bool:
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "cancel"


def is_ping(payload: str | bytes) -> bool:
    """What the server must answer with ``pong``: a text frame holding a JSON object whose
    ``type`` is ``"ping"``. Everything else that fits is ``bad_frame``."""
    if isinstance(payload, bytes):
        return False
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "ping"


Payload = str | bytes | list[str] | list[bytes]  # a list is sent as a fragmented message


def joined(payload: Payload) -> str | bytes:
    if isinstance(payload, list):
        return "".join(payload) if isinstance(payload[0], str) else b"".join(payload)  # type: ignore[arg-type]
    return payload


def size(payload: Payload) -> int:
    whole = joined(payload)
    return len(whole.encode() if isinstance(whole, str) else whole)


def small_frames(rng: random.Random, count: int) -> list[Payload]:
    """Frames within MAX_CLIENT_FRAME_BYTES, never a cancel: each keeps its socket open."""
    fixed: list[Payload] = [
        "", b"", "null", "[]", "{}", '""', "ping", '"ping"', '["ping"]', "0", "-0", "1e999",
        "NaN", "Infinity", "-Infinity", '{"type": "PING"}', '{"type": "ping "}',
        '{"type": " ping"}', '{"Type": "ping"}', '{"type": null}', '{"type": 1}',
        '{"type": 1e999}', '{"type": true}', '{"type": ["ping"]}', '{"type": {"type": "ping"}}',
        '{"type": "pong"}', '{"type": "subscribe"}', '{"type": "chunk", "seq": 1}',
        '{"type": "close"}', '{"type": "cancel\\u0000"}', '{"type": "c\\u0430ncel"}',
        '{"type": "\\ud800"}', '{"type": "\\udfff\\ud800"}', '{"type": "ping\\u0000"}',
        '{"type": "\u202eping"}', '{"type": "ping", "n": 1e999}', '{"type": "ping", "n": -1e999}',
        '{"type": "ping", "n": ' + "9" * 4000 + "}", '{"n": ' + str(10**400) + "}",
        '{"n": -' + "1" * 4000 + "}", '{"n": 1' + "0" * 4000 + ".5e-99999}",
        '{"type": "ping", "type": "pong"}', '{"type": "ping"', '{"type": "ping"}}',
        '{"type": "ping"} {"type": "ping"}', "{'type': 'ping'}", '{"type": "ping",}',
        "\ufeff" + '{"type": "ping"}', '{"type": "ping"}\x00', "\x00", "[" * 2040 + "]" * 2040,
        "[" * 4096, "]" * 4096, '{"a":' * 680 + "1" + "}" * 680, '{"a":' * 800,
        '"' + "\\u0000" * 680 + '"', '"\\', "\\", '"\\x41"', '"\\uZZZZ"', "\u0000" * 4096,
        "😀" * 1024, "x" * FRAME_LIMIT, '{"type":"ping","pad":"' + "x" * 4072 + '"}',
        b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
        b'{"type": "ping"}', b'{"type": "cancel"}', b"\x00" * FRAME_LIMIT,
        ['{"type":', ' "ping"}'], ['{"type": "pi', "", 'ng"}'], ["[" * 1000, "]" * 1000],
        [b'{"type": ', b'"ping"}'], [b"\xe2\x82", b"\xac"], [b"\xff"] * 64,
    ]  # fmt: skip
    assert all(size(f) <= FRAME_LIMIT for f in fixed), [size(f) for f in fixed]
    frames: list[Payload] = list(fixed)
    while len(frames) < count:
        frame: Payload
        kind = rng.randrange(8)
        if kind == 0:  # random bytes as a binary frame
            frame = rng.randbytes(rng.choice([1, 2, 3, 16, 255, 1000, FRAME_LIMIT]))
        elif kind == 1:  # random JSON
            frame = json.dumps(random_json(rng), ensure_ascii=rng.random() < 0.5)
        elif kind == 2:  # a wrong "type"
            wrong = random_json(rng, 3)
            frame = json.dumps({"type": wrong, **({"x": random_json(rng, 3)}
                                                  if rng.random() < 0.5 else {})})  # fmt: skip
        elif kind == 3:  # random text, mostly not JSON
            frame = random_text(rng, rng.randrange(1, 200))
        elif kind == 4:  # a valid frame, truncated or with a byte changed
            text = json.dumps({"type": "ping", "x": random_json(rng, 2)})
            cut = rng.randrange(len(text))
            changed = text[:cut] + random_text(rng, 1) + text[cut + 1 :]
            frame = text[:cut] if rng.random() < 0.5 else changed
        elif kind == 5:  # nesting just inside the limit, balanced or not
            depth = rng.randrange(1, 2048)
            opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")])
            depth = min(depth, FRAME_LIMIT // (len(opener) + len(closer)) - 1)
            frame = opener * depth + "0" + closer * rng.choice([depth, depth - 1, 0])
        elif kind == 6:  # huge numbers
            digits = "".join(rng.choice(string.digits) for _ in range(rng.randrange(1, 4000)))
            shapes = ['{"type": "ping", "n": %s}', "%s", '{"type": %s}', "[%s]",
                      "%se999999", "-%s.%se-99"]  # fmt: skip
            frame = rng.choice(shapes).replace("%s", digits)
        else:  # a ping, fragmented
            text = json.dumps({"type": "ping", "x": random_json(rng, 2)})
            cuts = sorted(rng.sample(range(len(text) + 1), 2))
            frame = [text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :]]
        if size(frame) > FRAME_LIMIT:
            continue
        if isinstance(joined(frame), str) and is_cancel(str(joined(frame))):
            continue  # a cancel ends the stream for everyone: not here
        frames.append(frame)
    return frames


def closing_frames(rng: random.Random, count: int) -> list[tuple[Payload, bool, set[int]]]:
    """Frames that end their socket: ``(payload, sent as text, the close codes expected)``.
    Over MAX_CLIENT_FRAME_BYTES: the app's error frame and 4413; over Daphne's 1 MiB, and a
    text frame that is not UTF-8: autobahn's 1009 / 1007 or its drop (see DROPPED)."""
    too_big = {int(CloseCode.MESSAGE_TOO_BIG)}
    too_long, not_utf8 = {1009, DROPPED}, {1007, DROPPED}  # autobahn's, before the app
    fixed: list[tuple[Payload, bool, set[int]]] = [
        ("x" * (FRAME_LIMIT + 1), True, too_big),
        ('{"type":"ping","pad":"' + "x" * 4075 + '"}', True, too_big),
        ("😀" * 1025, True, too_big),
        ("[" * 10_000 + "]" * 10_000, True, too_big),
        ('{"a":' * 10_000 + "1" + "}" * 10_000, True, too_big),
        ('{"type": "ping", "n": ' + "9" * 5000 + "}", True, too_big),
        ("1" + "0" * 5000, True, too_big),  # 10**5000
        ('{"type": "ping", "n": 1' + "0" * 400_000 + "}", True, too_big),
        (b"\x00" * (FRAME_LIMIT + 1), False, too_big),
        (rng.randbytes(1_000_000), False, too_big),
        (["[" * 3000, "]" * 3000], True, too_big),
        ("x" * DAPHNE_MAX_MESSAGE, True, too_big),
        ("x" * (DAPHNE_MAX_MESSAGE + 1), True, too_long),
        (rng.randbytes(2 * DAPHNE_MAX_MESSAGE), False, too_long),
        (b"\xff", True, not_utf8),
        (b"\xc3\x28", True, not_utf8),
        (b"\xc0\xaf", True, not_utf8),
        (b"\xed\xa0\x80", True, not_utf8),  # an encoded surrogate
        (b"\xf4\x90\x80\x80", True, not_utf8),  # above U+10FFFF
        (b'{"type": "ping\xff"}', True, not_utf8),
        (b'{"type": "cancel\xe2\x82"}', True, not_utf8),
    ]  # fmt: skip
    frames = list(fixed)
    while len(frames) < count:
        kind = rng.randrange(3)
        if kind == 0:
            payload: Payload = random_text(rng, rng.randrange(FRAME_LIMIT + 1, 3 * FRAME_LIMIT))
            if size(payload) > FRAME_LIMIT:
                frames.append((payload, True, too_big))
        elif kind == 1:
            frames.append((rng.randbytes(rng.randrange(FRAME_LIMIT + 1, 20_000)), False, too_big))
        else:
            data = rng.randbytes(rng.randrange(1, 300))
            try:
                data.decode()
            except UnicodeDecodeError:
                frames.append((data, True, not_utf8))
    return frames


def odd_values(rng: random.Random, count: int) -> list[str]:
    """Raw (already encoded) ``last_seq`` values that are never an integer in 0..2**63-1."""
    fixed = [
        "-1", "-0", "1e3", "1E3", "1.0", "0.5", "99999999999999999999", str(MAX_SEQ + 1),
        str(2**64), "9" * 400, "abc", "%00", "1%00", "%001", "0x10", "0b1", "0o7", "1_000",
        "%2B-1", "-%2B1", "%EF%BC%91", "%C2%B2", "%D9%A1", "%ff", "%fe%ff", "%", "%zz", "%2",
        "NaN", "inf", "-inf", "null", "true", "[]", "{}", "%5B1%5D", "1,2", "1;2", "1/2", "1%2F2",
        "%E2%80%AE1", "1%C2%A0x", "%27%20OR%201%3D1", "..%2F..%2Fetc", "%u0031", "%%31",
        "1" * 5000, "-" + "9" * 30, "=1", "1=", "%3D1",
    ]  # fmt: skip
    values = list(fixed)
    while len(values) < count:
        text = random_text(rng, rng.randrange(1, 30))
        if not re.search(r"[^\d\s]", text):  # make sure it is not a number
            text += rng.choice("-.ex\x00")
        values.append(urllib.parse.quote(text, safe=""))
    return values


def odd_ids(rng: random.Random, real: str, count: int) -> list[str]:
    """Path segments (URL-encoded as sent) that name no stream."""
    fixed = [
        "", "x" * 65, "x" * 300, "x" * 5000, "a" * 7000, "..", ".", "...", "%2e%2e", "%2E%2E%2F",
        "..%2F..%2Fetc%2Fpasswd", "..%2F..%2Fadmin", "%2e%2e%2f%2e%2e%2fetc", "..%5C..%5Cwindows",
        "%00", "a%00b", f"{real}%00", f"%00{real}", "%ff", "%c0%af", "%", "%zz", "%u002e",
        "%C3%BC", "%E6%B5%81", "%F0%9F%92%A5" * 10, "%E2%80%AE", "%EF%BB%BF", f"{real}x",
        f"x{real}", f"{real}%20", f"%20{real}", f"{real}%0A", f"{real}%09", "%2F", f"{real}%2F",
        f"{real}%2F..", ";", "a;b", "*", "%2A", "null", "undefined", "NaN", "0", "-1",
        "%3Cscript%3E", "%27%3B%20DROP%20TABLE%20streaming_app_stream%3B--", "%7B%7B7*7%7D%7D",
        "%24%7Bjndi%3Aldap%3A%2F%2Fx%7D", f"{real}{real}", real.upper(), real + "~", "~" + real,
        f"{real}%3Flast_seq%3D1", f"{real}%23", "%252e%252e%252f",
        # A line of its own in the worker's log, if an id is logged as it is.
        "x%0D%0A2026-01-01%2000%3A00%3A00%2C000%20ERROR%20forged%20by%20a%20client",
    ]  # fmt: skip
    ids = list(fixed)
    while len(ids) < count:
        length = rng.choice([1, 8, 36, 64, 65, 66, 200, 300, 1000, 4000])
        text = random_text(rng, length)
        while len(urllib.parse.quote(text, safe="")) > 12_000:  # under Twisted's line limit
            text = text[: len(text) // 2]
        ids.append(urllib.parse.quote(text, safe=""))
    return [i for i in ids if urllib.parse.unquote(i) != real][:count]


def ws_paths(rng: random.Random, real: str) -> list[tuple[str, set[int]]]:
    """WebSocket paths and the close codes each may be refused with: 4400 for a malformed
    ``last_seq`` (checked first), 4404 for a path that is not a stream's or names none."""
    bad_query, not_found = {int(CloseCode.BAD_REQUEST)}, {int(CloseCode.NOT_FOUND)}
    either = bad_query | not_found
    cases: list[tuple[str, set[int]]] = []
    for value in odd_values(rng, 110):  # the real stream, a last_seq it must refuse
        cases.append((f"/ws/streams/{real}/?last_seq={value}", bad_query))
    for first, last in [("1", "abc"), ("abc", "-1"), ("", "x"), ("5", "%00"), ("1", "1e3")]:
        cases.append((f"/ws/streams/{real}/?last_seq={first}&last_seq={last}", bad_query))
    cases.append((f"/ws/streams/{real}/?" + "&".join(["last_seq=x"] * 500), bad_query))
    ids = odd_ids(rng, real, 130)
    queries = ["", "?last_seq=0", "?last_seq=5", f"?last_seq={MAX_SEQ}"]
    for i, seg in enumerate(ids):  # no such stream
        cases.append((f"/ws/streams/{seg}/{queries[i % len(queries)]}", not_found))
    values = odd_values(rng, 40)
    for i, seg in enumerate(rng.sample(ids, 40)):  # no such stream and an odd last_seq
        cases.append((f"/ws/streams/{seg}/?last_seq={values[i]}", either))
    shapes = [
        f"/ws/streams/{real}", f"/ws/streams/{real}//", f"/ws//streams/{real}/",
        f"/ws/streams/{real}/extra/", f"/WS/streams/{real}/", f"/ws/Streams/{real}/",
        f"/ws/streams/{real}/../", f"/ws/streams/{real}/%2e%2e/", f"/ws/streams/./{real}/",
        f"/ws/streams/%2F{real}/", f"/ws/streams/..%2F{real}/", f"/ws/streams/{real}/events",
        f"/streams/{real}/events", f"/ws/streams/{real}/%00/", "/ws/streams/", "/ws/", "/",
        "/admin/", "/api/turns/", "/static/../ws/streams/x/", f"/{'a/' * 500}",
        "/%00", "/%ff", "/" + "x" * 6000, "/ws/streams/" + "a" * 12_000 + "/",
        "/ws/streams/" + "a" * 20_000 + "/",  # over Twisted's line limit: dropped
    ]  # fmt: skip
    for shape in shapes:
        cases.append((shape, either if "last_seq" in shape else not_found))
    return cases


def sse_requests(rng: random.Random, real: str, port: int) -> list[tuple[bytes, set[int | None]]]:
    """Raw HTTP requests to the SSE route and the statuses each may be answered with."""

    def request(
        target: str, *headers: bytes, method: str = "GET", host: bytes | None = None
    ) -> bytes:
        host = host if host is not None else f"127.0.0.1:{port}".encode()
        head = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: " + host]
        return b"\r\n".join([*head, *headers, b"Connection: close", b"", b""])

    events = f"/streams/{real}/events"
    bad: set[int | None] = {400}
    cases: list[tuple[bytes, set[int | None]]] = []
    # Last-Event-ID values that are not a number, on the real stream: the header carries the
    # seq of the last chunk event, so each is 400 (as the same text in ?last_seq= would be,
    # once URL-decoded). It is not a query string: not percent-decoded, no "+" as a space, not
    # split at "&".
    header_chars = bytes(b for b in range(256) if b not in b"\r\n")
    fixed_ids = [
        b"x&last_seq=5", b"%35", b"+5", b"5+", b"5&x", b"%20%35", b"last_seq=5", b"-1", b"1e3",
        b"1.0", b"99999999999999999999", str(MAX_SEQ + 1).encode(), b"abc", b"\x00", b"1\x00",
        b"0x10", b"1_0", b"NaN", b"\xff", b"\xef\xbc\x91", b"\xb2", b"1 2", b"1\t2",
        b"\x0b1\x0c2", b"9" * 8000, b"-" + b"9" * 30,
    ]  # fmt: skip
    header_values = list(fixed_ids)
    while len(header_values) < 110:
        value = bytes(rng.choice(header_chars) for _ in range(rng.randrange(1, 40)))
        if re.search(rb"[^\d\s\x1c-\x1f\x85\xa0]", value):  # a character no reading drops
            header_values.append(value)
    for value in header_values:
        cases.append((request(events, b"Last-Event-ID: " + value), bad))
    for value in header_values[:20]:  # the header wins over a good query
        cases.append((request(events + "?last_seq=3", b"Last-Event-ID: " + value), bad))
    for query in odd_values(rng, 60):
        cases.append((request(f"{events}?last_seq={query}"), bad))
    ids = odd_ids(rng, real, 70)
    anything = [b"x&last_seq=5", b"%35", b"+5", b"5", b"", b"-1", b"\xff\x00"]
    for i, seg in enumerate(ids):  # no such stream: 404, or 400 for a malformed cursor first
        value = anything[i % len(anything)]
        cases.append((request(f"/streams/{seg}/events", b"Last-Event-ID: " + value), {400, 404}))
    # Not GET, not the allowed host, not quite HTTP.
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "CONNECT"):
        cases.append((request(events, method=method), {400, 405, 501}))
    # Django's views refuse all of these with 400 (an empty Host too: DisallowedHost), and
    # the README promises the same answer from the SSE route. (A port out of range is not
    # checked by Django either: not here.)
    hosts = [b"evil.example", b"127.0.0.1.evil.example", b"localhost.evil", b"[::1", b"\xff",
             b"a" * 300, b"127.0.0.1:80@evil", b"evil.example:80", b"EVIL.EXAMPLE",
             b""]  # fmt: skip
    for host in hosts:
        cases.append((request(events, host=host), bad))
    malformed = [
        f"GET {events}\r\n\r\n".encode(),
        f"GET {events} HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        f"GET  {events}  HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(64) + b"\r\n\r\n",
        request(events, b"Last-Event-ID"),
        request(events, b": 5"),
        request(events, *[f"X-{i}: {i}".encode() for i in range(600)]),
        request(events, b"Content-Length: -1"),
        request(events, b"Content-Length: abc"),
        request(events, b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        request(events, b"Last-Event-ID: 1", b"Last-Event-ID: x"),
        request(events, b"Last-Event-ID: x", b"X-Big: " + b"x" * 12_000),
        request(f"{events}?last_seq=x&" + "y" * 12_000),
    ]
    for raw in malformed:
        cases.append((raw, {400, 413, 414, 431, 501, 505}))
    for raw in (request(events, b"X-Big: " + b"x" * 70_000),
                request(f"{events}?" + "x" * 70_000)):  # fmt: skip
        cases.append((raw, {None, 400, 413, 414, 431}))  # over Twisted's line limit
    return cases


# -- the test ----------------------------------------------------------------------------------


async def frame_fuzzer(
    fuzz: Fuzz, frames: list[Payload], *, done: asyncio.Event
) -> list[dict[str, Any]]:
    """One subscribed socket: send each frame and check its answer (chunk frames of the stream
    come in between); set ``done``; follow the stream to its end. Everything it received,
    and last ``{"type": "_close", "code": <its close code>}``."""
    received: list[dict[str, Any]] = []

    async def answer(ws: Any) -> dict[str, Any]:
        while True:
            message = json.loads(await ws.recv())
            received.append(message)
            if message.get("type") != "chunk":
                return dict(message)

    try:
        ws = await websockets.connect(
            fuzz.url(f"/ws/streams/{fuzz.stream_id}/"), max_size=None,
            additional_headers={"Origin": fuzz.server.http_url},
        )  # fmt: skip
        first = await asyncio.wait_for(answer(ws), ANSWER_TIMEOUT)
        assert first["type"] == "subscribed", first
        for payload in frames:
            expected = "pong" if is_ping(joined(payload)) else "bad_frame"
            try:
                await ws.send(payload)
                got = await asyncio.wait_for(answer(ws), ANSWER_TIMEOUT)
            except (TimeoutError, ConnectionClosed) as exc:
                fuzz.wrong("frame", payload, f"{type(exc).__name__}: {exc}")
                break
            ok = got == {"type": "pong"} if expected == "pong" else (
                got.get("type") == "error" and got.get("code") == "bad_frame")  # fmt: skip
            if not ok:
                fuzz.wrong("frame", payload, f"expected {expected}, got {got}")
    finally:
        done.set()
    async with ws:
        received += await asyncio.wait_for(read_frames(ws), 60)
    received.append({"type": "_close", "code": ws.close_code})
    return received


async def closing_frame(fuzz: Fuzz, rng: random.Random, payload: Payload, text: bool,
                        codes: set[int]) -> None:  # fmt: skip
    last_seq = rng.choice([0, rng.randrange(0, 300), MAX_SEQ])

    async def send(ws: Any) -> None:
        await ws.send(joined(payload) if not isinstance(payload, list) else payload, text=text)

    path = f"/ws/streams/{fuzz.stream_id}/?last_seq={last_seq}"
    outcome = await fuzz.connect_answered("closing frame", path, action=send,
                                          may_drop=DROPPED in codes)  # fmt: skip
    sent = (payload, "as text" if text else "as binary")
    if close_code(outcome) not in codes:
        fuzz.wrong("closing frame", sent, f"expected close {codes}: {outcome}")
        return
    frames = outcome.frames or [{}]
    if close_code(outcome) == CloseCode.MESSAGE_TOO_BIG and frames[-1] != {
        "type": "error", "code": "frame_too_big", "message": f"frames are limited to "
        f"{FRAME_LIMIT} bytes"}:  # fmt: skip
        fuzz.wrong("closing frame", sent, f"no frame_too_big error: {outcome}")
    # Far behind (more than SNAPSHOT_AFTER_CHUNKS), the missed chunks come as one snapshot.
    after, rest = last_seq, frames[1:]
    if rest and rest[0].get("type") == "snapshot":
        after, snapshot, rest = rest[0]["seq"], rest[0], rest[1:]
        if snapshot["state"]["text"] != "".join(f"chunk {i}" for i in range(1, after + 1)):
            fuzz.wrong("closing frame", sent, f"snapshot text is not chunks 1..{after}")
    stray = [f for f in rest if f.get("type") not in ("chunk", "error")]
    problem = check_chunks(rest, after)
    if stray or frames[0].get("type") != "subscribed" or problem:
        fuzz.wrong("closing frame", sent, f"{problem or 'unexpected frames'}: {outcome}")


async def odd_path(fuzz: Fuzz, path: str, codes: set[int]) -> None:
    too_long = len(path) > TWISTED_LINE_LIMIT
    outcome = await fuzz.connect_answered("path", path, may_drop=too_long)
    if outcome.status is not None and 400 <= outcome.status < 500:
        return  # refused at the handshake
    if too_long and "InvalidMessage" in (outcome.failure or ""):
        return  # Twisted dropped the request line unread (see DROPPED)
    if close_code(outcome) not in codes:
        fuzz.wrong("path", path, f"expected close {codes}: {outcome}")
    elif len(outcome.frames) != 1 or outcome.frames[0].get("type") != "error":
        fuzz.wrong("path", path, f"expected one error frame: {outcome}")


async def odd_origin(fuzz: Fuzz, headers: dict[str, str]) -> None:
    path = f"/ws/streams/{fuzz.stream_id}/"
    outcome = await fuzz.connect_answered("origin", path, headers=headers)
    # AllowedHostsOriginValidator refuses the handshake (403); autobahn, an Origin it cannot
    # parse (400).
    if outcome.status not in (400, 403):
        fuzz.wrong("origin", headers, f"expected HTTP 403 or 400: {outcome}")


async def odd_request(fuzz: Fuzz, request: bytes, statuses: set[int | None]) -> None:
    status, body, failure = await fuzz.http(request)
    if status is None and None in statuses and failure == "no status line: b''":
        return  # Twisted dropped a line above its limit (see DROPPED)
    if status not in statuses:
        fuzz.wrong("sse", request, failure or f"expected HTTP {statuses}, got {status}: {body!r}")


@pytest.mark.timeout(120)
async def test_garbage_is_refused_cleanly_while_the_stream_goes_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    # Room for every socket this test opens at once on the stream (the default is 10).
    settings = with_settings(env, MAX_CLIENTS_PER_STREAM=500)
    started = time.monotonic()
    with DaphneServer(settings, log=tmp_path / "daphne.log") as server:
        stream_id = manager_call(settings, "out = await m.create_stream()")
        fuzz = Fuzz(server, stream_id)
        observer = await websockets.connect(
            fuzz.url(f"/ws/streams/{stream_id}/"), max_size=None,
            additional_headers={"Origin": server.http_url},
        )  # fmt: skip
        subscribed = json.loads(await asyncio.wait_for(observer.recv(), ANSWER_TIMEOUT))
        observed = asyncio.create_task(read_frames(observer))
        stop = tmp_path / "stop-producing"
        producer = start_python(
            PRODUCER.format(minimum=MIN_CHUNKS, stop=str(stop), sid=stream_id), env=settings
        )
        try:
            frames = small_frames(rng, 600)
            shares = [frames[i::POOL_SOCKETS] for i in range(POOL_SOCKETS)]
            dones = [asyncio.Event() for _ in shares]
            fuzzers = [asyncio.create_task(frame_fuzzer(fuzz, share, done=done))
                       for share, done in zip(shares, dones, strict=True)]  # fmt: skip
            closing = closing_frames(rng, 70)
            paths = ws_paths(rng, stream_id)
            origins: list[dict[str, str]] = [
                {}, {"Origin": ""}, {"Origin": "null"}, {"Origin": "http://evil.example"},
                {"Origin": "http://127.0.0.1.evil.example"}, {"Origin": "https://localhost.evil"},
                {"Origin": "file://"}, {"Origin": "http://[::1"}, {"Origin": "evil"},
                {"Origin": "http://evil.example, http://127.0.0.1"}, {"Origin": "x" * 5000},
                {"Origin": "http://user:pw@evil.example"}, {"Origin": "javascript:alert(1)"},
                {"Origin": "http://%31%32%37.0.0.1"}, {"Origin": "http://127.0.0.1\\@evil"},
            ]  # fmt: skip
            requests = sse_requests(rng, stream_id, server.port)
            jobs: list[Awaitable[None]] = [
                *(closing_frame(fuzz, rng, p, t, c) for p, t, c in closing),
                *(odd_path(fuzz, p, c) for p, c in paths),
                *(odd_origin(fuzz, h) for h in origins),
                *(odd_request(fuzz, r, s) for r, s in requests),
            ]
            order = list(range(len(jobs)))
            rng.shuffle(order)
            await asyncio.gather(*(jobs[i] for i in order))
            await asyncio.gather(*(done.wait() for done in dones))
            fuzz.counts.update({
                "client frames on subscribed sockets": len(frames),
                "closing frames (oversize, not UTF-8)": len(closing),
                "WebSocket paths": len(paths), "Origin headers": len(origins),
                "SSE requests": len(requests),
            })  # fmt: skip
            fuzzed = time.monotonic() - started
        finally:
            stop.touch()
            out, err = await asyncio.to_thread(producer.communicate, timeout=60)
        assert producer.returncode == 0, err
        pushed = int(out.split("PUSHED=", 1)[1])
        # Every refused, closed or dropped connection gave its place back: only the observer
        # and the frame fuzzers are left on the stream.
        count = manager_call(settings, COUNT.format(sid=stream_id, want=1 + POOL_SOCKETS))
        manager_call(settings, f"await m.close_stream({stream_id!r}, 'fuzzed')")
        seen = [subscribed, *await asyncio.wait_for(observed, 30)]
        followers = await asyncio.wait_for(asyncio.gather(*fuzzers), 30)
        await observer.close()
        log = server.log()
    total = sum(fuzz.counts.values())
    assert total >= 1000, fuzz.counts
    # Everything that went wrong, in one message: each section names the inputs or lines.
    failures: list[str] = []
    if fuzz.problems:
        failures.append("\n".join([f"{len(fuzz.problems)} of {total} inputs were answered wrong:",
                                   *fuzz.problems[:60]]))  # fmt: skip
    if count != 1 + POOL_SOCKETS:
        failures.append(f"{count} clients left on the stream, not {1 + POOL_SOCKETS}: the "
                        "fuzz leaked registrations")  # fmt: skip
    # The observer (subscribed before the first push), and every socket that took frames:
    # every chunk once and in order, then closed (the garbage did not disturb the stream).
    last = {"type": "closed", "reason": "fuzzed", "last_seq": pushed}
    watched = [*seen, {"type": "_close", "code": observer.close_code}]
    named = [("observer", watched), *((f"frame fuzzer {i}", r) for i, r in enumerate(followers))]
    for name, received in named:
        seqs = [f["seq"] for f in received if f.get("type") == "chunk"]
        problem = check_chunks(received, 0) or (
            None if seqs == list(range(1, pushed + 1)) else f"chunks {seqs}, pushed {pushed}"
        )
        # 4000, or autobahn's closing-handshake abort after the closed frame (ERROR_CLOSES)
        ends = received[-2:] in ([last, {"type": "_close", "code": code}] for code in (4000, 1006))
        if problem or not ends or (name == "observer" and received[0].get("seq") != 0):
            failures.append(f"{name}: {problem or 'subscribed/closed wrong'}: "
                            f"{received[:2]} ... {received[-3:]}")  # fmt: skip
    lines = [line for line in re.split(r"\r\n|\r|\n", log) if line]
    bad_lines = [line for line in lines if BAD_LOG_LINES.search(line)]
    if bad_lines:
        failures.append("\n".join([f"{len(bad_lines)} log lines of failures:",
                                   *(shorten(line, 2000) for line in bad_lines[:40]),
                                   "the log's end:", log[-5000:]]))  # fmt: skip
    foreign = [(i, line) for i, line in enumerate(lines) if not LOG_LINE.match(line)]
    if foreign:
        failures.append("\n".join([
            f"{len(foreign)} log lines the loggers did not start (each after the line that did):",
            *(f"{shorten(repr(lines[i - 1]), 300)}\n    -> {shorten(repr(line), 200)}"
              for i, line in foreign[:10]),
        ]))  # fmt: skip
    if failures and fuzz.retried:
        failures.append(f"({len(fuzz.retried)} sent twice, dropped unanswered: {fuzz.retried})")
    assert not failures, "\n\n".join(failures)
    print(f"fuzzed {total} inputs {dict(fuzz.counts)} in {fuzzed:.1f} s; {pushed} chunks; "
          f"{len(fuzz.retried)} sent twice (dropped unanswered): {fuzz.retried}")  # fmt: skip
