"""Self-attention: one module for MHA, GQA and MQA, which differ only in their key/value head count.

The variant declares that count (`kv_heads`) and its rules (`check`); `spec_for(cfg)` derives the
`AttentionSpec` every layer sends to the kernel, once, from the variant and the positional scheme
(whose ALiBi hook is a score bias the kernel adds). The module owns its kernel (`self.kernel`, set
by the model) and never branches on which one it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ablate.kernels.base import Backend, Layout
from ablate.kernels.spec import AttentionSpec
from ablate.models.positions import POSITIONS, PositionScheme, head_dim
from ablate.registry import Component, Registry

ATTENTIONS: Registry[type["Attention"]] = Registry("attention")


class Attention(Component, nn.Module):
    """Projects x_BTD to q_BTNH, k_BTKH, v_BTKH, applies the positional rotation, and attends.

    The projection is one weight, (N + 2K) * H rows; how it is multiplied depends on what follows:
    a rotating scheme (RoPE) takes q and k from one matmul (its kernel splits them), and v comes
    from its own; otherwise a backend that reads packed buffers (`Backend.packs_qkv`) gets one
    matmul each, and any other one slices a single fused matmul."""

    @classmethod
    def kv_heads(cls, cfg) -> int:  # noqa: ANN001
        raise NotImplementedError

    @classmethod
    def spec_for(cls, cfg) -> AttentionSpec:  # noqa: ANN001
        m = cfg.model
        return AttentionSpec(n_heads=m.n_heads, n_kv_heads=cls.kv_heads(cfg), head_dim=head_dim(cfg), causal=True,
                             window=cfg.attention.window, alibi=POSITIONS.get(cfg.pos.name).alibi)

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        m = cfg.model
        if m.d_model % m.n_heads:
            return [f"model.d_model={m.d_model} is not a multiple of model.n_heads={m.n_heads}"]
        return []

    def __init__(self, cfg):  # noqa: ANN001
        nn.Module.__init__(self)
        self.spec = self.spec_for(cfg)
        N, K, H = self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim
        self.qkv = nn.Linear(cfg.model.d_model, (N + 2 * K) * H, bias=False)
        self.out = nn.Linear(N * H, cfg.model.d_model, bias=False)
        self.kernel: Backend | None = None  # set by the model

    def forward(self, x_BTD: torch.Tensor, positions: PositionScheme, rotation, layout: Layout | None) -> torch.Tensor:  # noqa: ANN001
        B, T, _ = x_BTD.shape
        N, K, H = self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim
        if positions.rotates:  # q and k in one matmul, rotated by one kernel into separate packed q and k
            w_qk, w_v = self.qkv.weight.split([(N + K) * H, K * H])
            q_BTNH, k_BTKH = positions.rotate(F.linear(x_BTD, w_qk).view(B, T, N + K, H), N, rotation)
            v = F.linear(x_BTD, w_v)
        else:
            widths = [N * H, K * H, K * H]
            if self.kernel.packs_qkv(self.spec, layout):  # one matmul each: packed q, k, v, and the same weights
                q, k, v = (F.linear(x_BTD, w) for w in self.qkv.weight.split(widths))
            else:
                q, k, v = self.qkv(x_BTD).split(widths, dim=-1)
            q_BTNH, k_BTKH = q.view(B, T, N, H), k.view(B, T, K, H)
        o_BTNH = self.kernel.attend(q_BTNH, k_BTKH, v.view(B, T, K, H), self.spec, layout)
        return self.out(o_BTNH.reshape(B, T, N * H))


@ATTENTIONS.register("mha")
class MultiHeadAttention(Attention):
    @classmethod
    def kv_heads(cls, cfg) -> int:  # noqa: ANN001
        return cfg.model.n_heads


@ATTENTIONS.register("gqa")
class GroupedQueryAttention(Attention):
    @classmethod
    def kv_heads(cls, cfg) -> int:  # noqa: ANN001
        return cfg.attention.n_kv_heads

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        heads, kv = cfg.model.n_heads, cfg.attention.n_kv_heads
        if kv < 1 or heads % kv:
            return [f"attention.n_kv_heads={kv} must divide model.n_heads={heads} for attention=gqa; "
                    f"try attention.n_kv_heads={max(1, heads // 4)}"]
        return super().check(cfg)


@ATTENTIONS.register("mqa")
class MultiQueryAttention(Attention):
    @classmethod
    def kv_heads(cls, cfg) -> int:  # noqa: ANN001
        return 1
