"""``manage.py streaming_bench``: streaming_app against raw Channels, in the same run.

Prints in-process push throughput (manager vs raw ``group_send``) and, end to end through
Daphne + Redis with real WebSocket clients, delivered chunks/s, p50/p99 latency and lost,
duplicated and reordered deliveries, for both channels_redis layers.
"""

from __future__ import annotations

import asyncio
import json
from argparse import ArgumentParser
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from streaming_app import bench
from streaming_app.manager import get_streaming_manager


class Command(BaseCommand):
    help = "Benchmark streaming_app against raw Channels on the same layer (ratios printed)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true", help="Small scenarios (for tests).")
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        parser.add_argument("--redis-url", help="Use this Redis (default: a private one).")
        parser.add_argument("--database-url", help="Default: a temporary SQLite file.")
        parser.add_argument("--layers", default="redis,pubsub", help="redis, pubsub or both.")
        parser.add_argument("--in-process-chunks", type=int, default=5000)
        # Internal roles of the subprocesses the benchmark starts.
        parser.add_argument("--produce", help="(internal) run a producer for a JSON spec.")
        parser.add_argument("--create", type=int, help="(internal) create N streams.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["produce"]:
            asyncio.run(bench.produce(json.loads(options["produce"])))
            return
        if options["create"]:
            manager = get_streaming_manager()

            async def create() -> list[str]:
                return [await manager.create_stream() for _ in range(options["create"])]

            self.stdout.write(json.dumps(async_to_sync(create)()))
            return
        layers = [name.strip() for name in options["layers"].split(",") if name.strip()]
        unknown = [name for name in layers if name not in bench.LAYERS]
        if unknown:
            raise CommandError(f"Unknown layer {unknown[0]!r}: choose from redis, pubsub.")
        quick = options["quick"]
        scenarios = (
            [bench.Scenario("a", 1, 3, 200, 0), bench.Scenario("b", 5, 2, 20, 20)]
            if quick
            else [bench.Scenario("a", 1, 10, 2000, 0), bench.Scenario("b", 50, 2, 200, 20)]
        )
        report: dict[str, Any] = {}
        manager = get_streaming_manager()
        chunks = 500 if quick else options["in_process_chunks"]
        report["in_process"] = async_to_sync(bench.in_process)(manager, chunks, 10)
        deployment = bench.Deployment(options["redis_url"], options["database_url"])
        try:
            results = [
                bench.end_to_end(deployment, system, layer, scenario)
                for scenario in scenarios
                for layer in layers
                for system in bench.SYSTEMS
            ]
        finally:
            deployment.close()
        report["end_to_end"] = [bench.result_row(r) for r in results]
        report["ratios"] = self.ratios(results)
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.print_table(report)

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

    def print_table(self, report: dict[str, Any]) -> None:
        ip = report["in_process"]
        self.stdout.write(
            f"In process (push throughput, same layer and group): raw group_send "
            f"{ip['raw']:,.0f}/s, streaming_app push_chunk {ip['streaming_app']:,.0f}/s, "
            f"ratio {ip['ratio']:.2f}"
        )
        header = ("scenario", "system", "layer", "expected", "delivered", "lost", "dup",
                  "reordered", "chunks/s", "p50 ms", "p99 ms")  # fmt: skip
        rows = [header] + [
            (
                r["scenario"],
                r["system"],
                r["layer"],
                r["expected"],
                r["delivered"],
                r["lost"],
                r["duplicated"],
                r["reordered"],
                r["rate"],
                r["p50_ms"],
                r["p99_ms"],
            )
            for r in report["end_to_end"]
        ]
        cells = [[str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        for row in cells:
            self.stdout.write("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        for scenario, ratio in report["ratios"].items():
            self.stdout.write(
                f"Scenario ({scenario}): streaming_app delivered {ratio['rate_vs_best_raw']:.2f}x "
                f"the best raw consumer and layer; p99 {ratio['p99_vs_raw_pubsub']:.2f}x the "
                "best raw consumer on pub/sub"
            )
