"""MLflow tracking: one run per job, metrics buffered and sent in batches, status always closed."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ablate.processes import identity, is_running
from ablate.tracking.dashboard import NOTE_TAG, job_log_file, note, prepare_experiment, read_job_log, run_link

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


def run_params(cfg: DictConfig, device_type: str) -> dict[str, str]:
    """The run's flattened config less what does not apply to it: `paths.*` (where, not what), `cluster.*`
    unless the job was launched by Slurm, `device_pool` unless it is a multirun job on a GPU host."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    slurm = multirun = False
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        slurm = "slurm" in str(hc.launcher.get("_target_", "")).lower()
        multirun = hc.mode == RunMode.MULTIRUN
    dropped = ["paths."] + ([] if slurm else ["cluster."])
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith(tuple(dropped))}
    if not (multirun and device_type == "cuda"):
        params.pop("device_pool", None)
    return params


def git_commit(root: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """No-op tracker (tracking=none); the MLflow tracker below fills in each call."""

    run_id: str | None = None
    link: str | None = None  # the run's page in the MLflow UI

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None: ...


NullTracker = Tracker


class MlflowTracker(Tracker):
    """Metrics are buffered by `log_metrics` (no store call) and sent by a writer thread at least every
    FLUSH_SECONDS, so the training loop never waits on the store; `flush()` sends them now (evaluations,
    checkpoints, the end of a run)."""

    FLUSH_SECONDS = 10.0

    def __init__(self, uri: str, experiment: str, run_name: str | None, tags: dict[str, str],
                 run_id: str | None = None, log_file: Path | None = None):
        from ablate.tracking.store import open_client

        self.client = open_client(uri)
        self.uri = uri
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        end_dead_runs(self.client, self.experiment_id)
        # per metric key, the highest step the store held when this run was reopened: a resumed run
        # re-computes the steps after its checkpoint, and those already logged are not logged again
        self._logged: dict[str, int] = {}
        if run_id is not None:  # resuming: reopen the same run
            self._logged = reopen_run(self.client, run_id, uri)
            self.run_id = run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, **process_tags()})
            self.run_id = run.info.run_id
        # the run's description at the end: the last value of each key metric and the command
        self.latest: dict[str, float] = {}
        self.command, self.log_file = tags.get("ablate.command"), log_file
        self.link = run_link(uri, self.experiment_id, self.run_id)
        if self.link:
            print(f"MLflow run {run_name or self.run_id}: {self.link}", flush=True)
        self._buffer: list[Any] = []
        self._buffer_lock, self._send_lock = threading.Lock(), threading.Lock()
        self._wake, self._writer_error = threading.Event(), None
        self.finished = False
        self._writer = threading.Thread(target=self._write_loop, name="ablate-mlflow", daemon=True)
        self._writer.start()

    def __getstate__(self) -> dict[str, Any]:
        """A copy (a launcher pickles the sweep's callbacks for its workers) keeps the run's identity but
        not its writer thread: it never writes; the run's own process does."""
        state = dict(self.__dict__)
        for key in ("_buffer_lock", "_send_lock", "_wake", "_writer"):
            state.pop(key, None)
        return {**state, "_buffer": [], "finished": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._buffer_lock, self._send_lock, self._wake, self._writer = threading.Lock(), threading.Lock(), \
            threading.Event(), None

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
        values = {k: float(v) for k, v in metrics.items()}
        self.latest.update(values)
        with self._buffer_lock:
            self._buffer += [Metric(k, v, now, step) for k, v in values.items() if step > self._logged.get(k, -1)]
            if len(self._buffer) >= 1000:
                self._wake.set()

    def _write_loop(self) -> None:
        while not self.finished:
            self._wake.wait(self.FLUSH_SECONDS)
            self._wake.clear()
            try:
                self._send()
            except Exception as err:  # noqa: BLE001 - raised by the next flush(), in the run's own thread
                self._writer_error = err

    def _send(self) -> None:
        with self._send_lock:
            with self._buffer_lock:
                pending, self._buffer = self._buffer, []
            for i in range(0, len(pending), 1000):
                try:
                    self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])
                except BaseException:
                    with self._buffer_lock:  # nothing is lost: the rest goes back, in order
                        self._buffer = pending[i:] + self._buffer
                    raise

    def flush(self) -> None:
        error, self._writer_error = self._writer_error, None
        if error is not None:
            raise error
        self._send()

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
            self._describe()
        finally:
            self.finished = True
            self._wake.set()
            self.client.set_terminated(self.run_id, status=status)

    def _describe(self) -> None:
        """The run's description (key numbers, command) and Hydra's log of the job as `run.log`; a store
        that refuses them is reported, not raised: the run itself is complete."""
        try:
            text = note(self.latest, self.command)
            if text:
                self.set_tags({NOTE_TAG: text})
            log = read_job_log(self.log_file)
            if log is not None:
                self.log_text(log, "run.log")
        except Exception as err:  # noqa: BLE001
            print(f"warning: the description or run.log of MLflow run {self.run_id} was not saved "
                  f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)


