"""Sweep reports: the runs of an experiment (or of one sweep) as a table, grouped over seeds.

    python -m ablate.report [--experiment NAME] [--sweep PARENT_RUN_ID|latest] [--metric val/loss]

Columns are the parameters that differ between the runs; runs that differ only by seed are one row
with the mean, the spread (95% t-interval half width) and the count of seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

METRICS = ("val/loss", "val/bpb", "perf/tokens_per_s")
# Student t quantiles (two-sided 95%) for n-1 degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Row:
    key: tuple[tuple[str, str], ...]  # the varied parameters, seed excluded
    values: dict[str, list[float]]
    statuses: list[str]

    def mean(self, metric: str) -> float:
        vals = self.values.get(metric, [])
        return statistics.fmean(vals) if vals else math.nan

    def ci95(self, metric: str) -> float:
        vals = self.values.get(metric, [])
        if len(vals) < 2:
            return math.nan
        return T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))


def varied_params(runs: list[Any], ignore: tuple[str, ...] = ("seed",)) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    varied = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return [k for k in varied if k not in ignore and not k.startswith(("paths.", "tracking."))]


def group(runs: list[Any], metrics: tuple[str, ...] = METRICS) -> tuple[list[str], list[Row]]:
    columns = varied_params(runs)
    rows: dict[tuple, Row] = {}
    for r in runs:
        key = tuple((c, r.data.params.get(c, "")) for c in columns)
        row = rows.setdefault(key, Row(key, {m: [] for m in metrics}, []))
        row.statuses.append(r.info.status)
        for m in metrics:
            if m in r.data.metrics and r.info.status == "FINISHED":
                row.values[m].append(r.data.metrics[m])
    return columns, list(rows.values())


def format_table(columns: list[str], rows: list[Row], sort_by: str = "val/loss",
                 metrics: tuple[str, ...] = METRICS) -> str:
    rows = sorted(rows, key=lambda r: (math.isnan(r.mean(sort_by)), r.mean(sort_by)))
    head = [c.removesuffix(".name") for c in columns] + list(metrics) + ["runs"]
    body = []
    for row in rows:
        cells = [value for _, value in row.key]
        for m in metrics:
            mean, ci = row.mean(m), row.ci95(m)
            cells.append("-" if math.isnan(mean) else f"{mean:.4g}" + ("" if math.isnan(ci) else f" ± {ci:.2g}"))
        failed = sum(s != "FINISHED" for s in row.statuses)
        cells.append(f"{len(row.statuses)}" + (f" ({failed} not finished)" if failed else ""))
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def sweep_runs(client: Any, experiment: str, sweep: str | None) -> list[Any]:
    """The child runs of one sweep (its parent id, or 'latest'), or every run of the experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment named '{experiment}' in this store; see --experiment")
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
    if sweep == "latest":
        parents = [r for r in runs if "ablate.sweep" in r.data.tags]
        if not parents:
            raise SystemExit(f"experiment '{experiment}' holds no sweep; run with -m first")
        sweep = parents[0].info.run_id
    if sweep:
        return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep]
    return [r for r in runs if "ablate.sweep" not in r.data.tags]
