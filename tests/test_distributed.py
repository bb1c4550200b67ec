"""Data parallelism on CPU (gloo): 2 ranks x b rows train exactly as 1 rank x 2b rows, with one MLflow run."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FORKED, TINY, runs_in, tiny_cfg

from ablate.config import compose, project_root
from ablate.data import build_data
from ablate.experiment import run
from ablate.train import checkpoint, distributed
from ablate.train.distributed import SINGLE, shard_rows

ROOT = project_root()
# every job of this file: long enough for a signal to land between a checkpoint and the end
STEPS = 100
ARGS = [*TINY, f"train.steps={STEPS}", "train.checkpoint_every=5", "train.eval_every=50"]
# float32 sums run in another order over 2 ranks (DDP's all-reduce, FSDP's reduce-scatter): the first
# steps agree to ~1e-7 relative (a real difference in the gradient would show at 1e-2 within a few steps);
# the difference in rounding then grows with training, about 10x every 10 steps past step 45, to 6e-4
# .. 1.2e-3 in the loss by step 90 (measured; which one depends on the model code's own rounding), more
# in the gradient norm, which is compared over the first steps only
RTOL, EXACT_STEPS, LATER_RTOL = 1e-5, 30, 3e-3


def _torchrun(tmp_path, name, ranks, batch_size, *overrides):
    """`torchrun --standalone --nproc_per_node=<ranks> run.py ...`, started; its output goes to a file (a
    pipe that nobody reads while others run could stall it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "run.py",
           *ARGS, f"train.batch_size={batch_size}", f"tracking.uri=sqlite:///{tmp_path}/{name}/mlflow.db",
           f"paths.output_dir={tmp_path}/{name}", *overrides]
    log = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _output(proc):
    proc.wait(timeout=300)
    return proc.log.read_text()


def _record(tmp_path, name):
    client, runs = runs_in(f"sqlite:///{tmp_path}/{name}/mlflow.db")
    history = {key: [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)]
               for key in ("train/loss", "train/grad_norm")}
    return runs, history


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, cfg, report: Path) -> None:
    """One rank, as torchrun starts it (its variables set), in a process forked from conftest's server."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run(cfg)
    except BaseException:
        report.write_text(traceback.format_exc())
        raise


class _Ranks:
    """`ranks` processes of one run, started like torchrun's workers without torchrun's own start-up."""

    def __init__(self, tmp: Path, name: str, batch_size: int, *overrides: str, ranks: int = 2):
        cfg = compose([*ARGS, f"train.batch_size={batch_size}", f"tracking.uri=sqlite:///{tmp}/{name}/mlflow.db",
                       f"paths.output_dir={tmp}/{name}", *overrides])
        port, self.reports = _free_port(), [tmp / f"{name}-rank{r}.err" for r in range(ranks)]
        self.procs = [FORKED.Process(target=_rank, args=(r, ranks, port, cfg, self.reports[r])) for r in range(ranks)]
        for proc in self.procs:
            proc.start()

    def wait(self, timeout: float = 300.0) -> tuple[int, str]:
        """(exit status, the ranks' errors); as under torchrun, a rank that fails ends the others (which
        would otherwise wait for it in their next collective)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
            if any(p.exitcode for p in self.procs):
                deadline = min(deadline, time.monotonic() + 10)
            time.sleep(0.05)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        errors = "".join(r.read_text() for r in self.reports if r.exists())
        return max(abs(proc.exitcode) for proc in self.procs), errors


def _stop_rank_1(job, folder: Path, after_step: int) -> int | None:
    """SIGTERM to rank 1 of a torchrun job (only) once it has a checkpoint at `after_step` or later."""
    deadline, pid = time.time() + 200, None
    while time.time() < deadline and job.poll() is None:
        pid = pid or _rank_pid(job.pid, 1)
        found = list(folder.glob("checkpoints/*/last.pt"))
        if found and pid and _step(found[0]) >= after_step:
            os.kill(pid, signal.SIGTERM)
            return pid
        time.sleep(0.005)
    return pid


