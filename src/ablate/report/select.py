"""Store queries: which runs a report covers (a sweep's children, or every run of an experiment).

A sweep is a parent run tagged `ablate.sweep`; its children carry `mlflow.parentRunId`. Bad input (an
unknown experiment, run id or metric) raises ReportError naming what exists in the store.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from ablate.tracking.mlflow import PARENT_TAG

SWEEP_TAG = "ablate.sweep"
ALL = "all"
PAGE = 10000


class ReportError(Exception):
    """The report cannot be built from this input; the message says what exists and how to ask for it."""


@dataclass
class Selection:
    experiment: str
    parent: Any | None  # the sweep's parent run; None when reporting every run of the experiment
    runs: list[Any]  # earliest first

    @property
    def label(self) -> str:
        return f"{self.experiment}-{self.parent.info.run_id[:8] if self.parent else ALL}"

    def describe(self) -> str:
        if self.parent is None:
            return f"every run of experiment '{self.experiment}' outside sweep parents ({len(self.runs)} runs)"
        info = self.parent.info
        overrides = self.parent.data.tags.get(SWEEP_TAG, "")
        return (f"sweep {info.run_id} of experiment '{self.experiment}', started {started(self.parent)}, "
                f"overrides `{overrides}` ({len(self.runs)} runs)")


def started(run: Any) -> str:
    stamp = run.info.start_time
    if stamp is None:
        return "(unknown time)"
    return datetime.datetime.fromtimestamp(stamp / 1000).strftime("%Y-%m-%d %H:%M:%S")


def search(client: Any, experiment_ids: list[str], filter_string: str = "",
           ascending: bool = True) -> list[Any]:
    """Every active run matching the filter, all pages, ordered by start time."""
    order = ["attributes.start_time " + ("ASC" if ascending else "DESC")]
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE, order_by=order, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiments(client: Any) -> dict[str, str]:
    return {e.experiment_id: e.name for e in client.search_experiments()}


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(_experiments(client).values())
        raise ReportError(f"--experiment: no experiment named '{name}' in {client.tracking_uri}; "
                          f"experiments there: {', '.join(names) or '(none)'}")
    return exp.experiment_id


def _sweeps(client: Any, experiment_ids: list[str]) -> list[Any]:
    """The sweep parents of these experiments, latest first."""
    return search(client, experiment_ids, f"tags.`{SWEEP_TAG}` != ''", ascending=False)


def _sweep_list(client: Any, limit: int = 10) -> str:
    names = _experiments(client)
    sweeps = _sweeps(client, list(names))
    if not sweeps:
        return "this store holds no sweep"
    lines = [f"  {r.info.run_id}  {names.get(r.info.experiment_id, '?')}  {started(r)}  "
             f"{r.data.tags.get(SWEEP_TAG, '')}" for r in sweeps[:limit]]
    more = f"\n  ... and {len(sweeps) - limit} more" if len(sweeps) > limit else ""
    return "sweeps in this store, latest first:\n" + "\n".join(lines) + more


def _parent(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(f"--sweep: no run '{run_id}' in {client.tracking_uri}; {_sweep_list(client)}") from None
    if SWEEP_TAG not in run.data.tags:
        parent = run.data.tags.get(PARENT_TAG)
        hint = f"it is a child of sweep {parent}" if parent else "it is a single run"
        raise ReportError(f"--sweep: run '{run_id}' is not a sweep's parent run ({hint}); {_sweep_list(client)}")
    return run


def select(client: Any, sweep: str | None = None, experiment: str | None = None) -> Selection:
    """The runs to report: `sweep` is a parent run id, 'all' (with `experiment`) or None (the latest sweep
    of `experiment`, or of the whole store)."""
    names = _experiments(client)
    if sweep == ALL:
        if experiment is None:
            raise ReportError(f"--sweep all needs --experiment NAME; experiments: {', '.join(sorted(names.values()))}")
        runs = [r for r in search(client, [_experiment_id(client, experiment)]) if SWEEP_TAG not in r.data.tags]
        if not runs:
            raise ReportError(f"experiment '{experiment}' holds no runs outside sweep parents")
        return Selection(experiment, None, runs)
    if sweep is not None:
        parent = _parent(client, sweep)
        name = names.get(parent.info.experiment_id, parent.info.experiment_id)
        if experiment is not None and experiment != name:
            _experiment_id(client, experiment)  # an unknown name is reported as such first
            raise ReportError(f"--sweep {sweep} belongs to experiment '{name}', not '{experiment}'")
    else:
        ids = [_experiment_id(client, experiment)] if experiment is not None else list(names)
        sweeps = _sweeps(client, ids)
        if not sweeps:
            where = f"experiment '{experiment}'" if experiment else f"the store {client.tracking_uri}"
            raise ReportError(f"{where} holds no sweep (a parent run tagged {SWEEP_TAG}); run "
                              f"`python run.py -m ...` first, or pass --experiment NAME --sweep all")
        parent = sweeps[0]
        name = names[parent.info.experiment_id]
    runs = search(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    if not runs:
        raise ReportError(f"sweep {parent.info.run_id} has no child runs yet; {_sweep_list(client)}")
    return Selection(name, parent, runs)


def metric_names(runs: list[Any]) -> list[str]:
    return sorted({key for r in runs for key in r.data.metrics})


def check_metric(runs: list[Any], metric: str) -> None:
    present = metric_names(runs)
    if metric not in present:
        raise ReportError(f"--metric: no run of this selection logged '{metric}'; metrics present: "
                          f"{', '.join(present) or '(none)'}")


def history(client: Any, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """A metric's (steps, values), one value per step (the last one logged), ordered by step."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    steps = sorted(by_step)
    return steps, [by_step[s][1] for s in steps]
