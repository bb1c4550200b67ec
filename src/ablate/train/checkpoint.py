"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A run's checkpoints live in `<output_dir>/checkpoints/<config hash>/`, so re-running the same
command finds them; the hash covers the tracking store, so that a run resumes only into the store that
holds it. A checkpoint is written to a temporary file of its process, flushed to disk, then renamed to
`last.pt`; the one it replaces becomes `previous.pt`, so a torn `last.pt` falls back to the one before.
A finished run's checkpoint is `final.pt`, never resumed from (the same command then starts a new run).
A data-parallel run of N ranks keeps its own folder, `<config hash>-<train.parallel>x<N>`: rank 0 writes
it, every rank resumes from it.

Files are read with `weights_only` unpickling (tensors, numbers, strings, plain containers): a file that
needs anything else, or lacks the format marker, is refused rather than run.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ablate.errors import ConfigError
from ablate.models import LanguageModel
from ablate.processes import is_running
from ablate.train.distributed import full_state, load_full_state

log = logging.getLogger("ablate")

FORMAT, VERSION = "ablate-checkpoint", 2
LAST, PREVIOUS, FINAL = "last.pt", "previous.pt", "final.pt"
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # .<name>.<pid>.tmp: a checkpoint being written by process <pid>

# what does not change the numbers: where a run logs and saves, how it is placed on devices, whether it resumes
VOLATILE = ("paths", "tracking", "train.progress", "train.parallel", "train.resume", "device_pool", "cluster")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted, read or written; the message names the file and the fix."""


class ResumeRefused(CheckpointError, ConfigError):
    """A run that must not continue from its checkpoints as asked (held by another process, written for
    other data or another model, unreadable): refused before the store is opened, with the fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file of the project that is torn or unreadable (an older one may still serve)."""


def tracking_store(cfg: DictConfig) -> str:
    """The store a run logs to: the resolved MLflow tracking URI, or the tracking option's name."""
    if cfg.tracking.name != "mlflow":
        return str(cfg.tracking.name)
    from ablate.tracking.mlflow import resolve_uri

    return resolve_uri(cfg)


def config_key(cfg: DictConfig) -> str:
    """A short hash of everything that shapes the run's numbers (not where it logs or saves), and of the
    tracking store that holds its run."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    tree["tracking_store"] = tracking_store(cfg)
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_dir(cfg: DictConfig, world_size: int = 1) -> Path:
    key = config_key(cfg) if world_size == 1 else f"{config_key(cfg)}-{cfg.train.parallel}x{world_size}"
    return Path(cfg.paths.output_dir).resolve() / "checkpoints" / key


def rng_state() -> dict[str, Any]:
    """Every generator's state in plain types and tensors (what `weights_only` loading accepts)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save(path: Path, payload: dict[str, Any], final: bool = False) -> None:
    """Write `payload` as the checkpoint `path` (`<folder>/last.pt`); the checkpoint it replaces becomes
    `previous.pt`. With `final`, it is written as `final.pt` and the resumable pair is removed."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    temp.unlink(missing_ok=True)  # a leftover of an earlier process with this pid, or something planted
    try:
        # a new file, never a link: a planted link must not redirect the write
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        temp.unlink(missing_ok=True)
        raise CheckpointError(_write_failure(path, err)) from err
    if final:
        os.replace(temp, path.with_name(FINAL))
        path.unlink(missing_ok=True)
        path.with_name(PREVIOUS).unlink(missing_ok=True)
    else:
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(temp, path)
    _sync(folder)


def _sync(folder: Path) -> None:
    """Make the renames in `folder` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(path: Path, err: BaseException) -> str:
    folder = path.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    keep = f"the last checkpoint, {path}, is intact" if path.exists() else "no earlier checkpoint was touched"
    cause = "no space left on the device" if full else _describe(err)
    return (f"could not write a checkpoint to {folder} ({free}): {cause}. Nothing was replaced: {keep}. "
            f"Free space there (or move paths.output_dir to a larger disk) and re-run the same command to resume.")


