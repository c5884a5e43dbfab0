"""streaming_bench runs every system on both layers, reports what it measured against each goal,
and leaves no process behind, also when it is interrupted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from streaming_app.bench_procs import Children

from .servers import PYTHON, ROOT, base_env, manage, migrated_sqlite

SYSTEMS = ("raw", "raw-nohop", "streaming_app")
LAYERS = ("redis", "pubsub")
QUICK_CELLS = ("2x1", "2x4", "4x1")


def session_processes(session: int) -> list[str]:
    """The command lines of the live processes in ``session`` (from /proc: every process the
    benchmark started is in its session unless it escaped with setsid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # proc(5): state, ppid, pgrp, session
            found.append(f"{entry.name}: {cmdline}")
    return found


def _interruptible() -> None:
    """Ctrl-C at its default in the child, as in a terminal: a suite started in the background
    (``.ci/run &`` from a script) ignores SIGINT, and a child inherits that, so the command
    would never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_bench(*args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """``manage.py streaming_bench`` in a session of its own (its id is the process's pid)."""
    return subprocess.Popen(
        [PYTHON, str(ROOT / "manage.py"), "streaming_bench", *args], env=dict(env), cwd=ROOT,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=_interruptible,
    )  # fmt: skip


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str, list[str]]:
    """Its output and whatever is left of its session once it has exited."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    left = session_processes(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    return stdout, stderr, left


@pytest.mark.database_independent  # the layers and processes, on any database
@pytest.mark.timeout(300)  # above the command's own bound (240 s), so that one fires first
def test_quick_benchmark_reports_every_row_and_goal_and_streaming_app_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    database_url = migrated_sqlite(tmp_path)
    env = base_env(DATABASE_URL=database_url, REDIS_URL=redis_url)
    bench = start_bench("--quick", "--json", "--redis-url", redis_url, "--database-url",
                        database_url, env=env)  # fmt: skip
    stdout, stderr, left = finish(bench, timeout=240)
    assert bench.returncode == 0, stderr[-3000:]
    assert left == [], "the benchmark left processes behind"
    # Nor streams: every stream it made is closed (one left open would be closed for
    # inactivity by the sweeper of whatever ran five minutes later, in the middle of it).
    with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
        made, still_open = db.execute(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'active') FROM streaming_app_stream"
        ).fetchone()
    assert made > 0 and still_open == 0, (made, still_open)
    report = json.loads(stdout[stdout.index("{") :])
    assert report["in_process"]["raw"] > 0
    assert report["in_process"]["streaming_app"] > 0
    rows = {(r["scenario"], r["system"], r["layer"]): r for r in report["end_to_end"]}
    assert set(rows) == {
        (scenario, system, layer)
        for scenario in ("a", "b")
        for system in SYSTEMS
        for layer in LAYERS
    }
    assert len(rows) == len(report["end_to_end"])
    assert {r["phases"] for r in rows.values() if r["scenario"] == "b"} == {"staggered"}
    scaling = {(r["scenario"], r["system"]): r for r in report["scaling"]}
    assert set(scaling) == {
        (cell, s) for cell in QUICK_CELLS for s in ("raw-nohop", "streaming_app")
    }
    assert {r["layer"] for r in report["scaling"]} == {"pubsub"}
    for row in [*rows.values(), *scaling.values()]:
        assert row["delivered"] + row["lost"] == row["expected"], row
        assert row["producer_cpu_s"] > 0, row
        assert (row["duplicated"], row["reordered"]) == (0, 0), row
        if row["system"] == "streaming_app" or row["layer"] == "pubsub":
            assert row["lost"] == 0, row  # only raw Channels on RedisChannelLayer may drop
    for table in ("connects", "idle"):
        assert {(r["system"], r["layer"]) for r in report[table]} == {
            (s, "pubsub") for s in SYSTEMS
        }
        assert {r["clients"] for r in report[table]} == {20}
    assert all(r["per_second"] > 0 and r["database"] == "sqlite" for r in report["connects"])
    assert all(r["cpu_percent"] >= 0 for r in report["idle"])
    goals = {(g["goal"], g["where"], g["layer"]) for g in report["goals"]}
    expected_goals = {
        ("delivered chunks/s", "(a)", "redis"),
        ("p99 latency, staggered", "(b)", "pubsub"),
        ("producer CPU per push", "(b)", "redis"),
        ("Daphne CPU per delivery", "scaling 2x4", "pubsub"),
        ("connects/s", "20 clients", "pubsub"),
        ("idle CPU", "20 clients", "pubsub"),
    }
    assert expected_goals <= goals
    # (a), (b) on both layers; cells; connects and idle; the fast client beside slow ones
    assert len(goals) == 3 * 2 + 4 * 2 + 2 * 3 + 2 + 1
    alone, beside = report["slow_clients"]  # the fast client acks: it loses nothing either way
    assert (alone["slow_clients"], beside["slow_clients"]) == (0, 2)
    assert alone["lost"] == beside["lost"] == 0 and alone["delivered"] == alone["chunks"]
    snapshot, replay = report["join"]  # one snapshot frame for what 2,000 chunk frames carry
    assert (snapshot["mode"], replay["mode"]) == ("snapshot", "replay")
    assert snapshot["text_ok"] and replay["text_ok"]
    assert snapshot["frames"] == 2 and replay["frames"] == 2_001
    coalesce = report["coalesce"]  # the same reply without and with a text-delta window
    assert [r["window_ms"] for r in coalesce] == [0, 20, 100]
    assert all(r["text_ok"] for r in coalesce) and coalesce[0]["frames_per_client"] == 50
    batches = report["frame_batch"]  # raw Channels: one chunk a frame, then ten a frame
    assert [(r["system"], r["chunks_per_frame"]) for r in batches] == [
        ("raw-nohop", 1),
        ("raw-batch", 10),
        ("raw-nohop", 1),
        ("raw-batch", 10),
    ]
    for row in batches:  # every chunk reaches every client, batched or not
        assert row["delivered"] == row["expected"] and row["lost"] == 0, row
        assert (row["duplicated"], row["reordered"]) == (0, 0), row
    for goal in report["goals"]:
        assert isinstance(goal["met"], bool)
        assert goal["target"] in {">= 1.0", "<= 1.1", "<= 1.5", "<= 1.2", ">= 0.5", "<= 2.0"}
    assert set(report["ratios"]) == {"a", "b"}


@pytest.mark.database_independent
@pytest.mark.timeout(200)
@pytest.mark.parametrize("interruption", ["ctrl-c", "sigterm", "producer-dies"])
def test_an_interrupted_benchmark_leaves_no_process(
    interruption: str, redis_url: str, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the command), SIGTERM, or an exception (its producer process killed),
    in the middle of the end-to-end part: the command fails and stops its redis-server, Daphne
    and producer."""
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path), REDIS_URL=redis_url)
    bench = start_bench("--quick", "--layers", "pubsub", env=env)  # its own redis-server
    wanted = "--agent" if interruption == "producer-dies" else "daphne"
    deadline = time.monotonic() + 120
    while not any(wanted in p for p in session_processes(bench.pid)):
        assert bench.poll() is None, bench.communicate()
        assert time.monotonic() < deadline, "the benchmark started no such process"
        time.sleep(0.1)
    running = session_processes(bench.pid)
    assert any("redis-server" in p for p in running), running
    if interruption == "ctrl-c":
        bench.send_signal(signal.SIGINT)
    elif interruption == "sigterm":
        bench.send_signal(signal.SIGTERM)
    else:
        pid = next(int(p.split(":")[0]) for p in running if "--agent" in p)
        os.kill(pid, signal.SIGKILL)
    _, stderr, left = finish(bench, timeout=90)
    assert bench.returncode != 0
    if interruption == "producer-dies":
        assert "the producer exited" in stderr, stderr[-3000:]
    assert left == [], "the benchmark left processes behind"


def test_a_child_that_ignores_sigterm_is_killed() -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")  # fmt: skip
    with Children(grace=0.5) as children:
        stubborn = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert stubborn.stdout is not None
        assert stubborn.stdout.readline() == b"ready\n"
        started = time.monotonic()
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_unknown_layers_are_refused(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    result = manage("streaming_bench", "--layers", "carrier-pigeon", env=env)
    assert result.returncode == 1
    assert "Unknown layer 'carrier-pigeon'" in result.stderr
