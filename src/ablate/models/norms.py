"""Normalisation layers."""
from __future__ import annotations

from torch import nn

from ablate.registry import Registry

NORMS: Registry = Registry("norm")


@NORMS.register("rmsnorm")
def rmsnorm(d_model: int, cfg) -> nn.Module:  # noqa: ANN001
    return nn.RMSNorm(d_model, eps=cfg.eps)


@NORMS.register("layernorm")
def layernorm(d_model: int, cfg) -> nn.Module:  # noqa: ANN001
    return nn.LayerNorm(d_model, eps=cfg.eps, bias=False)
