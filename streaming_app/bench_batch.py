"""Benchmark rows of issue 14's last question: would writing a client's backlog as one frame
(several chunks in one WebSocket message) lower the worker's CPU per delivered chunk?

Measured on raw Channels, where only the framing differs: the baseline consumer (one frame a
chunk) against the same consumer writing every ``RawBatchConsumer.BATCH`` chunks as one
frame (a JSON array), flat out, to few and to many clients of one stream, each on a fresh
Daphne worker. streaming_app's protocol has no batch frame: these rows say what one would
save before the protocol grows one.
"""

from __future__ import annotations

from typing import Any

from .bench import BASELINE, Deployment, Scenario, Worker, result_row, run_scenario
from .bench_raw import RawBatchConsumer

BATCHED = "raw-batch"


def scenarios(quick: bool) -> list[Scenario]:
    """One stream flat out: (a)'s 10 clients, and high fan-out."""
    if quick:
        return [Scenario("1x3", 1, 3, 200, 0), Scenario("1x10", 1, 10, 100, 0)]
    return [Scenario("1x10", 1, 10, 2000, 0), Scenario("1x100", 1, 100, 500, 0)]


async def compare(deployment: Deployment, layer: str, quick: bool, drain: float
                  ) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for scenario in scenarios(quick):
        for system in (BASELINE, BATCHED):
            async with Worker(deployment, system, layer) as worker:
                row = result_row(await run_scenario(worker, scenario, drain))
            row["chunks_per_frame"] = RawBatchConsumer.BATCH if system == BATCHED else 1
            rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The rows (``bench.Result`` as a dict, plus ``chunks_per_frame``) as printed lines."""
    lines = ["", "Frame batches (raw Channels, one stream flat out, "
             f"{rows[0]['layer']} layer): one chunk a frame against "
             f"{RawBatchConsumer.BATCH} chunks a frame",
             f"  {'clients':>8}{'chunks/frame':>14}{'delivered':>11}{'lost':>6}"
             f"{'chunks/s':>10}{'Daphne us/dlv':>15}"]  # fmt: skip
    for r in rows:
        lines.append(f"  {r['clients_per_stream']:>8}{r['chunks_per_frame']:>14}"
                     f"{r['delivered']:>11,}{r['lost']:>6}{r['rate']:>10,.0f}"
                     f"{r['daphne_cpu_us_per_delivery']:>15}")  # fmt: skip
    for one, batched in zip(rows[::2], rows[1::2], strict=True):
        base = one["daphne_cpu_us_per_delivery"]
        ratio = batched["daphne_cpu_us_per_delivery"] / base if base else 0.0
        lines.append(f"  {one['clients_per_stream']} clients: Daphne CPU per delivery "
                     f"{ratio:.2f}x with batches of {batched['chunks_per_frame']}")  # fmt: skip
    return lines
