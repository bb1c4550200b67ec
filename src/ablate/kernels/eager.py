"""The float32-softmax reference every other backend is tested against. Runs anywhere, serves every cell."""
from __future__ import annotations

import torch

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.spec import AttentionSpec, Cell, alibi_bias, allowed_mask


@BACKENDS.register("eager")
class EagerBackend(Backend):
    name = "eager"

    def refuse(self, cell: Cell) -> str | None:
        return None

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec) -> torch.Tensor:
        B, T, N, H = q_BTNH.shape
        work = torch.promote_types(q_BTNH.dtype, torch.float32)  # float32, or float64 for float64 inputs
        q_BNTH = q_BTNH.transpose(1, 2).to(work)
        k_BNTH = k_BTKH.transpose(1, 2).to(work).repeat_interleave(spec.groups, dim=1)
        v_BNTH = v_BTKH.transpose(1, 2).to(work).repeat_interleave(spec.groups, dim=1)
        scores_BNTT = (q_BNTH @ k_BNTH.transpose(-1, -2)) * H**-0.5
        if spec.alibi_slopes is not None:
            bias = alibi_bias(spec.alibi_slopes.to(q_BTNH.device), T, spec.causal)
            scores_BNTT = scores_BNTT + bias.to(work)
        ok = spec.cached(f"eager.mask.{B}x{T}", lambda: allowed_mask(spec, B, T, q_BTNH.device))
        scores_BNTT = scores_BNTT.masked_fill(~ok, float("-inf"))
        probs_BNTT = torch.softmax(scores_BNTT, dim=-1)
        return (probs_BNTT @ v_BNTH).transpose(1, 2).to(q_BTNH.dtype)
