"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A run's checkpoints live in `<output_dir>/checkpoints/<config hash>/`, so re-running the same
command finds them: `last.pt` is resumed from; a finished run renames it to `final.pt`, which is
never resumed from (the same command then starts a new run). A data-parallel run of N ranks keeps its
own folder, `<config hash>-<train.parallel>x<N>`: rank 0 writes it, every rank resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ablate.train.distributed import full_state, load_full_state

# what does not change the numbers: where a run logs and saves, and how it is placed on devices
VOLATILE = ("paths", "tracking", "train.progress", "train.parallel", "device_pool", "cluster")


def config_key(cfg: DictConfig) -> str:
    """A short hash of everything that shapes the run's numbers (not where it logs or saves)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_dir(cfg: DictConfig, world_size: int = 1) -> Path:
    key = config_key(cfg) if world_size == 1 else f"{config_key(cfg)}-{cfg.train.parallel}x{world_size}"
    return Path(cfg.paths.output_dir).resolve() / "checkpoints" / key


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def trainer_payload(trainer, run_id: str | None) -> dict[str, Any]:  # noqa: ANN001 - a Trainer
    """Everything to resume from; with a sharded (FSDP) model every rank must call it, as it gathers."""
    model_state, optimizer_state = full_state(trainer.model, trainer.optimizer)
    return {
        "step": trainer.state.step,
        "history": trainer.state.history,
        "model": model_state,
        "optimizer": optimizer_state,
        "data": trainer.data_state,
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
