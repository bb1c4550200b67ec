"""torch.nn.functional.scaled_dot_product_attention, on CPU and CUDA.

Plain dense attention (causal or not, MHA or GQA) passes no mask, so SDPA may take its fused
kernels (cuDNN or flash on CUDA, the flash kernel on CPU); `is_causal=True` says causal. Packed
rows, windows and ALiBi become one additive float mask per batch, (B|1, 1|N, T, T) in q's dtype,
built once through `spec.cached` and shared by every layer. A masked call cannot use the flash
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
from ablate.kernels.spec import AttentionSpec, Cell, allowed_mask


def needs_mask(spec: AttentionSpec) -> bool:
    """Whether the batch needs more than SDPA's own causal flag (documents, window or ALiBi)."""
    return spec.packed or spec.window is not None or spec.alibi_slopes is not None


def additive_mask(spec: AttentionSpec, n_rows: int, row_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(B|1, 1|N, T, T) mask in `dtype`: ALiBi bias (or 0) where allowed, -inf elsewhere.

    The batch dimension is 1 unless rows hold different documents; the head dimension is 1 unless
    ALiBi gives each head its own bias. Built a head at a time, so the only float32 temporaries
    are (B|1, T, T). Every query sees at least itself, so no row is all -inf.
    """
    rows = n_rows if spec.packed else 1
    blocked_BTT = ~allowed_mask(spec, rows, row_len, device)[:, 0]
    if spec.alibi_slopes is None:
        mask = torch.zeros(rows, 1, row_len, row_len, dtype=dtype, device=device)
        return mask.masked_fill_(blocked_BTT[:, None], float("-inf"))
    i = torch.arange(row_len, device=device)
    dist_TT = (i[:, None] - i[None, :]).float()
    if not spec.causal:
        dist_TT = dist_TT.abs()
    mask = torch.empty(rows, spec.n_heads, row_len, row_len, dtype=dtype, device=device)
    slopes_N = spec.alibi_slopes.to(device=device, dtype=torch.float32)  # stays on the device: no host read
    for n in range(spec.n_heads):
        mask[:, n] = (dist_TT * -slopes_N[n]).masked_fill(blocked_BTT, float("-inf"))
    return mask


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


def repeat_heads(x_BKTH: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, T, H) -> (B, K*groups, T, H), each kv head repeated for its query heads (a copy)."""
    B, K, T, H = x_BKTH.shape
    return x_BKTH[:, :, None].expand(B, K, groups, T, H).reshape(B, K * groups, T, H)


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

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec) -> torch.Tensor:
        B, T, N, H = q_BTNH.shape
        q_BNTH = q_BTNH.transpose(1, 2)
        k_BKTH = k_BTKH.transpose(1, 2)
        v_BKTH = v_BTKH.transpose(1, 2)
        mask = None
        if needs_mask(spec):
            key = f"sdpa.mask.{B}x{T}.{q_BTNH.dtype}.{q_BTNH.device}"
            mask = spec.cached(key, lambda: additive_mask(spec, B, T, q_BTNH.dtype, q_BTNH.device))
        gqa = spec.groups > 1
        if gqa and q_BTNH.is_cuda and not fused_gqa(
            str(q_BTNH.device), q_BTNH.dtype, H, mask is not None, spec.causal
        ):
            k_BKTH, v_BKTH = repeat_heads(k_BKTH, spec.groups), repeat_heads(v_BKTH, spec.groups)
            gqa = False
        o_BNTH = F.scaled_dot_product_attention(
            q_BNTH, k_BKTH, v_BKTH, attn_mask=mask,
            is_causal=spec.causal and mask is None, enable_gqa=gqa,
        )
        return o_BNTH.transpose(1, 2)
