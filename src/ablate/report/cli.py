"""python -m ablate.report: the console entry point of a sweep report."""
from __future__ import annotations

import argparse
import sys

from ablate.report.build import make_report
from ablate.report.select import ALL, ReportError

USAGE_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ablate.report",
        description="A sweep as evidence: cells of runs that differ only by seed (mean ± 95%% interval), "
                    "each cell ranked against a baseline cell, plots; written to a folder and logged to the "
                    "sweep's parent run.")
    p.add_argument("run_id", nargs="?", help="the sweep's parent run id (default: the latest sweep in the store)")
    p.add_argument("--sweep", help=f"a parent run id, 'latest', or '{ALL}' (every run of --experiment)")
    p.add_argument("--experiment", help="the latest sweep of this experiment (or with --sweep all, all its runs)")
    p.add_argument("--tracking-uri", help="default: the project's store (tracking.uri, $MLFLOW_TRACKING_URI, "
                                          "else outputs/mlflow.db)")
    p.add_argument("--metric", default="val/loss", help="rank by this metric (default: val/loss, lower is better)")
    p.add_argument("--baseline", help="the baseline cell by its varied params, e.g. 'attention=mha,pos=rope' "
                                      "(default: the cell of the sweep's earliest run)")
    p.add_argument("--out", help="output folder (default: <paths.output_dir>/reports/<experiment>-<parent id>/)")
    p.add_argument("--no-log", action="store_true", help="do not log the folder to the sweep's parent run")
    return p


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    args = parser().parse_args(argv)
    if args.run_id and args.sweep and args.run_id != args.sweep:
        print(f"error: two sweeps asked for: '{args.run_id}' and --sweep '{args.sweep}'; give one", file=sys.stderr)
        return USAGE_ERROR
    sweep = args.run_id or args.sweep
    if args.tracking_uri:
        uri = args.tracking_uri
    else:
        from ablate.config import compose
        from ablate.tracking.mlflow import resolve_uri

        uri = resolve_uri(compose())
    problem = _store_problem(uri, writes=not args.no_log)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return USAGE_ERROR
    try:
        report = make_report(MlflowClient(uri), None if sweep in (None, "latest") else sweep,
                             experiment=args.experiment, out_dir=args.out, metric=args.metric,
                             baseline=args.baseline, log_to_parent=not args.no_log)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(report.selection.describe(), "", report.cells_md, "", f"baseline: {report.baseline}", report.ranking_md,
          "", report.noise.statement(), *report.notes, f"report: {report.folder}", sep="\n")
    return 0


def _store_problem(uri: str, writes: bool) -> str | None:
    """Why `uri` is not a store to report on: a report reads runs, so a missing sqlite file is an error
    (opening it would create an empty store); one that logs the report to the sweep's parent run also
    needs what a run needs of its store (`check_store`: a writable MLflow store)."""
    from ablate.tracking.store import check_store, sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return (f"no MLflow store at {db} ({uri}); pass the store the runs were logged to with --tracking-uri, "
                "or run `python run.py -m ...` first")
    problems = check_store(uri) if writes else []
    return "; ".join(problems) if problems else None

