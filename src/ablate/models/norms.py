"""Normalisation layers."""
from __future__ import annotations

from torch import nn

from ablate.registry import Component, Registry

NORMS: Registry[type[Component]] = Registry("norm")


@NORMS.register("rmsnorm")
class RMSNorm(Component):
    @classmethod
    def build(cls, cfg) -> nn.Module:  # noqa: ANN001
        return nn.RMSNorm(cfg.model.d_model, eps=cfg.norm.eps)


@NORMS.register("layernorm")
class LayerNorm(Component):
    @classmethod
    def build(cls, cfg) -> nn.Module:  # noqa: ANN001
        return nn.LayerNorm(cfg.model.d_model, eps=cfg.norm.eps, bias=False)
