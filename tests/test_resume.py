"""Kills and restarts: a re-run of the same command resumes into the same MLflow run and ends where an
uninterrupted run ends, with each metric step logged once; a dead run is ended, a running one is not
joined, edited data is refused.

Jobs are killed at chosen moments: they run in processes forked from a server that has imported torch
and MLflow once (conftest's FORKED), so a restart costs the run's own start (data, store), not the imports.
"""
import logging
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FORKED, history, runs_in, tiny_cfg
from omegaconf import OmegaConf

from ablate.data import val_bucket
from ablate.experiment import run
from ablate.train import checkpoint

# the run that is killed and resumed: a checkpoint every 3 steps, metrics of every step
STEPS = 180
KILLED = [f"train.steps={STEPS}", "train.checkpoint_every=3", "train.eval_every=10", "train.log_every=1"]


def job_config(tmp_path, *overrides):
    cfg = tiny_cfg(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"paths.output_dir={tmp_path}", *overrides)
    OmegaConf.resolve(cfg)
    return cfg


def start(cfg, report: Path | None = None):
    proc = FORKED.Process(target=run_and_report, args=(cfg, report))
    proc.start()
    return proc


def run_and_report(cfg, report: Path | None) -> None:
    """The job's body: run(cfg), writing the error it ends with (if any) to `report`."""
    try:
        run(cfg)
    except BaseException as err:
        if report is not None:
            report.write_text(f"{type(err).__name__}: {err}")
        raise


