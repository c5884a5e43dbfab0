"""Real processes for tests: Daphne workers and ``manage.py`` commands on a shared database.

Tests that cross processes cannot use pytest-django's in-memory test database; they give
every process the same ``DATABASE_URL`` (a migrated SQLite file, or PostgreSQL) instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one, without the test settings' leftovers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["DJANGO_SETTINGS_MODULE"] = "project.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def manage(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` with ``args``; the finished process (output captured). Past
    ``timeout`` it is killed with everything it started (its own process group)."""
    with subprocess.Popen(
        [PYTHON, str(ROOT / "manage.py"), *args], env=dict(env), cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its Daphne and redis-server too
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


_template: dict[str, Path] = {}


def migrated_sqlite(directory: Path) -> str:
    """A ``DATABASE_URL`` of a freshly migrated SQLite file in ``directory``."""
    if "db" not in _template:
        template_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"streaming-template-{os.getpid()}"
        template_dir.mkdir(exist_ok=True)
        template = template_dir / "template.sqlite3"
        result = manage("migrate", "-v0", env=base_env(DATABASE_URL=f"sqlite:///{template}"))
        assert result.returncode == 0, result.stderr
        _template["db"] = template
    target = directory / "db.sqlite3"
    shutil.copy(_template["db"], target)
    return f"sqlite:///{target}"


def server_command(kind: str, app: str, port: int, backlog: int | None = None) -> list[str]:
    """The command line of one worker of an ASGI server, as the README gives it."""
    if kind == "daphne" and backlog is not None:
        return [PYTHON, "-m", "daphne", "-e",
                f"tcp:port={port}:interface=127.0.0.1:backlog={backlog}", app]  # fmt: skip
    if kind == "daphne":
        return [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if kind == "uvicorn":
        return [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                "--lifespan", "on", app]  # fmt: skip
    if kind == "hypercorn":  # one process per worker: its signals reach the application
        return [PYTHON, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--workers", "0", app]
    raise ValueError(f"unknown ASGI server {kind!r}")


SERVER_KINDS = ("daphne", "uvicorn", "hypercorn")


def server_kinds() -> list[Any]:
    """SERVER_KINDS as test parameters: the other servers are checked in the SQLite pass only
    (what differs between servers is not the database; .ci/run stays within its time)."""
    import pytest

    return [kind if kind == "daphne" else pytest.param(kind, marks=pytest.mark.database_independent)
            for kind in SERVER_KINDS]  # fmt: skip


class DaphneServer:
    """One worker serving ``project.asgi`` on a free port of 127.0.0.1: Daphne, or with
    ``kind`` Uvicorn or Hypercorn; with ``backlog``, Daphne listening as the README runs it
    (``-e tcp:...:backlog=N``)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        log: Path | None = None,
        app: str = "project.asgi:application",
        kind: str = "daphne",
        backlog: int | None = None,
    ):
        self.kind = kind
        self.app = app
        self.backlog = backlog
        self.env = dict(env)
        self.port = port or free_port()
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> DaphneServer:
        self._out = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        out = self._out if self._out is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            server_command(self.kind, self.app, self.port, self.backlog),
            env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}: "
                                   f"{self.log()}")  # fmt: skip
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not listen on {self.port} within {timeout} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """``kill -9``: the worker dies without any cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._out is not None:
            self._out.close()
            self._out = None
        return self.process.returncode

    def __enter__(self) -> DaphneServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def read_frames(ws: Any, frames: list[dict[str, Any]] | None = None
                      ) -> list[dict[str, Any]]:  # fmt: skip
    """Every JSON frame a ``websockets`` connection receives until the server closes it
    (appended to ``frames`` as they come, when given, for a test that watches them arrive)."""
    import json

    from websockets.exceptions import ConnectionClosed

    frames = [] if frames is None else frames
    try:
        while True:
            frames.append(json.loads(await ws.recv()))
    except ConnectionClosed:
        return frames


def anyone(user: Any, session_key: str | None, stream: Any) -> bool:
    """A CAN_SUBSCRIBE rule for tests whose clients have no session."""
    return True


def run_python(code: str, *, env: Mapping[str, str], timeout: float = 60) -> str:
    """Run ``code`` in a new Django process (``manage.py shell``); its stdout.

    Raises AssertionError with the process's stderr when it fails.
    """
    result = manage("shell", "--no-imports", "-c", code, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_python(code: str, *, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``code`` in a new Django process without waiting for it."""
    return subprocess.Popen(
        [PYTHON, str(ROOT / "manage.py"), "shell", "--no-imports", "-c", code],
        env=dict(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def create_postgres_database(url: str) -> str:
    """A fresh, migrated database on the PostgreSQL server of ``url``; its URL."""
    import uuid

    import psycopg

    server, _ = url.rsplit("/", 1)
    name = f"streaming_mp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    result = manage("migrate", "-v0", env=base_env(DATABASE_URL=f"{server}/{name}"))
    assert result.returncode == 0, result.stderr
    return f"{server}/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Settings of the multi-process tests: anyone may follow, quick sweeps and timeouts.
SETTINGS = {
    "CAN_SUBSCRIBE": "tests.servers.anyone",
    "CAN_CANCEL": "tests.servers.anyone",
    "SWEEP_INTERVAL_SECONDS": 0.5,
    "CLIENT_TIMEOUT_SECONDS": 2,
}


def with_settings(env: dict[str, str], **options: Any) -> dict[str, str]:
    return {**env, "STREAMING_APP_JSON": json.dumps({**SETTINGS, **options})}


def manager_call(env: dict[str, str], body: str) -> Any:
    """Run ``body`` (async code using ``m``, the process's manager) in a new process;
    the JSON value it assigns to ``out``."""
    code = (
        "import asyncio, json\n"
        "from streaming_app.manager import get_streaming_manager\n"
        "from streaming_app.chunks import TextDeltaChunk\n"
        "from streaming_app.exceptions import StreamError\n"
        "async def main():\n"
        "    m = get_streaming_manager()\n"
        "    out = None\n"
        + "".join(f"    {line}\n" for line in body.strip().splitlines())
        + "    return out\n"
        "print('OUT=' + json.dumps(asyncio.run(main())))\n"
    )
    stdout = run_python(code, env=env)
    return json.loads(stdout.split("OUT=", 1)[1])


class RedisServer:
    """A redis-server of this test's own, which the test stops and starts again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