# who runs a run: set when it is created or reopened, read to end the runs of processes that are gone
HOST_TAG, PID_TAG, START_TAG, END_TAG = "ablate.host", "ablate.pid", "ablate.pid_start", "ablate.end_reason"


def process_tags() -> dict[str, str]:
    me = identity()
    return {HOST_TAG: me["host"], PID_TAG: me["pid"], START_TAG: me["start"]}


def reopen_run(client: Any, run_id: str, uri: str) -> dict[str, int]:
    """Mark run `run_id` RUNNING again, run by this process; returns, per metric key, the highest step it holds."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    fix = "start a new run instead with train.resume=false"
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RuntimeError(f"the checkpoint continues MLflow run {run_id}, which the store {uri} does not hold; "
                           f"{fix}") from err
    if run.info.lifecycle_stage == "deleted":
        raise RuntimeError(f"the checkpoint continues MLflow run {run_id}, which was deleted from {uri}; restore it "
                           f"(mlflow runs restore --run-id {run_id}) to resume it, or {fix}")
    # first the tags naming this (live) process, then the status: a run ending dead runs meanwhile spares it
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
    if END_TAG in run.data.tags:
        client.delete_tag(run_id, END_TAG)
    client.update_run(run_id, status="RUNNING")
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def end_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """End KILLED (tag ablate.end_reason=process_gone) the runs of the experiment left RUNNING by processes
    of this host that are gone; returns their ids. A resumable one is reopened by its own command."""
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{identity()['host']}'"
    candidates, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        candidates += [run.info.run_id for run in page if not _alive(run.data.tags)]
        token = page.token
        if not token:
            break
    ended = []
    for run_id in candidates:
        run = client.get_run(run_id)  # read again: its own command may have reopened it meanwhile
        if run.info.status == "RUNNING" and not _alive(run.data.tags):
            client.set_tag(run_id, END_TAG, "process_gone")
            client.set_terminated(run_id, status="KILLED")
            ended.append(run_id)
    return ended


def _alive(tags: dict[str, str]) -> bool:
    """Whether the process a run's tags name still runs (True when they name none: it cannot be judged)."""
    try:
        pid = int(tags.get(PID_TAG, ""))
    except ValueError:
        return True
    return is_running(pid, tags.get(START_TAG, ""))


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if missing; safe when several jobs race to create it."""
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            prepare_experiment(client, exp.experiment_id, exp.tags)
            return exp.experiment_id
        try:
            experiment_id = client.create_experiment(name, artifact_location=_artifact_root(uri))
        except MlflowException:
            time.sleep(0.2)  # another job created it first: read it back
            continue
        prepare_experiment(client, experiment_id, {})
        return experiment_id
    raise RuntimeError(f"could not create or read the MLflow experiment '{name}' at {uri}")


def open_tracker(cfg: DictConfig, run_name: str | None, tags: dict[str, str],
                 run_id: str | None = None, job: bool = True) -> Tracker:
    """The run of a job (`job`: its Hydra log is uploaded at the end), or of a sweep's parent."""
    if cfg.tracking.name == "none":
        return NullTracker()
    return MlflowTracker(resolve_uri(cfg), cfg.tracking.experiment, run_name, tags, run_id=run_id,
                         log_file=job_log_file() if job else None)