def wait_for(condition, proc, timeout=120.0) -> bool:
    """Poll `condition` until it holds (True), or `proc` ended or time ran out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.is_alive():
        if condition():
            return True
        time.sleep(0.001)
    return condition()


def all_runs(tmp_path):
    return runs_in(f"sqlite:///{tmp_path}/mlflow.db")


def stored_runs(db: Path) -> int:
    """Runs in a sqlite store, read without MLflow (which would race the job creating the store's tables)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def last_step(folder: Path) -> int:
    try:
        return torch.load(folder / "last.pt", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not there yet, or being replaced: look again
        return 0


def _stat(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def uninterrupted(store_template, tmp_path_factory):
    """The killed runs' configuration, run once without interruption: (val/loss, train/loss curve)."""
    tmp = tmp_path_factory.mktemp("whole")
    shutil.copyfile(store_template, tmp / "mlflow.db")
    run(job_config(tmp, *KILLED))
    client, (r,) = all_runs(tmp)
    return r.data.metrics["val/loss"], history(client, r.info.run_id, "train/loss")


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_the_rerun_resumes_it_bit_identically(tmp_path, store, uninterrupted):
    cfg = job_config(tmp_path, *KILLED)
    folder = checkpoint.checkpoint_dir(cfg)
    proc = start(cfg)
    assert wait_for(lambda: last_step(folder) >= 30, proc), f"no checkpoint (exit code {proc.exitcode})"
    proc.terminate()  # SIGTERM: finish the step, checkpoint, end the run KILLED
    proc.join()
    assert proc.exitcode != 0
    client, (r,) = all_runs(tmp_path)
    assert r.info.status == "KILLED"
    logged = steps_of(client, r.info.run_id, "train/loss")
    stopped = last_step(folder)
    assert logged == list(range(stopped)) and stopped < STEPS  # stopped early, up to its checkpoint

    run(cfg)  # the same command again
    client, (r,) = all_runs(tmp_path)  # the same run, resumed
    assert r.info.status == "FINISHED" and r.data.tags["ablate.resumed_from_step"] == str(stopped)
    val_loss, curve = uninterrupted
    assert history(client, r.info.run_id, "train/loss") == curve  # every step once; on CPU bit-identical
    assert r.data.metrics["val/loss"] == val_loss


@pytest.mark.slow
def test_every_step_is_logged_exactly_once_across_random_kills(tmp_path, store, uninterrupted, caplog):
    kills = 6  # before the first checkpoint, twice while one is written, three times after one
    cfg = job_config(tmp_path, *KILLED)
    folder = checkpoint.checkpoint_dir(cfg)
    last, rng, torn_writes = folder / "last.pt", random.Random(7), 0
    for i in range(kills):
        before = _stat(last)
        proc = start(cfg)
        if i == 0:  # while the run starts, before its first checkpoint
            time.sleep(rng.uniform(0.2, 1.0))
        elif i % 3 == 1:  # in the middle of writing a checkpoint
            wait_for(lambda: any(folder.glob(f".*.{proc.pid}.tmp")), proc)
        else:  # at a random moment after this process wrote a checkpoint
            wait_for(lambda: _stat(last) not in (None, before), proc)
            time.sleep(rng.uniform(0.0, 0.2))
        assert proc.is_alive(), f"kill {i}: the run ended by itself (exit code {proc.exitcode})"
        proc.kill()
        proc.join()
        torn_writes += any(folder.glob(f".*.{proc.pid}.tmp"))
    assert torn_writes >= 1, "no kill landed while a checkpoint was being written"
    fallback = torch.load(folder / "previous.pt", weights_only=True)["step"]
    last.write_bytes(last.read_bytes()[:1000])  # and the last checkpoint is torn as well

    with caplog.at_level(logging.WARNING, logger="ablate"):
        run(cfg)
    assert "previous.pt" in caplog.text
    client, found = all_runs(tmp_path)
    (done,) = [r for r in found if r.info.status == "FINISHED"]
    assert done.data.tags["ablate.resumed_from_step"] == str(fallback)
    val_loss, curve = uninterrupted
    assert history(client, done.info.run_id, "train/loss") == curve  # every step once, as if never killed
    assert done.data.metrics["val/loss"] == val_loss
    val = steps_of(client, done.info.run_id, "val/loss")
    assert val == sorted(set(val)) == list(range(10, STEPS + 1, 10))
    for r in found:  # runs killed before their first checkpoint were ended, none is left RUNNING
        assert r.info.status in ("FINISHED", "KILLED"), (r.info.run_id, r.info.status)
        if r.info.status == "KILLED":
            assert r.data.tags["ablate.end_reason"] == "process_gone"
    assert sorted(p.name for p in folder.iterdir()) == ["final.pt", "lock"]  # no temporary file left


@pytest.mark.slow
def test_a_second_identical_command_is_refused_while_the_first_runs(tmp_path, store):
    cfg = job_config(tmp_path, "train.steps=100000", "train.checkpoint_every=5")
    first = start(cfg)
    folder = checkpoint.checkpoint_dir(cfg)
    try:
        assert wait_for(lambda: (folder / "last.pt").exists(), first)
        report = tmp_path / "second.txt"
        second = start(cfg, report)
        second.join(timeout=60)
        alive = second.is_alive()
        if alive:
            second.kill()
        assert not alive and second.exitcode != 0, "the second command ran beside the first"
        message = report.read_text()
        assert f"pid {first.pid}" in message and str(folder) in message, message
        client, (only,) = all_runs(tmp_path)  # the second never touched the store
        assert only.info.status == "RUNNING" and only.data.tags["ablate.pid"] == str(first.pid)
    finally:
        first.kill()
        first.join()


@pytest.mark.slow
def test_a_run_whose_process_died_is_ended_when_the_next_run_starts(tmp_path, store):
    cfg = job_config(tmp_path, "train.steps=100000", "train.checkpoint_every=100000")  # dies before any checkpoint
    proc = start(cfg)
    assert wait_for(lambda: stored_runs(tmp_path / "mlflow.db") > 0, proc)
    proc.kill()
    proc.join()
    client, (dead,) = all_runs(tmp_path)
    assert dead.info.status == "RUNNING"
    run(job_config(tmp_path, "seed=1", "train.steps=2"))  # another configuration, the same store
    client, found = all_runs(tmp_path)
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "KILLED" and dead.data.tags["ablate.end_reason"] == "process_gone"
    assert dead.info.end_time is not None
    assert sorted(r.info.status for r in found) == ["FINISHED", "KILLED"]


def _edit(paths: list[Path], at: int, grow: bool = False) -> dict[Path, str]:
    """Change the character at `at` of each file (or double it, with `grow`); returns the texts before."""
    before = {}
    for path in paths:
        text = before[path] = path.read_text()
        path.write_text(text[:at] + ("XX" if grow else "X" if text[at] != "X" else "Y") + text[at + 1 :])
    return before


@pytest.mark.slow
def test_edited_data_is_refused_before_the_run_is_reopened(tmp_path, store):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = random.Random(0).choices(["to", "be", "or", "not", "that", "is", "the", "question"], k=20000)
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words[i * 500 : (i + 1) * 500]))
    val_docs = [p for p in sorted(corpus.iterdir()) if val_bucket(f"{p.name}#0") < 200]
    train_doc = next(p for p in sorted(corpus.iterdir()) if p not in val_docs)
    data = ["data=text", f"data.paths=[{corpus}]", "data.val_per_mille=200"]
    cfg = job_config(tmp_path, *data, "train.steps=40", "train.checkpoint_every=2")
    folder = checkpoint.checkpoint_dir(cfg)
    proc = start(cfg)
    assert wait_for(lambda: (folder / "last.pt").exists(), proc)
    proc.kill()
    proc.join()
    client, (killed,) = all_runs(tmp_path)

    for docs, split, grow in ((val_docs, "validation", False), ([train_doc], "training", False),
                              ([train_doc], "training", True)):
        original = _edit(docs, 100, grow)
        with pytest.raises(Exception) as err:
            run(cfg)
        message = str(err.value)
        assert isinstance(err.value, checkpoint.CheckpointError), message
        assert split in message and str(folder) in message and "train.resume=false" in message, message
        client, found = all_runs(tmp_path)
        assert [r.info.run_id for r in found] == [killed.info.run_id]
        assert found[0].info.status == "RUNNING", "the good run was reopened or marked"
        for doc, text in original.items():
            doc.write_text(text)

    _edit([train_doc], 100)
    run(job_config(tmp_path, *data, "train.steps=40", "train.checkpoint_every=2", "train.resume=false"))
    client, found = all_runs(tmp_path)
    status = {r.info.run_id: r.info.status for r in found}
    assert len(found) == 2 and status.pop(killed.info.run_id) == "KILLED" and list(status.values()) == ["FINISHED"]
    assert [p.name for p in folder.glob("set-aside-*/last.pt")] == ["last.pt"]  # the old checkpoint is kept


def test_a_reopened_run_logs_only_the_steps_its_store_lacks(store):
    from ablate.tracking.mlflow import MlflowTracker

    first = MlflowTracker(store, "ablate", "first", {})
    for step in range(6):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    first.log_metrics({"val/loss": 2.0}, 4)
    first.flush()  # the process dies here, its checkpoint at step 2
    again = MlflowTracker(store, "ablate", None, {}, run_id=first.run_id)
    for step in range(2, 9):
        again.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
        if step % 4 == 0:
            again.log_metrics({"val/loss": 2.0}, step)
    again.finish()
    client = again.client
    assert steps_of(client, first.run_id, "train/loss") == list(range(9))
    assert steps_of(client, first.run_id, "val/loss") == [4, 8]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_checkpoint_of_a_run_the_store_lacks_is_refused_with_the_fix(store):
    from ablate.tracking.mlflow import MlflowTracker

    with pytest.raises(RuntimeError, match="train.resume=false"):
        MlflowTracker(store, "ablate", None, {}, run_id="0" * 32)


def test_a_process_is_known_by_its_pid_and_start_time():
    import os

    from ablate.processes import identity, is_running

    me = identity()
    assert me["pid"] == str(os.getpid()) and me["host"]
    assert is_running(os.getpid(), me["start"])
    assert not is_running(os.getpid(), me["start"] + "0")  # the same pid, another process: pid reused
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not is_running(gone.pid)
