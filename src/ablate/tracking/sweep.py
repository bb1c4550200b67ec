"""The MLflow parent run of a multirun: opened before the first job, closed after the last.

Each job finds the parent's id in `<sweep dir>/parent_run_id` and tags its own run as a child, so
launchers that run jobs in other processes (joblib, Slurm) nest the same way as the basic one.
The parent is named after the experiment and its axes (`sweep: attention x pos`), holds the sweep's
overrides as params (`sweep.<key>`: the value as written, the comma list of a swept key), saves a view of
the sweep's runs in the MLflow UI, and at the end holds the sweep's report under `report/`.

No parent, no sweep: Hydra turns a callback's exception into a warning, so a store that is refused
or a parent run that cannot be made ends the multirun with SystemExit (not an Exception), before
any job starts.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ablate.tracking.dashboard import NOTE_TAG, param_key, save_sweep_view, view_link, view_page
from ablate.tracking.mlflow import PARENT_TAG
from ablate.tracking.naming import command, sweep_axes, sweep_name, sweep_values, write_axes

PARENT_FILE = "parent_run_id"
LAUNCHER_FILE = "launcher_pid"  # the pid of `python run.py -m`: its worker processes stop when it is gone


def parent_run_id() -> str | None:
    """The sweep's parent run id when called inside a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    path = Path(hc.sweep.dir) / PARENT_FILE
    return path.read_text().strip() if path.exists() else None


def launcher_pid() -> int | None:
    """The pid of the sweep process when this multirun job runs in a worker process it started (a joblib
    launcher), else None: jobs of the basic launcher run inside it, Slurm's under slurmstepd."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    path = Path(HydraConfig.get().sweep.dir) / LAUNCHER_FILE
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if pid == os.getppid() != os.getpid() else None


class SweepParentRun(Callback):
    def __init__(self) -> None:
        self.tracker: Any = None
        self.view: str | None = None  # the id of the saved view of the sweep's runs
        self.report_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / LAUNCHER_FILE).write_text(str(os.getpid()))
        if config.tracking.name == "none":
            return
        from ablate.tracking.mlflow import open_tracker, resolve_uri
        from ablate.tracking.store import check_tracking

        problems = check_tracking(config)
        if problems:
            _stop("the configuration cannot run:\n  - " + "\n  - ".join(problems), status=2)
        overrides = list(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params else None  # an experiment's hydra.sweeper.params
        axes = sweep_axes(overrides, params)
        name = sweep_name(config.hydra.runtime.choices.get("experiment") or "sweep", axes)
        tags = {"ablate.sweep": " ".join(overrides) or "(defaults)", "ablate.sweep_axes": ",".join(axes),
                "ablate.command": command(overrides, multirun=True)}
        try:
            self.tracker = open_tracker(config, run_name=name, tags=tags, job=False)
            self.tracker.log_params({f"sweep.{k}": v for k, v in sweep_values(overrides, params).items()})
            write_axes(sweep_dir, axes)
            (sweep_dir / PARENT_FILE).write_text(self.tracker.run_id)
            self._save_view(name, axes)
            self.report_dir = report_dir(config, self.tracker.client.get_run(self.tracker.run_id))
        except Exception as err:  # noqa: BLE001 - every failure stops the sweep, named
            if self.tracker is not None:
                with contextlib.suppress(Exception):
                    self.tracker.finish("FAILED", error=err)
            _stop(f"the sweep's parent MLflow run could not be created in {resolve_uri(config)} "
                  f"({type(err).__name__}: {err}); no job was started", status=1)
        atexit.register(self.close)  # also when a failed job makes the sweeper raise

    def _save_view(self, name: str, axes: list[str]) -> None:
        tracker = self.tracker
        self.view = save_sweep_view(tracker.client, tracker.experiment_id, tracker.run_id, name,
                                    [*(param_key(a) for a in axes if a != "seed"), "seed"])
        link = view_link(tracker.uri, tracker.experiment_id, self.view)
        if link:
            print(f"the sweep's runs in MLflow: {link}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the parent FAILED if any child failed, else FINISHED, with the counts as metrics."""
        if self.tracker is None or self.tracker.finished:
            return
        client, run_id = self.tracker.client, self.tracker.run_id
        children = client.search_runs(
            [self.tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'"
        )
        failed = [r for r in children if r.info.status != "FINISHED"]
        self.tracker.log_metrics({"sweep/runs": len(children), "sweep/failed": len(failed)}, step=0)
        runs = f"[{len(children)} runs]({view_page(self.tracker.experiment_id, self.view)})" if self.view else \
            f"{len(children)} runs"
        self.tracker.set_tags({NOTE_TAG: f"{runs}, {len(failed)} not finished; the report: `report/report.md` in the "
                                         "artifacts."})
        if children:  # a sweep whose every job was refused has nothing to report
            self._report()
        self.tracker.finish("FAILED" if failed or not children else "FINISHED")

    def _report(self) -> None:
        """Build the sweep's report into the parent's artifacts; a report that fails is said, not raised."""
        from ablate.report import build_report

        try:
            folder = build_report(self.tracker.client, self.tracker.run_id, out_dir=self.report_dir,
                                  log_to_parent=True)
        except Exception as err:  # noqa: BLE001 - the sweep's runs are complete without it
            print(f"the sweep's report could not be built ({type(err).__name__}: {err}); build it with "
                  f"python -m ablate.report {self.tracker.run_id}", file=sys.stderr, flush=True)
            return
        print(f"the sweep's report: {folder} (and under report/ in the parent run's artifacts)", flush=True)


def report_dir(config: DictConfig, parent: Any) -> Path:
    """<paths.output_dir>/reports/<experiment>-<parent id first 8>/, where `python -m ablate.report` puts it
    (named here: the report's own default composes the config, which Hydra refuses inside a multirun)."""
    from ablate.report.select import Selection

    return Path(config.paths.output_dir).resolve() / "reports" / Selection(config.tracking.experiment, parent, []).label


def _stop(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)
