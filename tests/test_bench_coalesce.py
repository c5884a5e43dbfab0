"""streaming_bench's coalescing rows (``--only coalesce``): a reply at 50 tokens/s to real
WebSocket clients through a real Daphne worker, without and with a text-delta window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_app import bench_coalesce

from .servers import base_env, migrated_sqlite
from .test_bench import finish, start_bench


@pytest.mark.database_independent
@pytest.mark.timeout(200)
def test_only_the_coalescing_rows_every_client_gets_the_whole_reply_and_no_process_is_left(
    redis_url: str, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path), REDIS_URL=redis_url)
    bench = start_bench("--only", "coalesce", "--quick", "--json", env=env)  # its own Redis
    stdout, stderr, left = finish(bench, timeout=150)
    assert bench.returncode == 0, stderr[-3000:]
    assert left == [], "the benchmark left processes behind"
    runs = json.loads(stdout[stdout.index("{") :])["coalesce"]
    assert [r["window_ms"] for r in runs] == [0, 20, 100]
    for run in runs:
        assert run["text_ok"], run  # every client: exactly the reply, in order
        assert (run["tokens"], run["clients"], run["rate"]) == (50, 3, 50.0)
        assert 0 < run["frames_per_client"] <= run["tokens"]
        assert run["producer_cpu_ms"] > 0
    assert runs[0]["frames_per_client"] == 50  # off: one frame per token
    lines = bench_coalesce.render(runs)
    assert "100 ms against off: frames" in lines[-1]


def test_the_rows_are_scored_per_token_from_its_push_to_the_frame_that_carried_it() -> None:
    pushed = [100.0, 100.02, 100.04]
    received = [[(100.001, "tok0 ", 90), (100.05, "tok1 tok2 ", 95)]]
    run = bench_coalesce.score(20, 50.0, {"pushed": pushed, "cpu_s": 0.01}, received, 0.02)
    assert run.text_ok and run.frames_per_client == 2 and run.bytes_per_client == 185
    assert run.max_ms == pytest.approx(30.0, abs=0.01)  # tok1: pushed at .02, received at .05
    assert (run.producer_cpu_ms, run.daphne_cpu_ms) == (10.0, 20.0)
    assert not bench_coalesce.score(20, 50.0, {"pushed": pushed, "cpu_s": 0}, [[]], 0).text_ok
