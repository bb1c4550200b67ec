"""Cross-entropy over a (padded) vocabulary that keeps only the logits, in their own dtype, for the backward.

`F.cross_entropy(logits.float(), ...)` saves its float32 log-probabilities for the backward: under
bf16 that is twice the logits' bytes, written in the forward and read back in the backward (at
GPT-2's vocabulary and 32 x 1024 tokens, 6.6 GB a step). Here the forward saves the logits as they
came and each token's log-sum-exp, and the backward recomputes the probabilities from them in
float32: the same loss and gradient from a saved tensor half the size (on an H200 the compiled
GPT-2-small step ran about 1.8% faster).
"""
from __future__ import annotations

import torch

from ablate.data.tokenizer import IGNORE_INDEX


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor, bias_V: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        z_NV = logits_NV.float() + bias_V
        lse_N = torch.logsumexp(z_NV, dim=-1)
        valid_N = targets_N != IGNORE_INDEX
        picked_N = z_NV.gather(-1, torch.where(valid_N, targets_N, 0)[:, None]).squeeze(-1)
        ctx.save_for_backward(logits_NV, targets_N, bias_V, lse_N)
        return torch.where(valid_N, lse_N - picked_N, 0.0)

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor):  # noqa: ANN001, ANN205
        logits_NV, targets_N, bias_V, lse_N = ctx.saved_tensors
        valid_N = targets_N != IGNORE_INDEX
        probs_NV = torch.exp(logits_NV.float() + bias_V - lse_N[:, None])
        vocab = torch.arange(logits_NV.shape[-1], device=logits_NV.device)
        grad_NV = (probs_NV - (vocab == targets_N[:, None]).float()) * torch.where(valid_N, grad_N, 0.0)[:, None]
        return grad_NV.to(logits_NV.dtype), None, None


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, bias_V: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(logits + bias) in float32, as `F.cross_entropy` computes it
    (targets IGNORE_INDEX count for nothing; "mean" is over the other targets; "none" gives 0 at
    ignored ones). `bias_V` is added to every row (-inf at padding ids gives them no mass)."""
    losses_N = _TokenCrossEntropy.apply(logits_NV, targets_N, bias_V)
    if reduction == "none":
        return losses_N
    if reduction == "sum":
        return losses_N.sum()
    if reduction == "mean":
        return losses_N.sum() / (targets_N != IGNORE_INDEX).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
