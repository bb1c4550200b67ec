"""Resuming a run: one process per checkpoint folder at a time, and only from a checkpoint of this project
written for the same data. Both are decided before the tracking store is touched, so a refused resume
neither opens nor marks the run it would have continued.

    with resume.exclusive(cfg, dist):                # holds <checkpoint folder>/lock for the run's life
        previous = resume.previous_state(cfg, data, dist)   # the payload to restore, or None: a new run
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from ablate.models.transformer import COMPONENTS, LanguageModel
from ablate.processes import identity
from ablate.train import checkpoint
from ablate.train.checkpoint import ResumeRefused

log = logging.getLogger("ablate")

LOCK = "lock"


@contextmanager
def exclusive(cfg: DictConfig, dist: Any) -> Iterator[None]:  # noqa: ANN401 - a Dist
    """Hold the run's checkpoint folder while the run lives (rank 0 of a run that checkpoints): a second
    process of the same configuration is refused, naming the holder; temporary files of stopped runs go."""
    if not cfg.train.checkpoint_every or not dist.is_main:
        yield
        return
    folder = checkpoint.checkpoint_dir(cfg, dist.world_size)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder / LOCK)
    try:
        checkpoint.remove_stale_temp_files(folder)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays, so that every process locks the same one


def _lock(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ResumeRefused(
            f"another process ({holder}) is running this configuration: it holds {path}. Wait for it to end, or "
            f"stop it and re-run this command to resume its run; to run the same configuration twice at once, "
            f"give each its own paths.output_dir") from None
    except OSError as err:  # a file system without locks
        os.close(fd)
        log.warning("cannot lock %s (%s): a second identical command would not be refused", path, err)
        return None
    me = identity()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """'pid N on host H' from the lock file (its holder writes it just after locking)."""
    for _ in range(50):
        try:
            who = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            who = None
        if who:
            return f"pid {who['pid']} on host {who['host']}"
        time.sleep(0.02)
    return "its pid not written yet"


def previous_state(cfg: DictConfig, data: Any, dist: Any) -> dict[str, Any] | None:  # noqa: ANN401
    """The checkpoint payload this run continues from, or None for a new run: none was written, the run
    finished, or `train.resume=false` (which moves an earlier run's checkpoints aside). A checkpoint
    written for other data or another model is refused (ResumeRefused) with the fix."""
    if not cfg.train.checkpoint_every:
        return None
    folder = checkpoint.checkpoint_dir(cfg, dist.world_size)
    if not cfg.train.resume:
        if dist.is_main:
            set_aside(folder)
        return None
    found = checkpoint.load_latest(folder)
    if found is None:
        return None
    payload, path = found
    check_data(payload, path, data)
    check_revisions(payload, path, cfg)
    return payload


def set_aside(folder: Path) -> Path | None:
    """Move the resumable checkpoints of `folder` into a subfolder of their own (kept, not deleted)."""
    names = [n for n in (checkpoint.LAST, checkpoint.PREVIOUS) if (folder / n).exists()]
    if not names:
        return None
    aside = folder / f"{time.strftime('set-aside-%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for name in names:
        os.replace(folder / name, aside / name)
    log.warning("train.resume=false: a new run starts; the checkpoints of the earlier run were moved to %s "
                "(delete that folder when they are no longer needed)", aside)
    return aside


_SPLITS = {"train": "training documents", "val": "validation batches"}


def check_data(payload: dict[str, Any], path: Path, data: Any) -> None:  # noqa: ANN401
    """Refuse to resume on data other than the checkpoint was written for."""
    saved, now = payload.get("fingerprint", {}), checkpoint.data_fingerprint(data)
    for split, what in _SPLITS.items():
        if saved.get(split) != now[split]:
            raise ResumeRefused(
                f"{path} was written for other {what} than the run reads now ({_counts(saved.get(split))} then, "
                f"{_counts(now[split])} now): the data changed since the run started, so it cannot continue on "
                f"it. Restore the data to resume the run, or start a new run beside it with train.resume=false "
                f"(its checkpoints are then moved aside, not deleted)")


def check_revisions(payload: dict[str, Any], path: Path, cfg: DictConfig) -> None:
    """Refuse to resume a model whose components compute something else than when the checkpoint was
    written (a checkpoint from before revisions were recorded holds revision 1 of each)."""
    saved, now = payload.get("revisions") or {}, LanguageModel.revisions(cfg)
    for component, revision in now.items():
        then = saved.get(component, 1)
        if then != revision:
            group, name = component.split("=", 1)
            why = dict(COMPONENTS)[group].get(name).revised
            raise ResumeRefused(
                f"{path} was written by revision {then} of {component}, and this ablate builds revision {revision} "
                f"({why}): resuming would continue the run with another model. Start a new run beside it with "
                f"train.resume=false (its checkpoints are then moved aside, not deleted), or resume it with the "
                f"ablate version that wrote it")


def _counts(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "nothing recorded"
    counts = ", ".join(f"{v:,} {k}" for k, v in fingerprint.items() if k != "hash")
    return f"{counts}, hash {fingerprint['hash'][:12]}"
