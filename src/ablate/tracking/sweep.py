"""The MLflow parent run of a multirun: opened before the first job, closed after the last.

Each job finds the parent's id in `<sweep dir>/parent_run_id` and tags its own run as a child, so
launchers that run jobs in other processes (joblib, Slurm) nest the same way as the basic one.
No parent, no sweep: Hydra turns a callback's exception into a warning, so a store that is refused
or a parent run that cannot be made ends the multirun with SystemExit (not an Exception), before
any job starts.
"""
from __future__ import annotations

import atexit
import contextlib
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ablate.tracking.mlflow import PARENT_TAG

PARENT_FILE = "parent_run_id"


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


class SweepParentRun(Callback):
    def __init__(self) -> None:
        self.tracker: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.name == "none":
            return
        from ablate.tracking.mlflow import open_tracker, resolve_uri
        from ablate.tracking.store import check_tracking

        problems = check_tracking(config)
        if problems:
            _stop("the configuration cannot run:\n  - " + "\n  - ".join(problems), status=2)
        overrides = " ".join(config.hydra.overrides.task)
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            self.tracker = open_tracker(
                config, run_name=f"sweep {sweep_dir.name}", tags={"ablate.sweep": overrides or "(defaults)"}
            )
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / PARENT_FILE).write_text(self.tracker.run_id)
        except Exception as err:  # noqa: BLE001 - every failure stops the sweep, named
            if self.tracker is not None:
                with contextlib.suppress(Exception):
                    self.tracker.finish("FAILED", error=err)
            _stop(f"the sweep's parent MLflow run could not be created in {resolve_uri(config)} "
                  f"({type(err).__name__}: {err}); no job was started", status=1)
        atexit.register(self.close)  # also when a failed job makes the sweeper raise

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
        self.tracker.finish("FAILED" if failed or not children else "FINISHED")


def _stop(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)
