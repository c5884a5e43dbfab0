"""``manage.py streaming_bench``: streaming_app against raw Channels, in the same run.

Prints in-process push throughput (manager vs raw ``group_send``) and, end to end through
Daphne + Redis with real WebSocket clients, delivered chunks/s, p50/p99 latency, lost,
duplicated and reordered deliveries and CPU per delivery and per push, for both channels_redis
layers; on the default layer also a scaling table, connects/s and idle CPU; then each ratio
against its goal. Every process it starts is stopped before it exits, whatever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from argparse import ArgumentParser
from collections.abc import Iterator
from types import FrameType
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from streaming_app import (
    bench,
    bench_batch,
    bench_coalesce,
    bench_join,
    bench_report,
    bench_slow,
)
from streaming_app.bench_procs import Children
from streaming_app.manager import get_streaming_manager


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the children


@contextlib.contextmanager
def deployed(options: dict[str, Any]) -> Iterator[bench.Deployment]:
    """A deployment (Redis, database) whose every process is stopped, whatever ends the run
    (an error, Ctrl-C, SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    children = Children()
    deployment: bench.Deployment | None = None
    try:
        deployment = bench.Deployment(children, options["redis_url"], options["database_url"])
        yield deployment
    finally:
        try:
            children.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if deployment is not None:
                deployment.close()


class Command(BaseCommand):
    help = "Benchmark streaming_app against raw Channels on the same layer (goals printed)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true", help="Small scenarios (for tests).")
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        parser.add_argument("--redis-url", help="Use this Redis (default: a private one).")
        parser.add_argument("--database-url", help="Default: a temporary SQLite file.")
        parser.add_argument("--layers", default="redis,pubsub", help="redis, pubsub or both.")
        parser.add_argument("--in-process-chunks", type=int, default=5000)
        parser.add_argument("--only", choices=["coalesce", "batch"],
                            help="Run only these rows (coalesce: text-delta windows; batch: "
                                 "frame batches on raw Channels).")  # fmt: skip
        # The internal role of the producer processes the benchmark starts.
        parser.add_argument("--agent", help="(internal) serve producer requests for a system.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["agent"]:
            asyncio.run(bench.serve_producer(options["agent"]))
            return
        layers = [name.strip() for name in options["layers"].split(",") if name.strip()]
        unknown = [name for name in layers if name not in bench.LAYERS]
        if unknown:
            raise CommandError(f"Unknown layer {unknown[0]!r}: choose from redis, pubsub.")
        primary = bench.PRIMARY_LAYER if bench.PRIMARY_LAYER in layers else layers[0]
        plan = bench.plan(options["quick"])
        report: dict[str, Any] = {}
        if options["only"]:
            name, module = {"coalesce": ("coalesce", bench_coalesce),
                            "batch": ("frame_batch", bench_batch)}[options["only"]]  # fmt: skip
            report[name] = self.only(module, options, primary, plan.drain)
            lines = ([json.dumps(report, indent=2)] if options["json"]
                     else module.render(report[name])[1:])  # fmt: skip
            for line in lines:
                self.stdout.write(line)
            return
        manager = get_streaming_manager()
        chunks = 500 if options["quick"] else options["in_process_chunks"]
        report["in_process"] = async_to_sync(bench.in_process)(manager, chunks, 10)
        deltas = 2_000 if options["quick"] else 20_000
        joins = async_to_sync(bench_join.snapshot_against_replay)(deltas)
        report["join"] = [r.to_dict() for r in joins]
        results = bench.WorkerResults()
        with deployed(options) as deployment:
            for layer in layers:
                for system in bench.SYSTEMS:
                    out = asyncio.run(bench.run_worker(deployment, system, layer, plan,
                                                       primary=layer == primary))  # fmt: skip
                    results.end_to_end += out.end_to_end
                    results.scaling += out.scaling
                    results.connects += out.connects
                    results.idle += out.idle
            slow = asyncio.run(bench_slow.compare(deployment, primary, options["quick"],
                                                  plan.drain))  # fmt: skip
            report["slow_clients"] = [r.to_dict() for r in slow]
            coalesce = asyncio.run(bench_coalesce.compare(deployment, primary, options["quick"],
                                                          plan.drain))  # fmt: skip
            report["coalesce"] = [r.to_dict() for r in coalesce]
            batches = bench_batch.compare(deployment, primary, options["quick"], plan.drain)
            report["frame_batch"] = asyncio.run(batches)
        order = {name: i for i, name in enumerate(bench.SYSTEMS)}
        results.end_to_end.sort(key=lambda r: (r.scenario, layers.index(r.layer),
                                               order[r.system]))  # fmt: skip
        scaling_order = [cell.name for cell in plan.scaling]
        results.scaling.sort(key=lambda r: (scaling_order.index(r.scenario), order[r.system]))
        report["end_to_end"] = [bench.result_row(r) for r in results.end_to_end]
        report["ratios"] = self.ratios(results.end_to_end)
        report["scaling"] = [bench.result_row(r) for r in results.scaling]
        report["connects"] = [bench.result_row(r) for r in results.connects]
        report["idle"] = [bench.result_row(r) for r in results.idle]
        report["goals"] = bench_report.goals(report)
        report["goals"].append(bench_slow.goal(report["slow_clients"], primary))
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            for line in bench_report.render(report):
                self.stdout.write(line)
            for scenario, ratio in report["ratios"].items():
                self.stdout.write(
                    f"Scenario ({scenario}): streaming_app delivered "
                    f"{ratio['rate_vs_best_raw']:.2f}x the best raw consumer and layer; p99 "
                    f"{ratio['p99_vs_raw_pubsub']:.2f}x the best raw consumer on pub/sub"
                )

    def only(self, module: Any, options: dict[str, Any], layer: str, drain: float
             ) -> list[dict[str, Any]]:  # fmt: skip
        """Only the rows of ``module`` (bench_coalesce, bench_batch), on a deployment of their
        own (stopped whatever ends it)."""
        with deployed(options) as deployment:
            runs = asyncio.run(module.compare(deployment, layer, options["quick"], drain))
        return [r if isinstance(r, dict) else r.to_dict() for r in runs]

    def ratios(self, results: list[bench.Result]) -> dict[str, dict[str, float]]:
        """streaming_app against the best raw consumer (with or without Channels' hop), per
        scenario: delivered rate over the best raw layer's, and p99 on the pub/sub layer over
        the better raw consumer's there."""
        out: dict[str, dict[str, float]] = {}
        for scenario in sorted({r.scenario for r in results}):
            rows = [r for r in results if r.scenario == scenario]
            raws = [r for r in rows if r.system.startswith("raw")]
            best_raw = max((r.rate for r in raws), default=0.0)
            best_app = max((r.rate for r in rows if r.system == "streaming_app"), default=0.0)
            raw_pubsub_p99 = min(
                (r.p99_ms for r in raws if r.layer == "pubsub" and not r.lost), default=0.0
            )
            app_pubsub_p99 = next(
                (r.p99_ms for r in rows if r.system == "streaming_app" and r.layer == "pubsub"), 0.0
            )
            out[scenario] = {
                "rate_vs_best_raw": round(best_app / best_raw, 2) if best_raw else 0.0,
                "p99_vs_raw_pubsub": round(app_pubsub_p99 / raw_pubsub_p99, 2)
                if raw_pubsub_p99
                else 0.0,
            }
        return out
