"""Positional schemes. Each acts through one of three hooks, and sees per-document positions:

- `embed(x_BTD, pos_BT)`: added at embedding time (learned, sinusoidal);
- `rotation(pos_BT)` once per forward, then `rotate(qk_BTMH, n_heads, rotation)` in every layer
  (RoPE, `rotates = True`), on q and k projected together: M = N + K heads, q the first N;
- `alibi = True`: a per-head linear score bias that the attention kernel adds (ALiBi).

`max_length(cfg)` says how long a document the scheme can place (None: any length), which is what
length extrapolation asks of it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ablate.models.rope_kernel import rope
from ablate.registry import Component, Registry

POSITIONS: Registry[type["PositionScheme"]] = Registry("pos")


def head_dim(cfg) -> int:  # noqa: ANN001
    return cfg.model.d_model // cfg.model.n_heads


class PositionScheme(Component, nn.Module):
    alibi = False
    rotates = False  # True: attention projects q and k together and calls `rotate` on them

    def __init__(self, cfg):  # noqa: ANN001
        nn.Module.__init__(self)

    @classmethod
    def max_length(cls, cfg) -> int | None:  # noqa: ANN001
        return None

    def embed(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        return x_BTD

    def rotation(self, pos_BT: torch.Tensor):  # noqa: ANN201
        return None

    def rotate(self, qk_BTMH: torch.Tensor, n_heads: int, rotation) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """q (the first `n_heads` heads of qk) and k, each rotated by the scheme (here: left as they are)."""
        return qk_BTMH[:, :, :n_heads], qk_BTMH[:, :, n_heads:]


@POSITIONS.register("nope")
class NoPositions(PositionScheme):
    """No positional signal beyond the causal mask."""


@POSITIONS.register("learned")
class LearnedPositions(PositionScheme):
    def __init__(self, cfg):  # noqa: ANN001
        super().__init__(cfg)
        self.table = nn.Embedding(self.max_length(cfg), cfg.model.d_model)
        nn.init.normal_(self.table.weight, std=cfg.model.init_std)

    @classmethod
    def max_length(cls, cfg) -> int:  # noqa: ANN001
        return cfg.pos.max_positions or cfg.model.context

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        if cls.max_length(cfg) < cfg.model.context:
            return [f"pos=learned holds pos.max_positions={cfg.pos.max_positions} positions but model.context="
                    f"{cfg.model.context}; raise pos.max_positions to at least {cfg.model.context} or lower model.context"]
        return []

    def embed(self, x_BTD, pos_BT):  # noqa: ANN001, ANN201
        return x_BTD + self.table(pos_BT)


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(PositionScheme):
    """Fixed sinusoids (Vaswani et al.) added to the token embeddings at the embeddings' own scale
    (RMS model.init_std). Vaswani et al. keep the same balance by multiplying their embeddings (std
    d^-1/2) by sqrt(d); unit-amplitude sinusoids on embeddings of std 0.02 would swamp the tokens
    35 to 1, and the model would first have to learn to see them.
    """

    revision = 2
    revised = "the sinusoids now enter at the token embeddings' scale (RMS model.init_std), not at amplitude 1"

    def __init__(self, cfg):  # noqa: ANN001
        super().__init__(cfg)
        d = cfg.model.d_model
        inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2).float() / d)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = cfg.model.init_std * math.sqrt(2)  # the table's RMS becomes model.init_std

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        if cfg.model.d_model % 2:
            return [f"pos=sinusoidal needs an even model.d_model, got {cfg.model.d_model}"]
        return []

    def embed(self, x_BTD, pos_BT):  # noqa: ANN001, ANN201
        angles = pos_BT[..., None].float() * self.inv_freq
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        return x_BTD + (table * self.scale).to(x_BTD.dtype)


@POSITIONS.register("rope")
class RotaryPositions(PositionScheme):
    """Rotary embeddings (Su et al.), rotating channel pairs (i, i + H/2) by position-dependent angles.

    The cosines and sines of positions 0 .. model.context - 1 are computed once, in float32, and
    each forward looks its positions up in that table. Computed in the forward instead, a compiled
    step recomputes them inside every layer's rotation kernels, in the forward and the backward:
    on a GPU that made the rotation compute-bound, at about twice its memory-bound cost. A row
    longer than the table (evaluation past the training context) computes its angles from the
    same formula. Positions are looked up, so each must be below max(T, model.context): true of
    per-document positions, which every caller makes (learned positions have the same rule).

    q and k arrive projected together, and one kernel (`ablate.models.rope_kernel.rope`, Triton on
    CUDA) rotates both and hands the attention kernel separate q and k; its backward writes the
    projection's gradient in one piece. Rotating q and k apart as compiled elementwise code cost
    more: on an H200 the Llama cell of benchmarks/train_throughput.py ran 1.6% and 2.2% faster this
    way in two runs, GPT-2 with RoPE 4.1% (see benchmarks/RESULTS.md).
    """

    rotates = True

    def __init__(self, cfg):  # noqa: ANN001
        super().__init__(cfg)
        H = head_dim(cfg)
        inv_freq = cfg.pos.rope_theta ** (-torch.arange(0, H, 2).float() / H)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = _cos_sin(torch.arange(cfg.model.context), inv_freq)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        if cfg.model.n_heads > 0 and head_dim(cfg) % 2:
            return [f"pos=rope needs an even head dim, got model.d_model/model.n_heads={head_dim(cfg)}; "
                    "change model.d_model or model.n_heads"]
        return []

    def rotation(self, pos_BT):  # noqa: ANN001, ANN201
        if pos_BT.shape[-1] <= self.cos_table.shape[0]:  # positions restart per document: all < T
            cos_BTF, sin_BTF = self.cos_table[pos_BT], self.sin_table[pos_BT]
        else:
            cos_BTF, sin_BTF = _cos_sin(pos_BT, self.inv_freq)
        return cos_BTF[:, :, None, :], sin_BTF[:, :, None, :]

    def rotate(self, qk_BTMH, n_heads, rotation):  # noqa: ANN001, ANN201
        cos, sin = rotation
        return rope(qk_BTMH, cos, sin, n_heads)


def _cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles (pos * inv_freq), float32, shape (*pos.shape, H/2)."""
    angles = pos[..., None].float() * inv_freq
    return angles.cos(), angles.sin()


@POSITIONS.register("alibi")
class ALiBiPositions(PositionScheme):
    """Attention with linear biases (Press et al.): the kernel adds -slope_n * (i - j) to each score,
    with the standard slopes (`ablate.kernels.alibi_slopes`)."""

    alibi = True
