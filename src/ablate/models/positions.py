"""Positional schemes. Each acts through one of three hooks, and sees per-document positions:

- `embed(x_BTD, pos_BT)`: added at embedding time (learned, sinusoidal);
- `rotate(q_BTNH, k_BTKH, pos_BT)`: applied to queries and keys (RoPE);
- `slopes()`: a per-head linear score bias handed to the attention kernel (ALiBi).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ablate.kernels.spec import alibi_slopes
from ablate.registry import Registry

POSITIONS: Registry[type["PositionScheme"]] = Registry("pos")


class PositionScheme(nn.Module):
    def __init__(self, cfg, d_model: int, n_heads: int, head_dim: int, context: int):  # noqa: ANN001
        super().__init__()

    def embed(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        return x_BTD

    def rotate(self, q_BTNH, k_BTKH, pos_BT):  # noqa: ANN001, ANN201
        return q_BTNH, k_BTKH

    def slopes(self) -> torch.Tensor | None:
        return None


@POSITIONS.register("nope")
class NoPositions(PositionScheme):
    """No positional signal beyond the causal mask."""


@POSITIONS.register("learned")
class LearnedPositions(PositionScheme):
    def __init__(self, cfg, d_model, n_heads, head_dim, context):  # noqa: ANN001
        super().__init__(cfg, d_model, n_heads, head_dim, context)
        self.max_positions = cfg.max_positions or context
        if context > self.max_positions:
            raise ValueError(
                f"pos=learned holds {self.max_positions} positions but model.context={context}; "
                f"raise pos.max_positions to at least {context} or shorten model.context"
            )
        self.table = nn.Embedding(self.max_positions, d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def embed(self, x_BTD, pos_BT):  # noqa: ANN001, ANN201
        return x_BTD + self.table(pos_BT)


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(PositionScheme):
    def __init__(self, cfg, d_model, n_heads, head_dim, context):  # noqa: ANN001
        super().__init__(cfg, d_model, n_heads, head_dim, context)
        inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2).float() / d_model)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def embed(self, x_BTD, pos_BT):  # noqa: ANN001, ANN201
        angles = pos_BT[..., None].float() * self.inv_freq
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        return x_BTD + table.to(x_BTD.dtype)


@POSITIONS.register("rope")
class RotaryPositions(PositionScheme):
    """Rotary embeddings (Su et al.), rotating channel pairs (i, i + H/2) by position-dependent angles."""

    def __init__(self, cfg, d_model, n_heads, head_dim, context):  # noqa: ANN001
        super().__init__(cfg, d_model, n_heads, head_dim, context)
        if head_dim % 2:
            raise ValueError(f"pos=rope needs an even head dim, got {head_dim}")
        inv_freq = cfg.rope_theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, q_BTNH, k_BTKH, pos_BT):  # noqa: ANN001, ANN201
        angles_BT1F = (pos_BT[..., None].float() * self.inv_freq)[:, :, None, :]
        cos, sin = angles_BT1F.cos(), angles_BT1F.sin()
        return _rotate(q_BTNH, cos, sin), _rotate(k_BTKH, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@POSITIONS.register("alibi")
class ALiBiPositions(PositionScheme):
    """Attention with linear biases (Press et al.): the kernel adds -slope_n * (i - j) to each score."""

    def __init__(self, cfg, d_model, n_heads, head_dim, context):  # noqa: ANN001
        super().__init__(cfg, d_model, n_heads, head_dim, context)
        self.register_buffer("alibi", alibi_slopes(n_heads), persistent=False)

    def slopes(self) -> torch.Tensor:
        return self.alibi
