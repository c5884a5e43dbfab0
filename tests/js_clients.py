"""The published JavaScript clients (``tests/js``, run with Node.js) and a TCP proxy that
drops their connection in the middle of a reply, for the protocol tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

JS = Path(__file__).resolve().parent / "js"

ID_LINE = b"\nid: "  # an SSE event's id field: the last event of a chunk carries its seq
EVENT_END = b"\n\n"


def node_ready() -> None:
    assert shutil.which("node"), "Node.js is needed (the README's test command installs it)"
    for package in ("@ag-ui/client", "ai"):
        assert (JS / "node_modules" / package).is_dir(), (
            "run `npm ci --prefix tests/js` (the README's test command does)"
        )


async def run_node(script: str, *args: str) -> dict[str, Any]:
    """Run ``tests/js/<script>`` with ``args``; the JSON it prints last (its exit must be 0)."""
    process = await asyncio.create_subprocess_exec(
        "node", str(JS / script), *args, cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def cut_point(data: bytes, ids: int) -> int | None:
    """The end of the event that carries the ``ids``-th SSE id in ``data``, or None."""
    at = -1
    for _ in range(ids):
        at = data.find(ID_LINE, at + 1)
        if at < 0:
            return None
    end = data.find(EVENT_END, at + 1)
    return None if end < 0 else end + len(EVENT_END)


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server's ``port``. Its n-th connection is cut
    (FIN to the client, the server's side closed) right after the event that carries the
    ``cuts[n]``-th chunk id of the response: the client had whole chunks, and then its
    connection was gone. Connections past ``len(cuts)`` are passed through whole."""

    def __init__(self, port: int, cuts: list[int]) -> None:
        self.upstream = port
        self.cuts = list(cuts)
        self.connections = 0
        self.dropped = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> DroppingProxy:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def handle(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        cut = self.cuts[self.connections] if self.connections < len(self.cuts) else None
        self.connections += 1
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream)
        upward = asyncio.ensure_future(self.pipe(client_in, server_out))
        try:
            received = b""
            sent = 0
            while chunk := await server_in.read(65536):
                received += chunk
                end = cut_point(received, cut) if cut is not None else None
                client_out.write(received[sent:end])
                await client_out.drain()
                if end is not None:  # the connection drops here
                    self.dropped += 1
                    break
                sent = len(received)
        except ConnectionError:
            pass  # the client went first
        finally:
            upward.cancel()
            for writer in (client_out, server_out):
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            self.tasks.discard(task)

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
