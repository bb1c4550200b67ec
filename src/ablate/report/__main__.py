"""python -m ablate.report: a sweep's runs as one table, seeds folded into mean ± 95% interval."""
from __future__ import annotations

import argparse

from ablate.report import METRICS, format_table, group, sweep_runs


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from ablate.config import compose
    from ablate.tracking.mlflow import resolve_uri

    parser = argparse.ArgumentParser(prog="python -m ablate.report", description=__doc__)
    parser.add_argument("--tracking-uri", help="default: the project's store (outputs/mlflow.db)")
    parser.add_argument("--experiment", default="ablate")
    parser.add_argument("--sweep", default="latest", help="a parent run id, 'latest', or 'all' for every run")
    parser.add_argument("--metric", default="val/loss", help="sort by this metric (lower first)")
    args = parser.parse_args(argv)
    client = MlflowClient(args.tracking_uri or resolve_uri(compose()))
    runs = sweep_runs(client, args.experiment, None if args.sweep == "all" else args.sweep)
    if not runs:
        print("no runs found")
        return 1
    metrics = tuple(dict.fromkeys((args.metric, *METRICS)))
    columns, rows = group(runs, metrics)
    print(format_table(columns, rows, sort_by=args.metric, metrics=metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
