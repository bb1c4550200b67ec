"""Data parallelism on CPU (gloo): 2 ranks x b rows train exactly as 1 rank x 2b rows, with one MLflow run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate.config import compose, project_root
from ablate.data import build_data
from ablate.train import checkpoint, distributed
from ablate.train.distributed import SINGLE, shard_rows

ROOT = project_root()
ARGS = ["model.n_layers=1", "model.d_model=64", "model.context=128", "train=smoke", "data.max_val_batches=2"]
# float32 sums run in another order over 2 ranks (DDP's all-reduce, FSDP's reduce-scatter); the curves
# agree to ~1e-7 relative, and a real difference in the gradient would show at 1e-2 within 12 steps
RTOL = 1e-5


def _job(tmp_path, name, ranks, batch_size, *overrides):
    """Start a run; its output goes to a file (a pipe that nobody reads while others run could stall it)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*(launch if ranks > 1 else [sys.executable]), "run.py", *ARGS, f"train.batch_size={batch_size}",
           f"tracking.uri=sqlite:///{tmp_path}/{name}.db", f"paths.output_dir={tmp_path}/{name}", *overrides]
    log = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _output(proc):
    proc.wait(timeout=300)
    return proc.log.read_text()


def _record(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/{name}.db")
    runs = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
    history = {key: [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)]
               for key in ("train/loss", "train/grad_norm")}
    return runs, history


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The same training three ways, at once: 1 rank x 8 rows, 2 ranks x 4 rows (DDP, and FSDP with checkpoints)."""
    tmp = tmp_path_factory.mktemp("dp")
    procs = {"one": _job(tmp, "one", 1, 8), "ddp": _job(tmp, "ddp", 2, 4),
             "fsdp": _job(tmp, "fsdp", 2, 4, "train.parallel=fsdp", "train.checkpoint_every=6")}
    for name, proc in procs.items():
        out = _output(proc)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    return tmp, {name: _record(tmp, name) for name in procs}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_rank_with_twice_the_batch(jobs, parallel):
    tmp, records = jobs
    (one,), single = records["one"]
    runs, history = records[parallel]
    assert len(runs) == 1, "only rank 0 talks to MLflow"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["ablate.world_size"] == "2" and run.data.tags["ablate.parallel"] == parallel
    assert "ablate.world_size" not in one.data.tags
    assert len(history["train/loss"]) == len(single["train/loss"]) == 12
    np.testing.assert_allclose(history["train/loss"], single["train/loss"], rtol=RTOL)
    np.testing.assert_allclose(history["train/grad_norm"], single["train/grad_norm"], rtol=1e-4)
    assert run.data.metrics["val/loss"] == pytest.approx(one.data.metrics["val/loss"], rel=RTOL)
    assert run.data.metrics["val/bpb"] == pytest.approx(one.data.metrics["val/bpb"], rel=RTOL)
    # tokens/s counts the tokens of every rank: the global batch
    assert run.data.params["train.batch_size"] == "4" and one.data.params["train.batch_size"] == "8"


@pytest.mark.slow
def test_fsdp_checkpoint_is_one_whole_file_of_the_ranks_own_folder(jobs):
    tmp, _ = jobs
    (final,) = (tmp / "fsdp" / "checkpoints").glob("*-fsdpx2/final.pt")
    payload = torch.load(final, weights_only=False)
    assert payload["step"] == 12
    assert payload["model"]["embed.weight"].shape == (320, 64)  # gathered, not a shard
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())


def _tiny(*overrides):
    return compose([*ARGS, "train.batch_size=3", *overrides])


def test_rank_rows_partition_the_global_batch():
    cfg = _tiny()
    data = build_data(cfg.data, context=cfg.model.context, batch_size=6, seed=0)
    batch = next(data.train)
    parts = [shard_rows(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
    assert torch.equal(torch.cat([p.targets for p in parts]), batch.targets)
    assert sum((p.doc_lens for p in parts), ()) == batch.doc_lens
    assert sum(p.n_targets for p in parts) == batch.n_targets


def test_a_rank_without_rows_gets_a_row_that_adds_nothing():
    from ablate.models import LanguageModel
    from ablate.validate import plan

    cfg = _tiny()
    data = build_data(cfg.data, context=cfg.model.context, batch_size=2, seed=0)
    batch = next(data.train)
    first_row = shard_rows(batch, 0, 2)  # a batch of one row, split over 2 ranks: rank 1 has none
    lone = shard_rows(first_row, 1, 2)
    assert lone.tokens.shape == (1, cfg.model.context) and lone.n_targets == 0
    model = LanguageModel(cfg, data.tokenizer.vocab_size, plan(cfg).backend)
    assert model.loss(lone.tokens, lone.targets, lone.positions, lone.doc_lens, reduction="sum").item() == 0.0


def test_one_process_is_untouched():
    assert not SINGLE.enabled and SINGLE.is_main
    x = torch.arange(3.0)
    assert SINGLE.sum(x) is x
    assert SINGLE.agree_stop("SIGTERM") == "SIGTERM" and SINGLE.agree_stop(None) is None
    cfg = _tiny()
    with distributed.placement(cfg, torch.device("cpu")) as (dist, device):
        assert dist is SINGLE and device == torch.device("cpu")


def test_checkpoint_folders_separate_world_sizes_but_not_placement():
    cfg = _tiny()
    assert checkpoint.config_key(cfg) == checkpoint.config_key(_tiny("train.parallel=fsdp", "device_pool=[0,1]",
                                                                     "cluster.partition=gpu"))
    assert checkpoint.checkpoint_dir(cfg).name == checkpoint.config_key(cfg)
    assert checkpoint.checkpoint_dir(cfg, 4).name == f"{checkpoint.config_key(cfg)}-ddpx4"


def test_unknown_parallel_mode_is_refused():
    from ablate.experiment import run
    from ablate.validate import ConfigError

    with pytest.raises(ConfigError, match="train.parallel='zero'"):
        run(_tiny("train.parallel=zero", "tracking=none"))


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
              "SLURM_LOCALID": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu-node7"}
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_ranks_come_from_torchrun_or_from_a_slurm_task(monkeypatch):
    for key in TORCHRUN:  # recorded, so that whatever the test exports is undone
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    assert distributed.env_ranks() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_ranks() == (3, 8, 1)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    assert distributed.env_ranks() == (2, 4, 2)
    assert os.environ["MASTER_ADDR"] == "gpu-node7"


def _step(checkpoint_file: Path) -> int:
    try:
        return torch.load(checkpoint_file, weights_only=False)["step"]
    except Exception:  # noqa: BLE001 - the file is being replaced; look again
        return 0


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of rank `rank` (read from /proc: its parent and its RANK)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_and_the_rerun_resumes_the_same_run(tmp_path):
    steps = ["train.steps=300", "train.checkpoint_every=5", "train.eval_every=100"]
    whole = _job(tmp_path, "whole", 2, 2, *steps)
    killed = _job(tmp_path, "killed", 2, 2, *steps)
    deadline, pid = time.time() + 200, None
    while time.time() < deadline and killed.poll() is None:
        pid = pid or _rank_pid(killed.pid, 1)
        found = list((tmp_path / "killed").glob("checkpoints/*/last.pt"))
        if found and pid and _step(found[0]) >= 10:
            os.kill(pid, signal.SIGTERM)  # rank 1 only: rank 0 must stop after the same step
            break
        time.sleep(0.05)
    out = _output(killed)
    assert killed.returncode != 0 and "Interrupted: SIGTERM" in out, f"rank 1: pid {pid}\n{out[-3000:]}"
    (run,), history = _record(tmp_path, "killed")
    assert run.info.status == "KILLED"  # rank 0 got no signal itself
    stopped = _step(next((tmp_path / "killed").glob("checkpoints/*/last.pt")))
    assert len(history["train/loss"]) == stopped < 300

    rerun = _job(tmp_path, "killed", 2, 2, *steps)
    for proc in (rerun, whole):
        out = _output(proc)
        assert proc.returncode == 0, out[-3000:]
    (run,), history = _record(tmp_path, "killed")
    _, uninterrupted = _record(tmp_path, "whole")
    assert run.info.status == "FINISHED" and run.data.tags["ablate.resumed_from_step"] == str(stopped)
    assert history["train/loss"] == uninterrupted["train/loss"]  # deterministic on CPU: bit-identical
