"""Every check that can be made before any data is read or any model is built.

`plan(cfg)` returns what the run will use (device, compute dtype, attention backend) or raises one
ConfigError listing each problem with the key to change and a fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ablate.kernels import KernelRefused, select_backend
from ablate.kernels.base import Backend
from ablate.kernels.spec import Cell


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute."""


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype  # the dtype attention runs in
    cell: Cell
    backend: Backend


POSITIVE = [
    "model.n_layers", "model.n_heads", "model.d_model", "model.context", "train.steps", "train.batch_size",
    "train.log_every", "train.eval_every", "data.max_val_batches", "mlp.multiple_of",
]
NON_NEGATIVE = ["train.warmup_steps", "train.checkpoint_every", "train.weight_decay", "train.grad_clip"]


def _get(cfg: DictConfig, key: str):  # noqa: ANN202
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _registered(cfg: DictConfig) -> list[str]:
    from ablate.data import CORPORA
    from ablate.kernels import BACKENDS
    from ablate.models import ATTENTIONS, MLPS, NORMS, POSITIONS

    groups = {"attention": ATTENTIONS, "pos": POSITIONS, "mlp": MLPS, "norm": NORMS, "data": CORPORA}
    problems = []
    for group, registry in groups.items():
        name = cfg[group].name
        if name not in registry:
            problems.append(f"{group}.name='{name}' is not registered; choose one of: {', '.join(registry.names())}")
    if cfg.backend.name != "auto" and cfg.backend.name not in BACKENDS:
        problems.append(f"backend='{cfg.backend.name}' is unknown; choose auto or one of: {', '.join(BACKENDS.names())}")
    if cfg.tracking.name not in ("mlflow", "none"):
        problems.append(f"tracking.name='{cfg.tracking.name}' is unknown; choose mlflow or none")
    return problems


def _sizes(cfg: DictConfig) -> list[str]:
    problems = [f"{k}={_get(cfg, k)} must be > 0" for k in POSITIVE if _get(cfg, k) <= 0]
    problems += [f"{k}={_get(cfg, k)} must be >= 0" for k in NON_NEGATIVE if _get(cfg, k) < 0]
    if cfg.train.lr <= 0:
        problems.append(f"train.lr={cfg.train.lr} must be > 0")
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio={cfg.train.min_lr_ratio} must lie in [0, 1]")
    if not 0 < cfg.data.val_per_mille < 1000:
        problems.append(f"data.val_per_mille={cfg.data.val_per_mille} must lie in 1..999")
    m, a = cfg.model, cfg.attention
    if m.n_heads > 0 and m.d_model % m.n_heads:
        problems.append(f"model.d_model={m.d_model} is not a multiple of model.n_heads={m.n_heads}")
    if cfg.attention.name == "gqa":
        kv = a.n_kv_heads
        if kv is None or kv < 1 or (m.n_heads > 0 and m.n_heads % kv):
            problems.append(
                f"attention.n_kv_heads={kv} must divide model.n_heads={m.n_heads} for attention=gqa; "
                f"try attention.n_kv_heads={max(1, m.n_heads // 4)}"
            )
    if a.window is not None and a.window < 1:
        problems.append(f"attention.window={a.window} must be >= 1 (or null for none)")
    if cfg.pos.name == "learned" and cfg.pos.max_positions is not None and cfg.pos.max_positions < m.context:
        problems.append(
            f"pos=learned holds pos.max_positions={cfg.pos.max_positions} positions but model.context="
            f"{m.context}; raise pos.max_positions or lower model.context"
        )
    if cfg.pos.name == "rope" and m.n_heads > 0 and (m.d_model // m.n_heads) % 2:
        problems.append(f"pos=rope needs an even head dim, got model.d_model/model.n_heads={m.d_model // m.n_heads}")
    return problems


def _device(cfg: DictConfig) -> tuple[torch.device | None, list[str]]:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return None, ["device=cuda but no CUDA GPU is visible; use device=cpu or device=auto"]
    if cfg.device not in ("cpu", "cuda"):
        return None, [f"device='{cfg.device}' is unknown; choose auto, cpu or cuda"]
    return torch.device(cfg.device), []


def _dtype(cfg: DictConfig, device: torch.device) -> tuple[torch.dtype, list[str]]:
    if cfg.precision not in ("auto", "bf16", "fp32"):
        return torch.float32, [f"precision='{cfg.precision}' is unknown; choose auto, bf16 or fp32"]
    if cfg.precision == "bf16" and device.type != "cuda":
        return torch.float32, ["precision=bf16 autocast runs on CUDA only; use precision=auto or fp32 on CPU"]
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    return (torch.bfloat16 if bf16 else torch.float32), []


def _tracking(cfg: DictConfig) -> list[str]:
    """The store must be reachable now: a sweep that cannot log should not train first."""
    from ablate.tracking.store import check_tracking

    return check_tracking(cfg)


def plan(cfg: DictConfig) -> Plan:
    problems = _registered(cfg) + _sizes(cfg)
    device, more = _device(cfg)
    problems += more
    backend = cell = None
    dtype = torch.float32
    if device is not None:
        dtype, more = _dtype(cfg, device)
        problems += more
    if not problems and device is not None:
        m = cfg.model
        n_kv = {"mha": m.n_heads, "mqa": 1}.get(cfg.attention.name, cfg.attention.n_kv_heads)
        cell = Cell(device=device.type, causal=True, packed=True, alibi=cfg.pos.name == "alibi",
                    gqa=n_kv != m.n_heads, window=cfg.attention.window is not None, backward=True,
                    head_dim=m.d_model // m.n_heads, dtype=dtype)
        try:
            backend = select_backend(cell, cfg.backend.name)
        except KernelRefused as err:
            problems.append(str(err))
    if not problems:
        problems += _tracking(cfg)
    if problems:
        raise ConfigError("the configuration cannot run:\n  - " + "\n  - ".join(problems))
    return Plan(device=device, dtype=dtype, cell=cell, backend=backend)
