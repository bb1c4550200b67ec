"""Shared test helpers: the tiny run configuration, fresh MLflow stores, and the CUDA skip.

`tiny_cfg(*overrides)` composes the smallest configuration that trains for real (a run of about a
second on CPU); `TINY` holds its overrides for `python run.py` command lines; `FORKED` starts processes
without paying for the imports again; `run_main` runs run.py inside the test process. The `store`
fixture is a new sqlite MLflow store for one test, a copy of `store_template` (made once per session:
creating a store's schema costs seconds).
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import shutil
import sys

# One thread per process: the test models are tiny, and tests run processes side by side (jobs, ranks,
# workers) on CI's two cores, where threads that wait on each other cost far more than they give.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every key spelled out: one layer, short rows, 12 steps, no end-of-run extras (samples, longer contexts).
TINY = (
    "model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.context=64",
    "train.steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.log_every=2", "train.batch_size=4",
    "train.progress=false", "data.max_val_batches=2", "eval.samples=0", "eval.context_multiples=[1]",
)


# Processes that tests start (jobs to kill, stores to race) fork from one server that imported torch,
# MLflow and ablate once: a job costs its own work, not seconds of imports in a new interpreter.
FORKED = multiprocessing.get_context("forkserver")
FORKED.set_forkserver_preload(["ablate.experiment", "mlflow.store.tracking.sqlalchemy_store", "torch._inductor"])


def tiny_cfg(*overrides: str):
    """The config `python run.py <TINY> <overrides>` runs."""
    from ablate.config import compose

    return compose([*TINY, *overrides])


def runs_in(uri: str, experiment: str = "ablate"):
    """(client, runs of `experiment`) in the store `uri`; no runs if the experiment does not exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id], max_results=1000))


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's (step, value) pairs in step order."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty sqlite MLflow store, its schema made: copy it (see `store`), never write to it."""
    from ablate.tracking.store import open_client

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    open_client(f"sqlite:///{db}")  # creates and migrates the schema
    return db


@pytest.fixture
def store(store_template, tmp_path) -> str:
    """The URI of a new, empty sqlite MLflow store in this test's folder."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="module")
def module_store(store_template, tmp_path_factory) -> str:
    """A new sqlite MLflow store shared by the tests of one module."""
    folder = tmp_path_factory.mktemp("store")
    shutil.copyfile(store_template, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


# run.py inside the test process leaves Python's logging as it is (no Hydra log files or handlers)
QUIET_HYDRA = ("hydra/job_logging=none", "hydra/hydra_logging=none")


@pytest.fixture
def run_main(monkeypatch, capsys, tmp_path):
    """`python run.py <args>` inside this process, as its `__main__`: (exit status, what it printed).
    Hydra's run folder goes to the test's folder; it does not configure logging."""
    from hydra.core.global_hydra import GlobalHydra

    from ablate.config import project_root

    def main(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["run.py", *args, *QUIET_HYDRA, f"hydra.run.dir={tmp_path}/run"])
        monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # run.py sets it; restored after the test
        capsys.readouterr()
        try:
            runpy.run_path(str(project_root() / "run.py"), run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            GlobalHydra.instance().clear()
        out = capsys.readouterr()
        return code, out.out + out.err

    return main


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
