"""streaming_bench runs both systems on both layers and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .servers import base_env, manage, migrated_sqlite


@pytest.mark.database_independent  # the layers and processes, on any database
@pytest.mark.timeout(300)  # above the command's own bound (240 s), so that one fires first
def test_quick_benchmark_reports_every_row_and_streaming_app_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path), REDIS_URL=redis_url)
    result = manage("streaming_bench", "--quick", "--json", "--redis-url", redis_url,
                    env=env, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["in_process"]["raw"] > 0
    assert report["in_process"]["streaming_app"] > 0
    rows = {(r["scenario"], r["system"], r["layer"]): r for r in report["end_to_end"]}
    assert set(rows) == {
        (scenario, system, layer)
        for scenario in ("a", "b")
        for system in ("raw", "raw-nohop", "streaming_app")
        for layer in ("redis", "pubsub")
    }
    for (_, system, _), row in rows.items():
        assert row["delivered"] + row["lost"] == row["expected"]
        if system == "streaming_app":
            assert (row["lost"], row["duplicated"], row["reordered"]) == (0, 0, 0), row
    assert set(report["ratios"]) == {"a", "b"}


def test_unknown_layers_are_refused(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path))
    result = manage("streaming_bench", "--layers", "carrier-pigeon", env=env)
    assert result.returncode == 1
    assert "Unknown layer 'carrier-pigeon'" in result.stderr
