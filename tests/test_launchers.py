"""Sweeps beyond one process: one GPU per job on one host (hydra/launcher=gpus), and Slurm jobs
(hydra/launcher=slurm), checked without GPUs or a cluster."""
import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import FORKED
from hydra.utils import instantiate

from ablate.config import compose
from ablate.train.distributed import gpu_from_pool, physical_gpu

POOL = [0, 1, 2, 3]  # fake CUDA indices: the pool logic never touches a device


def _hold(pool, lock_dir, taken, release, poll_s=0.01):
    with gpu_from_pool(pool, lock_dir, poll_s=poll_s) as index:
        taken.append(index)
        release.wait(timeout=30)


def _start(pool, lock_dir, taken, release):
    thread = threading.Thread(target=_hold, args=(pool, lock_dir, taken, release))
    thread.start()
    return thread


def _wait_for(taken, n):
    deadline = time.time() + 10
    while len(taken) < n and time.time() < deadline:
        time.sleep(0.01)
    return list(taken)


def test_concurrent_jobs_take_different_gpus_and_wait_when_all_are_taken(tmp_path):
    taken, release = [], threading.Event()
    first = [_start(POOL, tmp_path, taken, release) for _ in range(2)]  # two jobs at once
    assert len(set(_wait_for(taken, 2))) == 2 and set(taken) <= set(POOL)
    more = [_start(POOL, tmp_path, taken, release) for _ in range(2)]
    assert sorted(_wait_for(taken, 4)) == POOL
    late_taken, late_release = [], threading.Event()
    late = _start(POOL, tmp_path, late_taken, late_release)  # a fifth job: every GPU is busy
    time.sleep(0.2)
    assert late_taken == []
    release.set()  # the four finish; the fifth gets a GPU
    for thread in first + more:
        thread.join()
    assert _wait_for(late_taken, 1)[0] in POOL
    late_release.set()
    late.join()


def _hold_forever(pool, lock_dir, held):
    with gpu_from_pool(pool, lock_dir) as index:
        held.put(index)
        time.sleep(60)


def test_a_dead_job_leaves_its_gpu_free(tmp_path):
    held = FORKED.Queue()
    child = FORKED.Process(target=_hold_forever, args=([0], tmp_path, held))
    child.start()
    assert held.get(timeout=60) == 0
    taken, release = [], threading.Event()
    waiting = _start([0], tmp_path, taken, release)
    time.sleep(0.2)
    assert taken == []  # the child holds GPU 0
    child.kill()  # no clean exit: the OS drops the lock with the process
    child.join()
    assert _wait_for(taken, 1) == [0]
    release.set()
    waiting.join()


def test_locks_name_the_physical_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert physical_gpu(1) == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8c1f/2")
    assert physical_gpu(0) == "GPU-8c1f_2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_gpu(2) == "2"


def test_gpus_launcher_runs_one_joblib_worker_per_gpu_of_the_pool():
    cfg = compose(["hydra/launcher=gpus", "device_pool=[0,1,2,3]"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 4
    assert instantiate(launcher).joblib["n_jobs"] == 4
    cfg = compose(["hydra/launcher=gpus"], return_hydra_config=True)  # default: every visible GPU (none here)
    assert list(cfg.device_pool) == [] and cfg.hydra.launcher.n_jobs == 1


SLURM = ["hydra/launcher=slurm", "cluster.partition=gpu", "cluster.account=lab", "cluster.gpus_per_node=4",
         "cluster.timeout_min=90", "cluster.requeues=2", "cluster.setup=[source .venv/bin/activate]"]


def test_slurm_launcher_takes_its_resources_from_the_cluster_block():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose(SLURM, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu", "lab", 90)
    assert launcher.gpus_per_node == launcher.tasks_per_node == 4  # one task per GPU
    assert launcher.cpus_per_task == 8 and launcher.max_num_timeout == 2
    assert list(launcher.setup) == ["source .venv/bin/activate"]


def test_slurm_job_script_asks_for_the_configured_resources(tmp_path, monkeypatch):
    """The sbatch script the launcher would submit, built by the real launcher and submitit, no cluster."""
    submitit = pytest.importorskip("submitit")

    cfg = compose([*SLURM, f"hydra.sweep.dir={tmp_path}/sweep"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    captured = {}

    class Submitted(Exception):
        pass

    def map_array(executor, *args, **kwargs):
        captured["executor"] = executor
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    srun = tmp_path / "bin" / "srun"  # submitit looks for srun before it builds anything
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    with pytest.raises(Submitted):
        launcher.launch([["attention=mha"], ["attention=gqa"]], initial_job_idx=0)
    script = captured["executor"]._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --time=90", "#SBATCH --nodes=1"):
        assert line in script, script
    assert "source .venv/bin/activate" in script


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (found := predicate()):
            return found
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout} s for {what}")


@pytest.mark.slow
def test_a_worker_job_stops_when_its_sweep_process_is_killed(tmp_path, store):
    """kill -9 of `python run.py -m` (a launcher with worker processes) must not leave its jobs training
    unseen: each notices its launcher is gone, checkpoints and ends its run KILLED."""
    import signal
    import subprocess
    import sys

    from conftest import TINY, runs_in

    from ablate.config import project_root

    args = [sys.executable, "run.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY,
            "train.steps=100000", "train.checkpoint_every=20", "train.eval_every=1000", "device=cpu", "seed=0,1",
            f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/sweep", f"paths.output_dir={tmp_path}/out"]
    sweep = subprocess.Popen(args, cwd=project_root(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        def training():
            runs = [r for r in runs_in(store)[1] if "mlflow.parentRunId" in r.data.tags]
            return [r for r in runs if "train/loss" in r.data.metrics]

        job = _wait(training, 120, "a job to train")[0]
        worker = int(job.data.tags["ablate.pid"])
        assert worker != sweep.pid  # the job runs in a worker process of the launcher
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()

        def ended():
            run = runs_in(store)[0].get_run(job.info.run_id)
            return run if run.info.status != "RUNNING" else None

        run = _wait(ended, 30, "the orphaned job to end its run")
        assert run.info.status == "KILLED"
        assert "launcher" in run.data.tags.get("ablate.end_reason", "") + run.data.tags.get("ablate.error", ""), \
            run.data.tags
        assert (Path(tmp_path) / "out").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)  # the session: the launcher and its workers
