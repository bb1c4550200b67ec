"""torch.nn.functional.scaled_dot_product_attention, on CPU and CUDA.

Plain dense attention (causal or not, MHA or GQA) passes no mask, so SDPA may take its fused
kernels (cuDNN or flash on CUDA, the flash kernel on CPU); `is_causal=True` says causal. Packed
rows, windows and ALiBi become one additive float mask, (B|1, 1|N, T, T) in q's dtype, from the
batch's dense boolean mask (`MaskLayout`, built once per batch). A masked call cannot use the flash
kernel; on CUDA it runs the memory-efficient (cutlass) kernel, which reads the mask from memory.

GQA/MQA pass `enable_gqa=True`, so K/V keep their K heads and nothing is repeated. One exception,
on CUDA only: where no fused kernel takes `enable_gqa` for the call (which depends on the torch
build: flash takes GQA but no mask and no float32; older memory-efficient and cuDNN kernels refuse
GQA; checked once per dtype/head_dim/mask kind) SDPA would drop to its math kernel, which
materializes every (T, T) score in float32. There K/V are repeated to N heads instead, which costs
O(T*N*H) memory rather than O(N*T^2). On CPU the fused flash kernel takes GQA with or without
a mask.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.eager import MaskLayout, mask_for, prepare_mask
from ablate.kernels.spec import AttentionSpec, Cell, alibi_bias


def additive_mask(spec: AttentionSpec, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B|1, 1|N, T, T) mask in `dtype`: ALiBi bias (or 0) where allowed, -inf elsewhere."""
    T = allowed.shape[-1]
    if spec.alibi:  # the bias in float32, then one rounding
        return alibi_bias(spec.slopes(allowed.device), T, spec.causal).masked_fill(~allowed, float("-inf")).to(dtype)
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


@functools.lru_cache(maxsize=16)
def spec_additive_mask(spec: AttentionSpec, row_len: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of rows of one document (window, ALiBi): the same for every batch and
    layer, so made once (in eager mode; a compiled step folds it into its graph)."""
    return additive_mask(spec, mask_for(spec, None, row_len, torch.device(device)), dtype)


@functools.lru_cache(maxsize=None)
def fused_gqa(device: str, dtype: torch.dtype, head_dim: int, masked: bool, causal: bool) -> bool:
    """Whether a CUDA fused SDPA kernel (flash, memory-efficient, cuDNN) takes `enable_gqa` input
    of this kind. Where none does, SDPA would run its math kernel: float32 (T, T) scores."""
    from torch.backends import cuda

    q = torch.empty(1, 2, 16, head_dim, dtype=dtype, device=device)
    kv = torch.empty(1, 1, 16, head_dim, dtype=dtype, device=device)
    mask = torch.zeros(1, 1, 16, 16, dtype=dtype, device=device) if masked else None
    params = cuda.SDPAParams(q, kv, kv, mask, 0.0, causal and not masked, True)
    checks = (cuda.can_use_flash_attention, cuda.can_use_efficient_attention,
              cuda.can_use_cudnn_attention)
    return any(check(params) for check in checks)


@torch.compiler.assume_constant_result
def kv_needs_repeat(device: str, dtype: torch.dtype, head_dim: int, masked: bool, causal: bool) -> bool:
    """Whether a GQA call on this CUDA device must repeat K/V (a constant to torch.compile, which
    cannot trace the kernel-capability probe)."""
    return not fused_gqa(device, dtype, head_dim, masked, causal)


def repeat_heads(x_BKTH: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, T, H) -> (B, K*groups, T, H), each kv head repeated for its query heads (a copy)."""
    B, K, T, H = x_BKTH.shape
    return x_BKTH[:, :, None].expand(B, K, groups, T, H).reshape(B, K * groups, T, H)


def sdpa(q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, mask: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
    """SDPA on BTNH tensors: `mask` is an additive (B|1, 1|N, T, T) mask or None (causal flag)."""
    H = q_BTNH.shape[-1]
    q_BNTH, k_BKTH, v_BKTH = (t.transpose(1, 2) for t in (q_BTNH, k_BTKH, v_BTKH))
    gqa = spec.groups > 1
    if gqa and q_BTNH.is_cuda and kv_needs_repeat(str(q_BTNH.device), q_BTNH.dtype, H, mask is not None, spec.causal):
        k_BKTH, v_BKTH = repeat_heads(k_BKTH, spec.groups), repeat_heads(v_BKTH, spec.groups)
        gqa = False
    o_BNTH = F.scaled_dot_product_attention(q_BNTH, k_BKTH, v_BKTH, attn_mask=mask,
                                            is_causal=spec.causal and mask is None, enable_gqa=gqa)
    return o_BNTH.transpose(1, 2)


@BACKENDS.register("sdpa")
class SdpaBackend(Backend):
    name = "sdpa"

    def refuse(self, cell: Cell) -> str | None:
        return None

    def caveat(self, cell: Cell) -> str | None:
        notes = []
        if cell.packed or cell.window or cell.alibi:
            notes.append("a dense (T, T) float mask per batch: O(T^2) memory, no flash kernel")
        if cell.gqa and cell.device == "cuda":
            notes.append("GQA repeats K/V where no fused kernel takes enable_gqa (see fused_gqa)")
        return "; ".join(notes) or None

    def prepare(self, spec, doc_lens, n_rows, row_len):  # noqa: ANN001, ANN201
        return prepare_mask(spec, doc_lens, n_rows, row_len)

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, layout: MaskLayout | None = None) -> torch.Tensor:
        mask = None
        if layout is not None:
            mask = additive_mask(spec, layout.allowed, q_BTNH.dtype)
        elif spec.window is not None or spec.alibi:  # more than SDPA's own causal flag
            mask = spec_additive_mask(spec, q_BTNH.shape[1], str(q_BTNH.device), q_BTNH.dtype)
        return sdpa(q_BTNH, k_BTKH, v_BTKH, spec, mask)
