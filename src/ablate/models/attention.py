"""Self-attention variants. They differ in how many key/value heads they keep; the kernel that
computes attention is handed in and never branched on."""
from __future__ import annotations

import torch
from torch import nn

from ablate.kernels.base import Backend
from ablate.kernels.spec import AttentionSpec
from ablate.models.positions import PositionScheme
from ablate.registry import Registry

ATTENTIONS: Registry[type["Attention"]] = Registry("attention")


class Attention(nn.Module):
    """Projects x_BTD to q_BTNH, k_BTKH, v_BTKH, applies the positional rotation, and attends."""

    def __init__(self, d_model: int, n_heads: int, cfg):  # noqa: ANN001
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} is not a multiple of model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = self.kv_heads(n_heads, cfg)
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    @staticmethod
    def kv_heads(n_heads: int, cfg) -> int:  # noqa: ANN001
        raise NotImplementedError

    def forward(
        self,
        x_BTD: torch.Tensor,
        pos_BT: torch.Tensor,
        positions: PositionScheme,
        spec: AttentionSpec,
        kernel: Backend,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTD).split([N * H, K * H, K * H], dim=-1)
        q_BTNH, k_BTKH = positions.rotate(q.view(B, T, N, H), k.view(B, T, K, H), pos_BT)
        o_BTNH = kernel.attend(q_BTNH, k_BTKH, v.view(B, T, K, H), spec)
        return self.out(o_BTNH.reshape(B, T, N * H))


@ATTENTIONS.register("mha")
class MultiHeadAttention(Attention):
    @staticmethod
    def kv_heads(n_heads, cfg):  # noqa: ANN001, ANN205
        return n_heads


@ATTENTIONS.register("gqa")
class GroupedQueryAttention(Attention):
    @staticmethod
    def kv_heads(n_heads, cfg):  # noqa: ANN001, ANN205
        if cfg.n_kv_heads is None or cfg.n_kv_heads < 1 or n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"attention=gqa needs attention.n_kv_heads to divide model.n_heads={n_heads}, "
                f"got {cfg.n_kv_heads}; try attention.n_kv_heads={max(1, n_heads // 4)}"
            )
        return cfg.n_kv_heads


@ATTENTIONS.register("mqa")
class MultiQueryAttention(Attention):
    @staticmethod
    def kv_heads(n_heads, cfg):  # noqa: ANN001, ANN205
        return 1
