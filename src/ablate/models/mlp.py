"""Feed-forward blocks. The GLU variants take hidden = 2/3 of the plain MLP's so parameters match."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ablate.registry import Component, Registry

MLPS: Registry[type["MLP"]] = Registry("mlp")


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


class MLP(Component, nn.Module):
    """d -> hidden -> d. `hidden_width(cfg)` is the one place a variant's width is decided."""

    gated = False

    @classmethod
    def hidden_width(cls, cfg) -> int:  # noqa: ANN001
        """The hidden width: expansion * d for a plain MLP, 2/3 of it for a GLU (three matrices to
        two), plus, with model.match_params, what makes up for a GQA/MQA model's smaller K/V
        projections (2 * (N - K) * H * d weights a layer), so every attention variant has MHA's count."""
        matrices = 3 if cls.gated else 2
        width = cfg.mlp.expansion * cfg.model.d_model * 2 / matrices
        if cfg.model.match_params:
            from ablate.models.attention import ATTENTIONS

            missing_kv_heads = cfg.model.n_heads - ATTENTIONS.get(cfg.attention.name).kv_heads(cfg)
            width += 2 * missing_kv_heads * (cfg.model.d_model // cfg.model.n_heads) / matrices
        return _round(width, cfg.mlp.multiple_of)

    def __init__(self, cfg):  # noqa: ANN001
        nn.Module.__init__(self)
        d, hidden = cfg.model.d_model, self.hidden_width(cfg)
        self.up = nn.Linear(d, (2 if self.gated else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down(self.act(self.up(x)))
        # one matmul for each half of the fused weight: the backward then writes the two halves'
        # gradients to separate buffers, not to one concatenated buffer (a slower kernel on GPUs)
        w_gate, w_value = self.up.weight.chunk(2)
        return self.down(self.act(F.linear(x, w_gate)) * F.linear(x, w_value))


@MLPS.register("gelu")
class GeLUMLP(MLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.gelu(h, approximate="tanh")


@MLPS.register("relu2")
class SquaredReLUMLP(MLP):
    def act(self, h):  # noqa: ANN001, ANN201
        return F.relu(h).square()


@MLPS.register("swiglu")
class SwiGLU(MLP):
    gated = True

    def act(self, h):  # noqa: ANN001, ANN201
        return F.silu(h)


@MLPS.register("geglu")
class GeGLU(MLP):
    gated = True

    def act(self, h):  # noqa: ANN001, ANN201
        return F.gelu(h, approximate="tanh")
