"""The float32-softmax reference every other backend is tested against. Runs anywhere, serves every cell.

Its layout, `MaskLayout`, is also what the sdpa backend uses: the batch's document ids, turned
into a dense (B, 1, T, T) mask once per batch when the layout reaches the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ablate.kernels.base import BACKENDS, Backend, Layout
from ablate.kernels.spec import AttentionSpec, Cell, alibi_bias, allowed_mask, document_ids, is_packed


@dataclass
class MaskLayout(Layout):
    doc_ids: torch.Tensor  # (B, T) int32: each token's document within its row
    spec: AttentionSpec
    allowed: torch.Tensor | None = field(default=None)  # (B, 1, T, T) bool, made by `finish`

    def finish(self, device: torch.device) -> "MaskLayout":
        self.allowed = allowed_mask(self.spec, self.doc_ids, self.doc_ids.shape[1], device)
        return self


def prepare_mask(spec: AttentionSpec, doc_lens, n_rows: int, row_len: int) -> MaskLayout | None:  # noqa: ANN001
    if not is_packed(doc_lens):
        return None
    return MaskLayout(torch.from_numpy(document_ids(doc_lens, n_rows, row_len)), spec)


def mask_for(spec: AttentionSpec, layout: MaskLayout | None, row_len: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, T, T) bool mask of the batch: the layout's, or the spec's alone (one document per row)."""
    if layout is not None:
        return layout.allowed
    return _spec_mask(spec, row_len, str(device))


@functools.lru_cache(maxsize=16)
def _spec_mask(spec: AttentionSpec, row_len: int, device: str) -> torch.Tensor:
    return allowed_mask(spec, None, row_len, device)


@BACKENDS.register("eager")
class EagerBackend(Backend):
    name = "eager"

    def refuse(self, cell: Cell) -> str | None:
        return None

    def prepare(self, spec, doc_lens, n_rows, row_len):  # noqa: ANN001, ANN201
        return prepare_mask(spec, doc_lens, n_rows, row_len)

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, layout: MaskLayout | None = None) -> torch.Tensor:
        B, T, N, H = q_BTNH.shape
        work = torch.promote_types(q_BTNH.dtype, torch.float32)  # float32, or float64 for float64 inputs
        q_BNTH = q_BTNH.transpose(1, 2).to(work)
        k_BNTH = k_BTKH.transpose(1, 2).to(work).repeat_interleave(spec.groups, dim=1)
        v_BNTH = v_BTKH.transpose(1, 2).to(work).repeat_interleave(spec.groups, dim=1)
        scores_BNTT = (q_BNTH @ k_BNTH.transpose(-1, -2)) * H**-0.5
        if spec.alibi:
            scores_BNTT = scores_BNTT + alibi_bias(spec.slopes(q_BTNH.device), T, spec.causal).to(work)
        scores_BNTT = scores_BNTT.masked_fill(~mask_for(spec, layout, T, q_BTNH.device), float("-inf"))
        probs_BNTT = torch.softmax(scores_BNTT, dim=-1)
        return (probs_BNTT @ v_BNTH).transpose(1, 2).to(q_BTNH.dtype)
