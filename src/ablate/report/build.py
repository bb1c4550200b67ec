"""A report's folder: the tables (markdown and CSV), the plots, report.md; logged to the sweep's parent run."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ablate.report.plots import PLOT_FILES, write_plots
from ablate.report.select import Selection, check_metric, history, select
from ablate.report.tables import (HIGHER_IS_BETTER, IGNORED_PARAMS, IGNORED_PREFIXES, Noise, cell_table,
                                  extrapolation_notes, find_cell, format_cells, format_ranking, frame, noise,
                                  ranking, report_metrics, short)

TABLE_FILES = ("cells.md", "cells.csv", "ranking.md", "ranking.csv", "report.md")
ARTIFACT_DIR = "report"


@dataclass
class Report:
    folder: Path
    selection: Selection
    cells_md: str
    ranking_md: str
    baseline: str
    noise: Noise
    notes: list[str] = field(default_factory=list)  # what the console should say besides the tables


def default_folder(selection: Selection) -> Path:
    """<paths.output_dir>/reports/<experiment>-<parent id first 8, or 'all'>/"""
    from ablate.config import compose

    return Path(compose().paths.output_dir).resolve() / "reports" / selection.label


def make_report(client: Any, parent_run_id: str | None, experiment: str | None = None,
                out_dir: Path | str | None = None, metric: str = "val/loss", baseline: str | None = None,
                log_to_parent: bool = True) -> Report:
    selection = select(client, parent_run_id, experiment)
    check_metric(selection.runs, metric)
    sweep = frame(selection.runs)
    if baseline:
        base, why = find_cell(sweep, baseline), f"chosen with --baseline '{baseline}'"
    else:
        base, why = sweep.cells[0], "the cell of the sweep's earliest run; --baseline to choose another"
    metrics = report_metrics(sweep, metric)
    table = cell_table(sweep, metrics, metric)
    ranked = ranking(sweep, metric, base, list(table.index))
    folder = Path(out_dir) if out_dir is not None else default_folder(selection)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*TABLE_FILES, *PLOT_FILES):  # a previous report of the same sweep
        (folder / name).unlink(missing_ok=True)
    cells_md = format_cells(table, metrics, sweep.varied).to_markdown(index=False)
    ranking_md = format_ranking(ranked, metric).to_markdown()
    (folder / "cells.md").write_text(cells_md + "\n")
    (folder / "ranking.md").write_text(ranking_md + "\n")
    table.to_csv(folder / "cells.csv")
    ranked.to_csv(folder / "ranking.csv")
    plots = write_plots(folder, sweep, table, partial(history, client))
    report = Report(folder, selection, cells_md, ranking_md, base, noise(sweep))
    report.notes += [f"note: {repeat}" for repeat in sweep.repeats()]
    parent = selection.parent
    if parent is not None and log_to_parent:
        where = f"logged as artifacts of the sweep's parent run {parent.info.run_id} under {ARTIFACT_DIR}/"
    else:
        why_not = "no parent run: every run of the experiment" if parent is None else "log_to_parent is off"
        where = f"not logged to MLflow ({why_not})"
        report.notes.append(f"note: the report is {where}")
    text = document(report, sweep, metric, why, extrapolation_notes(sweep), plots, client.tracking_uri, where)
    (folder / "report.md").write_text(text)
    if parent is not None and log_to_parent:
        client.log_artifacts(parent.info.run_id, str(folder), ARTIFACT_DIR)
    return report


def build_report(client: Any, parent_run_id: str | None, experiment: str | None = None,
                 out_dir: Path | str | None = None, metric: str = "val/loss", baseline: str | None = None,
                 log_to_parent: bool = True) -> Path:
    """Write the report of a sweep (`parent_run_id`; None: the latest sweep of `experiment`, or of the
    store; 'all': every run of `experiment`) into a folder and return it. Raises ReportError on bad input."""
    return make_report(client, parent_run_id, experiment, out_dir, metric, baseline, log_to_parent).folder


def document(report: Report, sweep: Any, metric: str, why: str, gaps: dict[str, str],
             plots: list[tuple[str, str]], uri: str, where: str) -> str:
    runs = sweep.runs
    statuses = runs.status.value_counts()
    status_text = ", ".join(f"{n} {s.lower()}" for s, n in statuses.items())
    seeds = sorted(set(runs.seed), key=lambda s: (len(str(s)), str(s)))
    ignored = ", ".join([*IGNORED_PARAMS, *(p + "*" for p in IGNORED_PREFIXES)])
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    lines = [
        f"# Ablation report: {report.selection.label}",
        "",
        "## Selection",
        "",
        f"- store: `{uri}`",
        f"- {report.selection.describe()}",
        f"- runs: {len(runs)} ({status_text}); statistics use the finished runs, one per cell and seed",
        *(f"- {repeat}" for repeat in sweep.repeats()),
        f"- cells: {len(sweep.cells)}, told apart by {', '.join(map(short, sweep.varied)) or '(nothing)'} "
        f"(not by {ignored})",
        f"- seeds: {', '.join(map(str, seeds))}",
        f"- ranked by `{metric}` ({better} is better); baseline: **{report.baseline}** ({why})",
        f"- this folder is {where}",
        "",
        "## Cells",
        "",
        "Mean ± 95% t-interval half-width over the seeds of each cell; `(n=k)` when only k finished runs logged "
        "the metric; n/a when none did.",
        "",
        report.cells_md,
        "",
    ]
    if gaps:
        lines += ["Length extrapolation n/a:", ""] + [f"- {cell}: {reason}" for cell, reason in gaps.items()] + [""]
    lines += [
        f"## Ranking against {report.baseline}",
        "",
        f"Δ = cell − baseline in `{metric}`. Its 95% interval is paired over seeds when both cells hold the same "
        "seeds (a seed fixes the data order and the validation documents), else Welch's; *within noise* when "
        "the interval contains 0.",
        "",
        report.ranking_md,
        "",
        "## Noise",
        "",
        report.noise.statement(),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{caption}]({name})" for caption, name in plots] or ["(no plot: the runs lack the metrics)"]
    return "\n".join(lines) + "\n"
