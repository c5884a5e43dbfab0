"""``streaming_bench``'s report: each ratio of streaming_app to the raw-no-hop baseline against
its goal (issue 14), and the printed tables. Every goal is printed with a met / NOT MET mark,
whatever the figure: a miss is never left out."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import bench_batch, bench_coalesce, bench_join, bench_slow
from .bench import BASELINE

APP = "streaming_app"


@dataclass(frozen=True)
class Goal:
    """A ratio streaming_app / baseline and the bound it must keep."""

    name: str
    metric: str  # the field of a row that is compared
    op: str  # ">=" (at least) or "<=" (at most)
    target: float

    def met(self, ratio: float | None) -> bool:
        if ratio is None:
            return False
        compare: Callable[[float, float], bool] = operator.ge if self.op == ">=" else operator.le
        return compare(ratio, self.target)


RATE = Goal("delivered chunks/s", "rate", ">=", 1.0)
DAPHNE_CPU = Goal("Daphne CPU per delivery", "daphne_cpu_us_per_delivery", "<=", 1.1)
P99 = Goal("p99 latency, staggered", "p99_ms", "<=", 1.5)
PRODUCER_CPU = Goal("producer CPU per push", "producer_cpu_us_per_push", "<=", 1.2)
CONNECTS = Goal("connects/s", "per_second", ">=", 0.5)
IDLE = Goal("idle CPU", "cpu_percent", "<=", 2.0)


def ratio(app: float, baseline: float) -> float | None:
    """app / baseline; None when the baseline is 0 and the app's figure is not."""
    if baseline:
        return round(app / baseline, 2)
    return 1.0 if not app else None


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal the report can be checked against, each with its ratio and verdict."""
    rows: list[dict[str, Any]] = []

    def check(goal: Goal, where: str, layer: str, table: Sequence[dict[str, Any]],
              match: Callable[[dict[str, Any]], bool]) -> None:  # fmt: skip
        app = next((r for r in table if r["system"] == APP and match(r)), None)
        base = next((r for r in table if r["system"] == BASELINE and match(r)), None)
        if app is None or base is None:
            return
        value = ratio(app[goal.metric], base[goal.metric])
        rows.append({
            "goal": goal.name, "where": where, "layer": layer,
            "streaming_app": app[goal.metric], "baseline": base[goal.metric],
            "ratio": value, "target": f"{goal.op} {goal.target}", "met": goal.met(value),
        })  # fmt: skip

    e2e = report["end_to_end"]
    for scenario in _unique(r["scenario"] for r in e2e):
        for layer in _unique(r["layer"] for r in e2e):

            def here(r: dict[str, Any], s: str = scenario, lay: str = layer) -> bool:
                return bool(r["scenario"] == s and r["layer"] == lay)

            where = f"({scenario})"
            goals_here = [RATE, DAPHNE_CPU, PRODUCER_CPU]
            if scenario == "b":
                goals_here.insert(1, P99)
            for goal in goals_here:
                check(goal, where, layer, e2e, here)
    scaling = report.get("scaling", [])
    for cell in _unique(r["scenario"] for r in scaling):

        def in_cell(r: dict[str, Any], c: str = cell) -> bool:
            return bool(r["scenario"] == c)

        layer = next(r["layer"] for r in scaling if r["scenario"] == cell)
        for goal in (RATE, DAPHNE_CPU):
            check(goal, f"scaling {cell}", layer, scaling, in_cell)
    for goal, rows_of in ((CONNECTS, report.get("connects", [])), (IDLE, report.get("idle", []))):
        for layer in _unique(r["layer"] for r in rows_of):

            def on_layer(r: dict[str, Any], lay: str = layer) -> bool:
                return bool(r["layer"] == lay)

            clients = next(r["clients"] for r in rows_of if r["layer"] == layer)
            check(goal, f"{clients} clients", layer, rows_of, on_layer)
    return rows


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Right-aligned columns."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]


def render(report: dict[str, Any]) -> list[str]:
    """The report as the lines the command prints."""
    ip = report["in_process"]
    lines = [
        f"In process (push throughput, same layer and group): raw group_send "
        f"{ip['raw']:,.0f}/s, streaming_app push_chunk {ip['streaming_app']:,.0f}/s, "
        f"ratio {ip['ratio']:.2f}; CPU per push {ip['raw_cpu_us_per_push']} us against "
        f"{ip['streaming_app_cpu_us_per_push']} us (drains included)",
        "",
        "End to end (one Daphne worker; CPU: the worker's per delivery, the producer's per push)",
    ]
    header: tuple[str, ...] = ("scenario", "system", "layer", "expected", "delivered", "lost",
                               "dup", "reordered", "chunks/s", "p50 ms", "p99 ms",
                               "Daphne us/dlv", "producer us/push")  # fmt: skip
    lines += table(header, [
        (r["scenario"], r["system"], r["layer"], r["expected"], r["delivered"], r["lost"],
         r["duplicated"], r["reordered"], r["rate"], r["p50_ms"], r["p99_ms"],
         r["daphne_cpu_us_per_delivery"], r["producer_cpu_us_per_push"])
        for r in report["end_to_end"]
    ])  # fmt: skip
    for r in report["end_to_end"]:
        for note in r["notes"]:
            lines.append(f"  ({r['scenario']}) {r['system']} {r['layer']}: {note}")
    if report.get("scaling"):
        lines += ["", "Scaling at 10 chunks/s per stream, staggered (streams x clients per stream)"]
        header = ("streams x clients", "system", "layer", "offered/s", "expected", "delivered",
                  "lost", "dup", "reordered", "chunks/s", "p50 ms", "p99 ms", "Daphne us/dlv",
                  "producer us/push")  # fmt: skip
        lines += table(header, [
            (r["scenario"], r["system"], r["layer"], r["streams"] * r["clients_per_stream"] * 10,
             r["expected"], r["delivered"], r["lost"], r["duplicated"], r["reordered"], r["rate"],
             r["p50_ms"], r["p99_ms"], r["daphne_cpu_us_per_delivery"],
             r["producer_cpu_us_per_push"])
            for r in report["scaling"]
        ])  # fmt: skip
        for r in report["scaling"]:
            for note in r["notes"]:
                lines.append(f"  {r['scenario']} {r['system']}: {note}")
    if report.get("connects"):
        lines += ["", "Connects (handshake until the client can receive) and idle CPU"]
        idle = {(r["system"], r["layer"]): r for r in report.get("idle", [])}
        header = ("system", "layer", "database", "clients", "in flight", "connects/s",
                  "idle clients", "idle CPU %")  # fmt: skip
        lines += table(header, [
            (r["system"], r["layer"], r["database"], r["clients"], r["concurrency"],
             r["per_second"], idle[(r["system"], r["layer"])]["clients"],
             idle[(r["system"], r["layer"])]["cpu_percent"])
            for r in report["connects"]
        ])  # fmt: skip
    if report.get("slow_clients"):
        lines += bench_slow.render(report["slow_clients"])
    if report.get("join"):
        lines += bench_join.render(report["join"])
    if report.get("coalesce"):
        lines += bench_coalesce.render(report["coalesce"])
    if report.get("frame_batch"):
        lines += bench_batch.render(report["frame_batch"])
    lines += [
        "",
        f"Goals: streaming_app against {BASELINE} on the same layer (slow clients: "
        "against itself without them)",
    ]
    header = ("goal", "where", "layer", "streaming_app", BASELINE, "ratio", "goal", "verdict")
    lines += table(header, [
        (g["goal"], g["where"], g["layer"], g["streaming_app"], g["baseline"],
         "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x", f"{g['target']}x",
         "met" if g["met"] else "NOT MET")
        for g in report["goals"]
    ])  # fmt: skip
    missed = [g for g in report["goals"] if not g["met"]]
    lines.append(f"{len(report['goals']) - len(missed)} of {len(report['goals'])} goals met"
                 + (f"; NOT MET: {len(missed)}" if missed else ""))  # fmt: skip
    return lines
