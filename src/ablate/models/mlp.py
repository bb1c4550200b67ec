"""Feed-forward blocks. The GLU variants take hidden = 2/3 of the plain MLP's so parameters match."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ablate.registry import Registry

MLPS: Registry[type[nn.Module]] = Registry("mlp")


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


class PlainMLP(nn.Module):
    """d -> expansion*d -> d with a pointwise activation."""

    def __init__(self, d_model: int, cfg):  # noqa: ANN001
        super().__init__()
        hidden = _round(cfg.expansion * d_model, cfg.multiple_of)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class GatedMLP(nn.Module):
    """d -> (gate, value) of 2/3*expansion*d each -> d: act(gate) * value."""

    def __init__(self, d_model: int, cfg):  # noqa: ANN001
        super().__init__()
        hidden = _round(cfg.expansion * d_model * 2 / 3, cfg.multiple_of)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * value)


@MLPS.register("gelu")
class GeLUMLP(PlainMLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.gelu(h, approximate="tanh")


@MLPS.register("relu2")
class SquaredReLUMLP(PlainMLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.relu(h).square()


@MLPS.register("swiglu")
class SwiGLU(GatedMLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.silu(h)


@MLPS.register("geglu")
class GeGLU(GatedMLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.gelu(h, approximate="tanh")
