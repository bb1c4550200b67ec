"""Every check that can be made before any data is read or any model is built.

`plan(cfg)` returns what the run will compute with (device, dtype, the model's attention spec, the
backend chosen from that very spec, whether the step is compiled) or raises one ConfigError listing
each problem with the key to change and a fix. It touches no tracking store and no file: notebooks
call it through `ablate.build_model`. `check_io(cfg)` adds what a tracked run needs (a reachable
store, writable folders).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ablate.config import range_problems
from ablate.errors import ConfigError
from ablate.kernels import BACKENDS, KernelRefused, select_backend
from ablate.kernels.base import Backend
from ablate.kernels.spec import AttentionSpec
from ablate.models import LanguageModel


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype  # the dtype attention runs in
    spec: AttentionSpec  # what every attention layer will send to the kernel
    backend: Backend
    compile: bool  # the training step runs under torch.compile


CHOICES = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32"),
           "train.parallel": ("ddp", "fsdp"), "tracking.name": ("mlflow", "none")}


def _choices(cfg: DictConfig) -> list[str]:
    problems = []
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            problems.append(f"{key}='{value}' is unknown; choose one of: {', '.join(allowed)}")
    backend = cfg.backend.name
    if backend != "auto" and backend not in BACKENDS:
        problems.append(f"backend='{backend}' is unknown; choose auto or one of: {', '.join(BACKENDS.names())}")
    from ablate.data import CORPORA

    if cfg.data.name not in CORPORA:
        problems.append(f"data={cfg.data.name} is not registered; choose one of: {', '.join(CORPORA.names())}")
    return problems


def _get(cfg: DictConfig, key: str):  # noqa: ANN202
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _device(cfg: DictConfig) -> tuple[torch.device | None, list[str]]:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return None, ["device=cuda but no CUDA GPU is visible; use device=cpu or device=auto"]
    return torch.device(cfg.device), []


def _dtype(cfg: DictConfig, device: torch.device) -> tuple[torch.dtype, list[str]]:
    if cfg.precision == "bf16" and device.type != "cuda":
        return torch.float32, ["precision=bf16 autocast runs on CUDA only; use precision=auto or fp32 on CPU"]
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    return (torch.bfloat16 if bf16 else torch.float32), []


def compile_for(cfg: DictConfig, device: torch.device) -> bool:
    """train.compile, resolved: null means on for CUDA runs and off on CPU."""
    return device.type == "cuda" if cfg.train.compile is None else bool(cfg.train.compile)


def plan(cfg: DictConfig) -> Plan:
    problems = _choices(cfg)
    if problems:  # the rest assumes known names
        raise ConfigError("the configuration cannot run:\n  - " + "\n  - ".join(problems))
    problems = range_problems(cfg)
    problems += LanguageModel.check(cfg) if not problems else []
    device, more = _device(cfg)
    problems += more
    backend = spec = None
    dtype, compiled = torch.float32, False
    if device is not None:
        dtype, more = _dtype(cfg, device)
        problems += more
    if not problems and device is not None:
        spec = LanguageModel.spec_for(cfg)
        compiled = compile_for(cfg, device)
        cell = spec.cell(device, dtype, backward=True, packed=True, compiled=compiled)
        try:
            backend = select_backend(cell, cfg.backend.name)
        except KernelRefused as err:
            problems.append(str(err) + (" (or train.compile=false)" if compiled and cfg.backend.name != "auto" else ""))
    if problems:
        raise ConfigError("the configuration cannot run:\n  - " + "\n  - ".join(problems))
    return Plan(device=device, dtype=dtype, spec=spec, backend=backend, compile=compiled)


def check_io(cfg: DictConfig) -> None:
    """What a tracked run writes to must work now (the store reachable, the run and checkpoint folders
    writable): a sweep that cannot log or save should not train first."""
    from pathlib import Path

    from ablate.tracking.store import check_writable

    problems = _tracking(cfg) + check_writable(Path(cfg.paths.output_dir), "paths.output_dir")
    if cfg.train.checkpoint_every and not problems:
        from ablate.train.checkpoint import checkpoint_dir

        problems += check_writable(checkpoint_dir(cfg).parent, "paths.output_dir (checkpoints)")
    if problems:
        raise ConfigError("the configuration cannot run:\n  - " + "\n  - ".join(problems))


def _tracking(cfg: DictConfig) -> list[str]:
    """The store must be reachable now: a sweep that cannot log should not train first."""
    from ablate.tracking.store import check_tracking

    return check_tracking(cfg)
