"""MLflow tracking: one run per job, metrics buffered and sent in batches, status always closed."""
from __future__ import annotations

import os
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PARENT_TAG = "mlflow.parentRunId"


def resolve_uri(cfg: DictConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite store at <root>/outputs/mlflow.db."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(cfg.paths.output_dir).resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def flatten(cfg: DictConfig) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = str(node)[:6000]

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def git_commit(root: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """No-op tracker (tracking=none); the MLflow tracker below fills in each call."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None: ...


NullTracker = Tracker


class MlflowTracker(Tracker):
    FLUSH_SECONDS = 10.0  # metrics reach the store at least this often, and at every evaluation

    def __init__(self, uri: str, experiment: str, run_name: str | None, tags: dict[str, str],
                 run_id: str | None = None):
        from ablate.tracking.store import open_client

        self.client = open_client(uri)
        self.uri = uri
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        if run_id is not None:  # resuming: reopen the same run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self.finished = False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= 1000 or time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        if self.finished:
            return
        try:
            self.flush()
            if error is not None:
                message = f"{type(error).__name__}: {error}"
                self.set_tags({"ablate.error": message[:5000]})
                self.log_text("".join(traceback.format_exception(error)), "error.txt")
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self.finished = True


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if missing; safe when several jobs race to create it."""
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(uri))
        except MlflowException:
            time.sleep(0.2)  # another job created it first: read it back
    raise RuntimeError(f"could not create or read the MLflow experiment '{name}' at {uri}")


def open_tracker(cfg: DictConfig, run_name: str | None, tags: dict[str, str],
                 run_id: str | None = None) -> Tracker:
    if cfg.tracking.name == "none":
        return NullTracker()
    return MlflowTracker(resolve_uri(cfg), cfg.tracking.experiment, run_name, tags, run_id=run_id)
