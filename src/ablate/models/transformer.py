"""A decoder-only language model: embeddings, pre-norm blocks, final norm, tied head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ablate.kernels.base import Backend
from ablate.kernels.spec import AttentionSpec
from ablate.models.attention import ATTENTIONS
from ablate.models.mlp import MLPS
from ablate.models.norms import NORMS
from ablate.models.positions import POSITIONS, PositionScheme


class Block(nn.Module):
    def __init__(self, cfg):  # noqa: ANN001 - the full run config
        super().__init__()
        d = cfg.model.d_model
        self.attn_norm = NORMS.build(cfg.norm.name, d, cfg.norm)
        self.attn = ATTENTIONS.build(cfg.attention.name, d, cfg.model.n_heads, cfg.attention)
        self.mlp_norm = NORMS.build(cfg.norm.name, d, cfg.norm)
        self.mlp = MLPS.build(cfg.mlp.name, d, cfg.mlp)

    def forward(self, x_BTD, pos_BT, positions: PositionScheme, spec: AttentionSpec, kernel: Backend):  # noqa: ANN001, ANN201
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), pos_BT, positions, spec, kernel)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class LanguageModel(nn.Module):
    def __init__(self, cfg, vocab_size: int, kernel: Backend):  # noqa: ANN001
        super().__init__()
        m = cfg.model
        self.kernel = kernel
        self.context = m.context
        self.n_heads = m.n_heads
        self.head_dim = m.d_model // m.n_heads
        self.window = cfg.attention.window
        self.vocab_size = vocab_size
        padded_vocab = 64 * math.ceil(vocab_size / 64)
        self.embed = nn.Embedding(padded_vocab, m.d_model)
        self.positions = POSITIONS.build(cfg.pos.name, cfg.pos, m.d_model, m.n_heads, self.head_dim, m.context)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.n_layers))
        self.n_kv_heads = self.blocks[0].attn.n_kv_heads
        self.norm = NORMS.build(cfg.norm.name, m.d_model, cfg.norm)
        self.head = nn.Linear(m.d_model, padded_vocab, bias=False)
        self._init(m.init_std, m.n_layers)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, std: float, n_layers: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # residual projections shrink with depth (GPT-2)
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else 1
            nn.init.normal_(p, std=std * scale)

    def attention_spec(self, doc_lens: tuple[tuple[int, ...], ...] | None) -> AttentionSpec:
        return AttentionSpec(
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            causal=True,
            doc_lens=doc_lens,
            alibi_slopes=self.positions.slopes(),
            window=self.window,
        )

    def forward(self, tokens_BT: torch.Tensor, pos_BT: torch.Tensor, doc_lens=None) -> torch.Tensor:  # noqa: ANN001
        """Logits (B, T, vocab) for each position; doc_lens keeps packed documents apart."""
        if tokens_BT.shape[1] > self.context:
            raise ValueError(f"a row of {tokens_BT.shape[1]} tokens exceeds model.context={self.context}")
        spec = self.attention_spec(doc_lens)
        x_BTD = self.positions.embed(self.embed(tokens_BT), pos_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, pos_BT, self.positions, spec, self.kernel)
        return self.head(self.norm(x_BTD))[..., : self.vocab_size]

    def loss(self, batch, reduction: str = "mean") -> torch.Tensor:  # noqa: ANN001 - a PackedBatch
        logits = self(batch.tokens, batch.positions, batch.doc_lens)
        return F.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction=reduction
        )


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    params = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in params.values())
    if non_embedding:
        n -= model.embed.weight.numel()
        if isinstance(getattr(model.positions, "table", None), nn.Embedding):
            n -= model.positions.table.weight.numel()
    return n
