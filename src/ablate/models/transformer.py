"""A decoder-only language model: embeddings, pre-norm blocks, final norm, tied head.

    model(tokens_BT)                                    # one document per row
    model(tokens_BT, doc_lens=((300, 724), (1024,)))    # packed rows: positions restart per document
    model.loss(tokens_BT, targets_BT, positions_BT, layout=layout)   # the training step's call

In training, the batch's positions and its kernel layout (`model.prepare(doc_lens, B, T)`, moved
to the device) are made with the batch, so the step itself does no host work.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ablate.kernels import get_backend
from ablate.kernels.base import Backend, Layout
from ablate.kernels.spec import AttentionSpec, DocLens
from ablate.models.attention import ATTENTIONS
from ablate.models.loss import cross_entropy
from ablate.models.mlp import MLPS
from ablate.models.norms import NORMS
from ablate.models.positions import POSITIONS
from ablate.registry import Component

COMPONENTS = (("attention", ATTENTIONS), ("pos", POSITIONS), ("mlp", MLPS), ("norm", NORMS))


def dropout(p: float) -> nn.Module:
    """Dropout with probability p; nothing at all when p is 0 (not even a mask in the compiled step)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg):  # noqa: ANN001 - the full run config
        super().__init__()
        self.attn_norm = NORMS.build(cfg.norm.name, cfg)
        self.attn = ATTENTIONS.build(cfg.attention.name, cfg)
        self.mlp_norm = NORMS.build(cfg.norm.name, cfg)
        self.mlp = MLPS.build(cfg.mlp.name, cfg)
        self.drop = dropout(cfg.model.dropout)  # on each residual branch

    def forward(self, x_BTD, positions, rotation, layout):  # noqa: ANN001, ANN201
        x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), positions, rotation, layout))
        return x_BTD + self.drop(self.mlp(self.mlp_norm(x_BTD)))


def positions_for(doc_lens: DocLens | None, n_rows: int, row_len: int) -> torch.Tensor:
    """(B, T) int64 positions that restart at every document."""
    if doc_lens is None:
        return torch.arange(row_len).expand(n_rows, row_len)
    return torch.from_numpy(np.stack([np.concatenate([np.arange(n) for n in row]) for row in doc_lens]))


class LanguageModel(Component, nn.Module):
    @classmethod
    def spec_for(cls, cfg) -> AttentionSpec:  # noqa: ANN001
        """The attention spec every layer of this model will send to its kernel."""
        return ATTENTIONS.get(cfg.attention.name).spec_for(cfg)

    @classmethod
    def check(cls, cfg) -> list[str]:  # noqa: ANN001
        """The model's own rules, then each chosen component's."""
        problems = []
        for group, registry in COMPONENTS:
            name = cfg[group].name
            if name not in registry:
                problems.append(f"{group}={name} is not registered; choose one of: {', '.join(registry.names())}")
            else:
                problems += registry.check(name, cfg)
        return problems

    @classmethod
    def revisions(cls, cfg) -> dict[str, int]:  # noqa: ANN001
        """The revision of each component the model of `cfg` is built from, by `group=name`."""
        return {f"{group}={cfg[group].name}": registry.get(cfg[group].name).revision for group, registry in COMPONENTS}

    def __init__(self, cfg, vocab_size: int, backend: Backend | None = None):  # noqa: ANN001
        nn.Module.__init__(self)
        m = cfg.model
        self.vocab_size = vocab_size
        self.max_length = POSITIONS.get(cfg.pos.name).max_length(cfg)
        padded_vocab = 64 * math.ceil(vocab_size / 64)
        self.embed = nn.Embedding(padded_vocab, m.d_model)
        self.embed_drop = dropout(m.dropout)
        self.positions = POSITIONS.build(cfg.pos.name, cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.n_layers))
        self.norm = NORMS.build(cfg.norm.name, cfg)
        self.head = nn.Linear(m.d_model, padded_vocab, bias=False)
        self.spec = self.spec_for(cfg)
        # the head is padded to a multiple of 64 (faster matmuls); the loss gives padding ids no mass
        pad = torch.zeros(padded_vocab)
        pad[vocab_size:] = float("-inf")
        self.register_buffer("vocab_pad", pad, persistent=False)
        self._init(m.init_std, m.n_layers)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        self.backend = backend if backend is not None else get_backend("sdpa")  # serves every cell, any device

    @property
    def backend(self) -> Backend | None:
        return self._backend

    @backend.setter
    def backend(self, backend: Backend | None) -> None:
        self._backend = backend
        for block in self.blocks:
            block.attn.kernel = backend

    def _init(self, std: float, n_layers: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # residual projections shrink with depth (GPT-2)
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else 1
            nn.init.normal_(p, std=std * scale)

    def prepare(self, doc_lens: DocLens | None, n_rows: int, row_len: int) -> Layout | None:
        """The kernel's layout of a batch (on the host; `.to(device)` it before the forward)."""
        return self.backend.prepare(self.spec, doc_lens, n_rows, row_len)

    def forward(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                doc_lens: DocLens | None = None, layout: Layout | None = None) -> torch.Tensor:
        """Logits (B, T, vocab). Documents (`doc_lens`, or a prepared `layout`) never see each other;
        positions default to restarting at each document."""
        return self.padded_logits(tokens_BT, positions_BT, doc_lens, layout)[..., : self.vocab_size]

    def padded_logits(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                      doc_lens: DocLens | None = None, layout: Layout | None = None) -> torch.Tensor:
        B, T = tokens_BT.shape
        if self.max_length is not None and T > self.max_length:
            raise ValueError(f"a row of {T} tokens is longer than the {self.max_length} positions this model's "
                             "positional scheme holds")
        if positions_BT is None:
            positions_BT = positions_for(doc_lens, B, T).to(tokens_BT.device)
        if layout is None and doc_lens is not None:
            layout = self.prepare(doc_lens, B, T)
            layout = layout if layout is None else layout.to(tokens_BT.device)
        x_BTD = self.embed_drop(self.positions.embed(self.embed(tokens_BT), positions_BT))
        rotation = self.positions.rotation(positions_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, self.positions, rotation, layout)
        return self.head(self.norm(x_BTD))

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
             doc_lens: DocLens | None = None, layout: Layout | None = None, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the vocabulary (float32 softmax); targets -100 are ignored."""
        logits = self.padded_logits(tokens_BT, positions_BT, doc_lens, layout)
        return cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), self.vocab_pad, reduction)


def count_params(model: LanguageModel, non_embedding: bool = False) -> int:
    """Parameters (tied ones once); `non_embedding` leaves out the token and position tables."""
    params = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in params.values())
    if non_embedding:
        n -= model.embed.weight.numel()
        if isinstance(getattr(model.positions, "table", None), nn.Embedding):
            n -= model.positions.table.weight.numel()
    return n


def matmul_params(model: LanguageModel) -> int:
    """Parameters that multiply activations once per token: every linear layer, the output head
    included (tied or not); embeddings and norms excluded. 6x this is a token's weight FLOPs."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
