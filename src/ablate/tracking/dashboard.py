"""What the MLflow UI shows of ablate's runs: links into the model-training view, saved views with the key
columns, run descriptions with the key numbers, numbers printed to 4 significant digits.

MLflow's runs table shows the columns of the browser's own saved state, or those of a *saved view*: an
experiment tag `mlflow.sharedViewState.<id>` holding `{"name", "createdAt", "updatedAt", "state"}` (state: the
table's columns, sort and filter as JSON). Saved views are listed under "Views" in the UI and opened by the
link `#/experiments/<id>/runs?viewStateShareKey=<id>`. The UI has no server-side default for the columns of
a browser that never opened a view, so ablate saves one view per experiment (the key metrics and the
components) and one per sweep (the key metrics and the swept keys, the sweep's runs only), and prints their
links.
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
VIEW_TAG = "mlflow.sharedViewState."
NOTE_TAG = "mlflow.note.content"
WORKFLOW = "workflowType=machine_learning"
KEY_METRICS = ("val/loss", "val/bpb", "perf/tokens_per_s")
COMPONENTS = ("attention.name", "pos.name", "mlp.name", "norm.name", "model.name", "seed")
EXPERIMENT_VIEW = "ablate-runs"
SWEEP_VIEW_PREFIX = "ablate-sweep-"
KEEP_SWEEP_VIEWS = 20  # the UI lists every saved view; older sweeps' views are dropped


def significant(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant digits, without an exponent between 1e-4 and 1e6: 3.457, 34,900."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    if exponent >= 6 or exponent < -4:
        return f"{value:.{digits - 1}e}"
    decimals = digits - 1 - exponent
    if decimals > 0:
        return f"{value:.{decimals}f}"
    return f"{round(value, decimals):,.0f}"


def server(uri: str) -> tuple[str | None, str | None]:
    """The UI's address for the store `uri` and the command that starts it (None when it is the server);
    (None, None) for a store whose UI address is unknown here (databricks)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return uri.rstrip("/"), None
    if uri == "databricks" or scheme.startswith("databricks"):
        return None, None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def _link(uri: str, page: str) -> str | None:
    base, start = server(uri)
    if base is None:
        return None
    return f"{base}/{page}" + (f"  (start the UI with: {start})" if start else "")


def run_page(experiment_id: str, run_id: str) -> str:
    """The run's page in the model-training view (MLflow's UI opens the GenAI one without workflowType)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def view_page(experiment_id: str, view_id: str) -> str:
    """The experiment's runs table as the saved view `view_id` lays it out."""
    return f"#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={view_id}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page on the UI of the store `uri`, with how to start that UI when there is no server."""
    return _link(uri, run_page(experiment_id, run_id))


def view_link(uri: str, experiment_id: str, view_id: str) -> str | None:
    return _link(uri, view_page(experiment_id, view_id))


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: metrics.`val/loss`, params.`attention.name`."""
    return f"{kind}.`{key}`"


def view_state(params: list[str], search_filter: str = "") -> dict[str, Any]:
    """The runs table with the key metrics and `params` as columns, best val/loss first."""
    return {"selectedColumns": [column("metrics", m) for m in KEY_METRICS] + [column("params", p) for p in params],
            "searchFilter": search_filter, "orderByKey": column("metrics", "val/loss"), "orderByAsc": True}


def save_view(client: Any, experiment_id: str, view_id: str, name: str, state: dict[str, Any]) -> None:
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, VIEW_TAG + view_id, json.dumps(envelope))


def prepare_experiment(client: Any, experiment_id: str, tags: dict[str, str]) -> None:
    """Give the experiment a saved view of the key columns (once: a user's edits of it stay)."""
    if VIEW_TAG + EXPERIMENT_VIEW not in tags:
        save_view(client, experiment_id, EXPERIMENT_VIEW, "ablate: key metrics and components",
                  view_state(list(COMPONENTS)))


def save_sweep_view(client: Any, experiment_id: str, parent_run_id: str, name: str, params: list[str]) -> str:
    """A saved view of the sweep's runs with the key metrics and the swept `params`; returns its id.
    The oldest sweep views beyond KEEP_SWEEP_VIEWS are removed."""
    view_id = SWEEP_VIEW_PREFIX + parent_run_id[:12]
    state = view_state(params, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    save_view(client, experiment_id, view_id, f"{name} ({parent_run_id[:8]})", state)
    tags = client.get_experiment(experiment_id).tags
    sweeps = sorted((_created(value), key) for key, value in tags.items()
                    if key.startswith(VIEW_TAG + SWEEP_VIEW_PREFIX))
    for _, key in sweeps[:-KEEP_SWEEP_VIEWS]:
        client.delete_experiment_tag(experiment_id, key)
    return view_id


def _created(envelope: str) -> int:
    try:
        return int(json.loads(envelope)["createdAt"])
    except (ValueError, KeyError, TypeError):
        return 0


def note(metrics: dict[str, float], command: str | None) -> str | None:
    """A run's description: its key numbers and the command that reproduces it (None without numbers)."""
    shown = [f"{key} **{significant(metrics[key])}**" for key in KEY_METRICS if key in metrics]
    if not shown:
        return None
    return " · ".join(shown) + (f"\n\n`{command}`" if command else "")


def param_key(axis: str) -> str:
    """The param that holds a swept key's value: a config group's choice is `<group>.name`."""
    from ablate.cli import groups

    return f"{axis}.name" if axis in groups() and axis != "experiment" else axis


def job_log_file() -> Path | None:
    """Hydra's log file of the running job (`<output dir>/<job name>.log`); None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    try:
        runtime, job = HydraConfig.get().runtime, HydraConfig.get().job
        return Path(runtime.output_dir) / f"{job.name}.log"
    except Exception:  # noqa: BLE001 - a config without a job's runtime: no log file
        return None


def read_job_log(path: Path | None) -> str | None:
    """The log file's text once every handler has written it out; None when there is no such file."""
    if path is None or not path.is_file():
        return None
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text(errors="replace")
