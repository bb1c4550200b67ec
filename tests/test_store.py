"""The MLflow store: concurrent processes on a new store, and the checks made before any compute."""
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from ablate.tracking.store import check_store, check_writable, open_client

PROCESSES, ROUNDS = 6, 10


def _open_log_close(index, uris, barrier, results):
    """One process: on each new store, at the same moment as the others, make a run and log a metric."""
    from ablate.tracking.mlflow import MlflowTracker

    for round_, uri in enumerate(uris):
        barrier.wait(timeout=120)
        try:
            tracker = MlflowTracker(uri, "ablate", f"job {index}", tags={"job": str(index)})
            tracker.log_metrics({"m": float(index)}, step=0)
            tracker.finish()
            results.put((round_, index, None))
        except Exception as err:  # noqa: BLE001 - the test reports every failure
            results.put((round_, index, f"{type(err).__name__}: {str(err)[:160]}"))


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    uris = [f"sqlite:///{tmp_path}/round{r}/mlflow.db" for r in range(ROUNDS)]
    ctx = multiprocessing.get_context("spawn")  # imports done before the barrier: the opens really race
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    workers = [ctx.Process(target=_open_log_close, args=(i, uris, barrier, results)) for i in range(PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in range(PROCESSES * ROUNDS)]
    for worker in workers:
        worker.join(timeout=60)
    failures = [o for o in outcomes if o[2] is not None]
    assert not failures, f"{len(failures)}/{len(outcomes)} failed: {failures[:3]}"
    for uri in uris:  # every store is complete and usable afterwards
        client = open_client(uri)
        runs = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
        assert sorted(r.data.metrics["m"] for r in runs) == [float(i) for i in range(PROCESSES)]
        assert all(r.info.status == "FINISHED" for r in runs)
