"""torch.nn.attention.flex_attention: block-sparse masks and ALiBi as a score_mod, with backward.

The mask is composed from plain mask_mod functions (causal, same document, sliding window), the
same shape as torchtitan's `get_document_mask_mod` / `get_sliding_window_mask_mod`; the block
mask lets the kernel skip every fully masked (128 x 128) tile, so packed rows and windows cost only
their unmasked work. ALiBi is a score_mod, applied in float32 inside the kernel. GQA/MQA use
`enable_gqa=True`: each query head reads its kv head, nothing is repeated (on CUDA; the CPU path
is PyTorch's unfused reference, which does repeat).

On CUDA, flex_attention and create_block_mask are compiled once per process (lazily, on first
use). Block masks are kept in a small LRU keyed on the packing layout (document lengths, T,
window, causal, device), so a layout seen before is never rebuilt.

On CPU flex_attention runs forward only (PyTorch raises "FlexAttention does not support backward
on CPU" for inputs that require grad), uncompiled: useful to check masks, not for speed.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.spec import AttentionSpec, Cell, document_ids

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch without flex attention
    flex_attention = create_block_mask = BlockMask = None

MaskMod = Callable[..., torch.Tensor]
BLOCK_MASK_CACHE_SIZE = 16
_block_masks: OrderedDict[tuple, BlockMask] = OrderedDict()
_compiled: dict[str, Callable] = {}
RECOMPILE_LIMIT = 256


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def get_document_mask_mod(mask_mod: MaskMod | None, doc_BT: torch.Tensor) -> MaskMod:
    """Restrict `mask_mod` (None: allow all) to pairs in the same document of the row."""

    def document_mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_BT[b, q_idx] == doc_BT[b, kv_idx]
        return same_doc if mask_mod is None else same_doc & mask_mod(b, h, q_idx, kv_idx)

    return document_mask_mod


def get_sliding_window_mask_mod(window: int, causal: bool) -> MaskMod:
    """A query at i sees keys with i - window < j <= i (causal) or |i - j| < window."""

    def sliding_window_mask_mod(b, h, q_idx, kv_idx):
        if causal:
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return (q_idx - kv_idx).abs() < window

    return sliding_window_mask_mod


def get_alibi_score_mod(slopes_N: torch.Tensor, causal: bool):
    """ALiBi: score - slope_h * (i - j), or - slope_h * |i - j| when not causal."""

    def alibi_score_mod(score, b, h, q_idx, kv_idx):
        dist = q_idx - kv_idx
        if not causal:
            dist = dist.abs()
        return score - slopes_N[h] * dist

    return alibi_score_mod


def build_mask_mod(spec: AttentionSpec, doc_BT: torch.Tensor | None) -> MaskMod | None:
    if spec.window is not None:
        mask_mod = get_sliding_window_mask_mod(spec.window, spec.causal)
    else:
        mask_mod = causal_mask_mod if spec.causal else None
    if doc_BT is not None:
        mask_mod = get_document_mask_mod(mask_mod, doc_BT)
    return mask_mod


def uncompiled(fn: Callable) -> Callable:
    """`fn` run as PyTorch's unfused reference, without its "called without torch.compile" warning
    (on CPU that path is chosen on purpose; see the backend's caveat)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fn(*args, **kwargs)

    return run


def compiled(name: str, fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled once per process on CUDA; the unfused reference elsewhere."""
    if device.type != "cuda":
        return uncompiled(fn)
    if name not in _compiled:
        # One graph per shape, dtype, mask kind and grad mode: a run needs a few (train, eval, a short
        # last batch), a benchmark or test many. Past dynamo's default limit of 8, flex would silently
        # fall back to the unfused path that materializes every score, so the limit is raised.
        limit = torch._dynamo.config
        limit.recompile_limit = max(limit.recompile_limit, RECOMPILE_LIMIT)
        limit.accumulated_recompile_limit = max(limit.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def block_mask_for(spec: AttentionSpec, n_rows: int, row_len: int,
                   device: torch.device) -> BlockMask | None:
    """The block mask for this layout, from the LRU when the layout was seen before."""
    docs = spec.doc_lens if spec.packed else None
    key = (docs, row_len, spec.window, spec.causal, str(device))
    if key in _block_masks:
        _block_masks.move_to_end(key)
        return _block_masks[key]
    doc_BT = document_ids(spec, n_rows, row_len, device) if docs is not None else None
    mask_mod = build_mask_mod(spec, doc_BT)
    if mask_mod is None:
        return None
    make = compiled("create_block_mask", create_block_mask, device)
    block_mask = make(mask_mod, n_rows if docs is not None else None, None, row_len, row_len,
                      device=device)
    _block_masks[key] = block_mask
    if len(_block_masks) > BLOCK_MASK_CACHE_SIZE:
        _block_masks.popitem(last=False)
    return block_mask


@BACKENDS.register("flex")
class FlexBackend(Backend):
    name = "flex"

    def unavailable(self) -> str | None:
        if flex_attention is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        return None

    def refuse(self, cell: Cell) -> str | None:
        if cell.device == "cpu" and cell.backward:
            return "FlexAttention does not support backward on CPU"
        return None

    def caveat(self, cell: Cell) -> str | None:
        if cell.device == "cpu":
            return "CPU runs PyTorch's unfused reference (full score matrix), for checking only"
        return None

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec) -> torch.Tensor:
        B, T, N, H = q_BTNH.shape
        device = q_BTNH.device
        block_mask = spec.cached(
            f"flex.block_mask.{B}x{T}.{device}", lambda: block_mask_for(spec, B, T, device)
        )
        score_mod = None
        if spec.alibi_slopes is not None:
            score_mod = spec.cached(
                f"flex.alibi.{device}",
                lambda: get_alibi_score_mod(spec.alibi_slopes.to(device), spec.causal),
            )
        o_BNTH = compiled("flex_attention", flex_attention, device)(
            q_BTNH.transpose(1, 2), k_BTKH.transpose(1, 2), v_BTKH.transpose(1, 2),
            score_mod=score_mod, block_mask=block_mask, enable_gqa=spec.groups > 1,
        )
        return o_BNTH.transpose(1, 2)