def _describe(err: BaseException) -> str:
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0][:200]}" if first else type(err).__name__


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save`. Raises CheckpointError for a file that is not one (never running
    code from it), CorruptCheckpoint for one that cannot be read whole."""
    fix = f"delete it (rm {path}) or start a new run beside it with train.resume=false"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ResumeRefused(f"{path} is not an ablate checkpoint: it holds objects other than tensors, numbers "
                              f"and plain containers, which are never unpickled. It is not loaded; {fix}") from err
    except Exception as err:  # noqa: BLE001 - torn zip, empty file, I/O: torch raises several kinds
        raise CorruptCheckpoint(f"{path} cannot be read ({_describe(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ResumeRefused(f"{path} is not an ablate checkpoint (it has no '{FORMAT}' marker). "
                              f"It is not loaded; {fix}")
    if payload.get("version") != VERSION:
        raise ResumeRefused(f"{path} is an ablate checkpoint of format version {payload.get('version')}, but this "
                              f"version of ablate reads version {VERSION}; {fix}")
    return payload


def load_latest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of `folder` (last.pt, else previous.pt) and its path; None if there
    is none. A torn last.pt falls back to previous.pt with a warning; a file that is not an ablate checkpoint
    is refused (CheckpointError), as is a folder whose checkpoints are all torn."""
    torn: list[str] = []
    for path in (folder / LAST, folder / PREVIOUS):
        if not path.exists():
            continue
        try:
            payload = load(path)
        except CorruptCheckpoint as err:
            torn.append(str(err))
            continue
        if torn:
            log.warning("%s; resuming from the checkpoint before it, %s (step %s)", torn[0], path, payload.get("step"))
        return payload, path
    if torn:
        raise ResumeRefused(f"no checkpoint in {folder} can be read: {'; '.join(torn)}. Delete them "
                              f"(rm {folder / LAST} {folder / PREVIOUS}) or start a new run with train.resume=false")
    return None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary checkpoint files of processes that are gone (and of an earlier process that had
    this one's pid); call it while holding the folder, so that no live run writes there."""
    removed = []
    for path in folder.glob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match and (int(match.group(1)) == os.getpid() or not is_running(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary checkpoint file(s) of stopped runs from %s", len(removed), folder)
    return removed


# ---- what a checkpoint records about the data, to refuse resuming on other data

FULL_HASH_TOKENS = 1 << 26  # corpora up to this many tokens are hashed whole; larger ones by a strided sample
SAMPLE_WINDOWS, WINDOW = 256, 4096
_FINGERPRINTS: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _spans(docs) -> list[tuple[int, int, int]]:  # noqa: ANN001 - a DocSet
    """(source, start, stop) stretches of token arrays to hash, in document order: runs of adjacent documents
    whole, or, for a large corpus, windows at evenly strided positions of the document stream."""
    src, start, length = docs.source, docs.start, docs.length
    if docs.n_docs == 0:
        return []
    if docs.n_tokens <= FULL_HASH_TOKENS:
        cut = np.flatnonzero((src[1:] != src[:-1]) | (start[1:] != start[:-1] + length[:-1])) + 1
        first, last = np.concatenate([[0], cut]), np.concatenate([cut, [docs.n_docs]]) - 1
        return list(zip(src[first].tolist(), start[first].tolist(), (start[last] + length[last]).tolist()))
    end = np.cumsum(length)
    at = np.arange(SAMPLE_WINDOWS, dtype=np.int64) * docs.n_tokens // SAMPLE_WINDOWS
    k = np.searchsorted(end, at, side="right")
    offset = at - (end[k] - length[k])
    stop = start[k] + np.minimum(length[k], offset + WINDOW)
    return list(zip(src[k].tolist(), (start[k] + offset).tolist(), stop.tolist()))


def docs_fingerprint(docs) -> dict[str, Any]:  # noqa: ANN001 - a DocSet
    """Counts, and a hash of the document lengths and of the tokens (all of them, or a strided sample)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(docs.length, dtype="<i8").tobytes())
    for s, a, b in _spans(docs):
        h.update(memoryview(np.ascontiguousarray(docs.sources[s][a:b])))
    return {"docs": docs.n_docs, "tokens": docs.n_tokens, "hash": h.hexdigest()}


def batches_fingerprint(batches) -> dict[str, Any]:  # noqa: ANN001 - PackedBatch list
    """Counts, and a hash of the tokens and document layout of evaluation batches (what val/loss measures)."""
    h = hashlib.blake2b(digest_size=16)
    for b in batches:
        h.update(b.tokens.cpu().numpy().tobytes())
        h.update(repr(b.doc_lens).encode())
    return {"batches": len(batches), "tokens": sum(b.n_tokens for b in batches),
            "hash": h.hexdigest()}


def data_fingerprint(data) -> dict[str, dict[str, Any]]:  # noqa: ANN001 - ablate.data.Data
    """What identifies the run's data: its training documents and its validation batches (computed once
    per Data object)."""
    hit = _FINGERPRINTS.get(id(data))
    if hit is not None and hit[0]() is data:
        return hit[1]
    found = {"train": docs_fingerprint(data.train.docs), "val": batches_fingerprint(data.val_batches())}
    for key in [k for k, (ref, _) in _FINGERPRINTS.items() if ref() is None]:
        del _FINGERPRINTS[key]
    _FINGERPRINTS[id(data)] = (weakref.ref(data), found)
    return found


def trainer_payload(trainer, run_id: str | None) -> dict[str, Any]:  # noqa: ANN001 - a Trainer
    """Everything to resume from; with a sharded (FSDP) model every rank must call it, as it gathers."""
    model_state, optimizer_state = full_state(trainer.model, trainer.optimizer)
    return {
        "step": trainer.state.step,
        "history": trainer.state.history,
        "model": model_state,
        "optimizer": optimizer_state,
        "data": trainer.data_state,
        "fingerprint": data_fingerprint(trainer.data),
        "revisions": LanguageModel.revisions(trainer.cfg),
        "rng": rng_state(),
        "run_id": run_id,
    }


def restore(trainer, payload: dict[str, Any]) -> None:  # noqa: ANN001
    load_full_state(trainer.model, trainer.optimizer, payload["model"], payload["optimizer"])
    trainer.data.train.load_state_dict(payload["data"])
    trainer.data_state = payload["data"]
    trainer.state.step = payload["step"]
    trainer.state.history = payload["history"]
    set_rng_state(payload["rng"])
