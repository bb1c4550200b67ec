"""Checkpoint files: loaded without running code, written atomically in two generations (a corrupt last one
falls back to the one before), write failures named clearly, and a folder per configuration *and* store."""
import errno
import logging
import os
import pickle
import subprocess

import pytest
import torch
from conftest import runs_in, tiny_cfg

from ablate.config import compose
from ablate.experiment import run
from ablate.train import checkpoint


def _config(tmp_path, *extra):
    return tiny_cfg("train.checkpoint_every=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    f"paths.output_dir={tmp_path}", *extra)


def _runs(tmp_path):
    return runs_in(f"sqlite:///{tmp_path}/mlflow.db")[1]


class _Planted:
    """Unpickling this creates the file `marker`: what a planted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(kind, path, marker):
    payload = {"step": 4, "run_id": "0" * 32, "planted": _Planted(marker)}
    if kind == "torch_save":
        torch.save(payload, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif kind == "no_marker":
        torch.save({"step": 4, "run_id": "0" * 32}, path)
    elif kind == "other_version":
        torch.save({"format": "ablate-checkpoint", "version": 99, "step": 4, "run_id": "0" * 32}, path)


@pytest.mark.parametrize("kind", ["torch_save", "plain_pickle", "no_marker", "other_version"])
def test_a_checkpoint_that_is_not_the_projects_is_refused_and_runs_no_code(kind, tmp_path, store):
    cfg = _config(tmp_path)
    folder = checkpoint.checkpoint_dir(cfg)
    folder.mkdir(parents=True)
    marker = tmp_path / "planted_code_ran"
    _plant(kind, folder / "last.pt", marker)
    with pytest.raises(Exception) as err:
        run(cfg)
    assert not marker.exists(), "unpickling the planted checkpoint ran its code"
    message = str(err.value)
    assert str(folder / "last.pt") in message and "train.resume=false" in message and "delete" in message, message
    assert isinstance(err.value, checkpoint.CheckpointError)
    assert _runs(tmp_path) == [], "the store was touched before the checkpoint was refused"


def _payload(step):
    return {"step": step, "weights": torch.full((64, 64), float(step)), "history": [{"step": step, "val/loss": 1.5}]}


def test_the_last_two_checkpoints_are_kept_and_a_corrupt_last_falls_back_with_a_warning(tmp_path, caplog):
    last = tmp_path / "last.pt"
    for step in (2, 4, 6):
        checkpoint.save(last, _payload(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]
    payload, path = checkpoint.load_latest(tmp_path)
    assert payload["step"] == 6 and path == last and torch.equal(payload["weights"], _payload(6)["weights"])

    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn by a crash or a bad copy
    with caplog.at_level(logging.WARNING, logger="ablate"):
        payload, path = checkpoint.load_latest(tmp_path)
    assert payload["step"] == 4 and path.name == "previous.pt"
    assert any(str(last) in r.getMessage() and "previous.pt" in r.getMessage() for r in caplog.records), caplog.text

    (tmp_path / "previous.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_latest(tmp_path)
    assert str(tmp_path) in str(err.value) and "train.resume=false" in str(err.value)


def test_the_final_checkpoint_leaves_nothing_to_resume(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(last, _payload(2))
    checkpoint.save(last, _payload(4))
    checkpoint.save(last, _payload(6), final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]
    assert checkpoint.load_latest(tmp_path) is None
    assert checkpoint.load(tmp_path / "final.pt")["step"] == 6


def test_a_full_disk_names_the_folder_and_free_space_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    checkpoint.save(last, _payload(2))

    def full_disk(obj, f):  # what writing a checkpoint meets on a full disk, part-way through
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(Exception) as err:
        checkpoint.save(last, _payload(4))
    monkeypatch.undo()
    message = str(err.value)
    assert str(tmp_path) in message and "MiB free" in message and "no space" in message.lower(), message
    assert isinstance(err.value, checkpoint.CheckpointError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the torn file is gone
    payload, path = checkpoint.load_latest(tmp_path)
    assert path == last and payload["step"] == 2


def test_a_link_planted_where_a_checkpoint_is_written_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / f".last.pt.{os.getpid()}.tmp").symlink_to(victim)  # the name this process writes to first
    checkpoint.save(folder / "last.pt", _payload(2))
    assert victim.read_text() == "keep me"
    assert checkpoint.load(folder / "last.pt")["step"] == 2


def test_stale_temp_files_of_dead_processes_are_removed_when_a_run_starts(tmp_path, store):
    cfg = _config(tmp_path)
    folder = checkpoint.checkpoint_dir(cfg)
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f".last.pt.{dead.pid}.tmp"
    stale.write_bytes(b"\0" * 4096)
    run(cfg)
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir() if p.name != "lock") == ["final.pt"]


def test_the_checkpoint_folder_depends_on_the_tracking_store(tmp_path, monkeypatch):
    base = ["train=smoke", f"paths.output_dir={tmp_path}"]
    a = checkpoint.config_key(compose([*base, f"tracking.uri=sqlite:///{tmp_path}/a.db"]))
    assert a == checkpoint.config_key(compose([*base, f"tracking.uri=sqlite:///{tmp_path}/a.db"]))
    assert a != checkpoint.config_key(compose([*base, f"tracking.uri=sqlite:///{tmp_path}/b.db"]))
    assert a != checkpoint.config_key(compose([*base, "tracking=none"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a.db")
    assert a == checkpoint.config_key(compose(base))  # the store resolved from the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/c.db")
    assert a != checkpoint.config_key(compose(base))
    # neither where a run saves nor whether it resumes shapes its numbers
    assert checkpoint.config_key(compose([*base, "train.resume=false"])) == checkpoint.config_key(compose(base))


def test_checkpoints_hold_only_plain_types_and_restore_every_generator(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = checkpoint.rng_state()
    checkpoint.save(tmp_path / "last.pt", {"rng": state})
    torch.load(tmp_path / "last.pt", weights_only=True)  # no allow-listed extras needed
    want = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and (want[1] == got[1]).all() and want[2] == got[2]


def test_the_data_fingerprint_sees_a_one_character_edit(tmp_path):
    from ablate.data import build_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "to be or not to be " * (20 + i))
    cfg = compose(["data=text", f"data.paths=[{corpus}]", "data.val_per_mille=200"])

    def fingerprint():
        return checkpoint.data_fingerprint(build_data(cfg.data, context=64, batch_size=4, seed=0))

    before = fingerprint()
    assert before == fingerprint()
    doc = corpus / "doc17.txt"
    text = doc.read_text()
    doc.write_text(text[:40] + ("X" if text[40] != "X" else "Y") + text[41:])  # same length
    after = fingerprint()
    assert after != before and (after["train"] != before["train"] or after["val"] != before["val"])


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_a_checkpoint_of_an_earlier_component_revision_is_not_resumed(tmp_path, pos):
    """A checkpoint records the revision of each component of its model; one written before a
    component changed what it computes (here: before revisions were recorded, i.e. revision 1 of
    each, as sinusoidal positions were until their rescaling) is refused with the fix, and one of the
    same revisions resumes."""
    from conftest import tiny_cfg

    from ablate.experiment import build_run
    from ablate.train import resume

    cfg = tiny_cfg(f"pos={pos}")
    payload = checkpoint.trainer_payload(build_run(cfg).trainer, run_id=None)
    assert payload["revisions"][f"pos={pos}"] == (2 if pos == "sinusoidal" else 1)
    resume.check_revisions(payload, tmp_path / "last.pt", cfg)  # the same revisions: resumes
    old = {k: v for k, v in payload.items() if k != "revisions"}
    if pos == "rope":
        resume.check_revisions(old, tmp_path / "last.pt", cfg)  # nothing changed for rope
        return
    with pytest.raises(checkpoint.CheckpointError) as err:
        resume.check_revisions(old, tmp_path / "last.pt", cfg)
    message = str(err.value)
    assert "revision 1 of pos=sinusoidal" in message and "revision 2" in message and "embeddings' scale" in message
    assert str(tmp_path / "last.pt") in message and "train.resume=false" in message