@pytest.fixture(scope="module")
def jobs(store_template, tmp_path_factory):
    """One training three ways: 1 rank x 8 rows (in this process), and 2 ranks x 4 rows: FSDP, and DDP under
    torchrun, whose rank 1 gets a SIGTERM after the step-10 checkpoint and which is then run again."""
    tmp = tmp_path_factory.mktemp("dp")
    for name in ("one", "ddp", "fsdp"):
        (tmp / name).mkdir()
        shutil.copyfile(store_template, tmp / name / "mlflow.db")
    fsdp, ddp = _Ranks(tmp, "fsdp", 4, "train.parallel=fsdp"), _torchrun(tmp, "ddp", 2, 4)
    pid = _stop_rank_1(ddp, tmp / "ddp", after_step=10)
    out = _output(ddp)
    stopped = {"pid": pid, "code": ddp.returncode, "out": out, "record": _record(tmp, "ddp"),
               "step": _step(next((tmp / "ddp").glob("checkpoints/*/last.pt")))}
    rerun = _Ranks(tmp, "ddp", 4)  # the same run again (its ranks started without torchrun's start-up)
    # the single-rank reference runs here meanwhile: what `python run.py` would run, without its start-up
    run(compose([*ARGS, "train.batch_size=8", f"tracking.uri=sqlite:///{tmp}/one/mlflow.db",
                 f"paths.output_dir={tmp}/one"]))
    ended = {"one": (0, ""), "ddp": rerun.wait(), "fsdp": fsdp.wait()}
    return tmp, ended, stopped


def _finished(jobs, name):
    """The job's (runs, history), once it is known to have run to its end."""
    tmp, ended, _ = jobs
    code, out = ended[name]
    assert code == 0, f"{name}:\n{out[-3000:]}"
    return _record(tmp, name)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_rank_with_twice_the_batch(jobs, parallel):
    (one,), single = _finished(jobs, "one")
    runs, history = _finished(jobs, parallel)
    assert len(runs) == 1, "only rank 0 talks to MLflow"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["ablate.world_size"] == "2" and run.data.tags["ablate.parallel"] == parallel
    assert "ablate.world_size" not in one.data.tags
    assert len(history["train/loss"]) == len(single["train/loss"]) == STEPS
    for key, rtol in (("train/loss", RTOL), ("train/grad_norm", 10 * RTOL)):
        np.testing.assert_allclose(history[key][:EXACT_STEPS], single[key][:EXACT_STEPS], rtol=rtol)
    np.testing.assert_allclose(history["train/loss"], single["train/loss"], rtol=LATER_RTOL)
    assert run.data.metrics["val/loss"] == pytest.approx(one.data.metrics["val/loss"], rel=LATER_RTOL)
    assert run.data.metrics["val/bpb"] == pytest.approx(one.data.metrics["val/bpb"], rel=LATER_RTOL)
    # tokens/s counts the tokens of every rank: the global batch
    assert run.data.params["train.batch_size"] == "4" and one.data.params["train.batch_size"] == "8"


@pytest.mark.slow
def test_fsdp_checkpoint_is_one_whole_file_of_the_ranks_own_folder(jobs):
    tmp = jobs[0]
    _finished(jobs, "fsdp")
    (final,) = (tmp / "fsdp" / "checkpoints").glob("*-fsdpx2/final.pt")
    payload = torch.load(final, weights_only=False)
    assert payload["step"] == STEPS
    assert payload["model"]["embed.weight"].shape == (320, 32)  # gathered, not a shard (257 ids padded to 320)
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())


def _tiny(*overrides):
    return tiny_cfg("train.batch_size=3", *overrides)


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
def test_a_signal_on_one_rank_stops_both_and_the_rerun_resumes_the_same_run(jobs):
    stopped = jobs[2]
    assert stopped["code"] != 0 and "Interrupted: SIGTERM" in stopped["out"], \
        f"rank 1: pid {stopped['pid']}\n{stopped['out'][-3000:]}"
    (killed,), history = stopped["record"]
    assert killed.info.status == "KILLED"  # rank 0 got no signal itself: it stopped with rank 1
    assert len(history["train/loss"]) == stopped["step"] < EXACT_STEPS  # resumed steps are compared exactly

    (run,), _ = _finished(jobs, "ddp")  # and trains like one rank: test_two_ranks_train_like_one_rank_...
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["ablate.resumed_from_step"] == str(stopped["step"])
