"""torch.nn.attention.flex_attention: block-sparse masks and ALiBi as a score_mod, with backward.

The mask is composed from plain mask_mod functions (causal, same document, sliding window), the
same shape as torchtitan's `get_document_mask_mod` / `get_sliding_window_mask_mod`; the block
mask lets the kernel skip every fully masked (128 x 128) tile, so packed rows and windows cost only
their unmasked work. ALiBi is a score_mod, applied in float32 inside the kernel. GQA/MQA use
`enable_gqa=True`: each query head reads its kv head, nothing is repeated (on CUDA; the CPU path
is PyTorch's unfused reference, which does repeat).

A batch's block mask is made before the training step, when its layout reaches the device
(create_block_mask, compiled once per process on CUDA). The mask functions read the batch's
document ids from one buffer per (rows, length, device), overwritten in place for every batch: they
are made once, so a compiled step sees the same block-mask structure every batch and is never
recompiled for a new layout. Inside a compiled step flex_attention is traced into its fused
kernel; called eagerly on CUDA it runs through its own compiled wrapper, made once per process.

On CPU flex_attention runs forward only (PyTorch raises "FlexAttention does not support backward
on CPU" for inputs that require grad), uncompiled: useful to check masks, not for speed.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ablate.kernels.base import BACKENDS, Backend, Layout
from ablate.kernels.spec import AttentionSpec, Cell, alibi_slopes, document_ids, is_packed

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without flex attention
    flex_attention = create_block_mask = None

MaskMod = Callable[..., torch.Tensor]
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


@functools.lru_cache(maxsize=None)
def alibi_score_mod(n_heads: int, causal: bool, device: str):  # noqa: ANN201
    """One ALiBi score_mod per head count and device, so that eager calls reuse one compiled graph."""
    return get_alibi_score_mod(alibi_slopes(n_heads).to(device), causal)


def base_mask_mod(spec: AttentionSpec) -> MaskMod | None:
    if spec.window is not None:
        return get_sliding_window_mask_mod(spec.window, spec.causal)
    return causal_mask_mod if spec.causal else None


# ---- the batch's block mask, made before the step


@dataclass
class FlexLayout(Layout):
    """A batch's document ids (None: one document per row); `finish` makes its block mask on the device."""

    doc_ids: torch.Tensor | None
    spec: AttentionSpec
    row_len: int
    block_mask: object = None  # the BlockMask, made by `finish`

    def finish(self, device: torch.device) -> "FlexLayout":
        if self.doc_ids is None:
            self.block_mask = dense_block_mask(self.spec, self.row_len, str(device))
            return self
        buffer, mask_mod = document_mask(self.spec, self.doc_ids.shape[0], self.row_len, str(device))
        buffer.copy_(self.doc_ids, non_blocking=True)
        self.block_mask = make_block_mask(device.type)(mask_mod, buffer.shape[0], None, self.row_len, self.row_len,
                                                       device=device)
        return self


@functools.lru_cache(maxsize=64)
def document_mask(spec: AttentionSpec, n_rows: int, row_len: int, device: str) -> tuple[torch.Tensor, MaskMod]:
    """The (B, T) document-id buffer of this shape and the one mask function that reads it."""
    buffer = torch.zeros(n_rows, row_len, dtype=torch.int32, device=device)
    return buffer, get_document_mask_mod(base_mask_mod(spec), buffer)


@functools.lru_cache(maxsize=16)
def dense_block_mask(spec: AttentionSpec, row_len: int, device: str):  # noqa: ANN201
    """The block mask of rows of one document (causal and window only), made once per shape."""
    mask_mod = base_mask_mod(spec)
    if mask_mod is None:
        return None
    return make_block_mask(torch.device(device).type)(mask_mod, None, None, row_len, row_len, device=device)


@functools.lru_cache(maxsize=None)
def make_block_mask(device_type: str) -> Callable:
    """create_block_mask, compiled on CUDA (it evaluates the mask function tile by tile there)."""
    return torch.compile(create_block_mask) if device_type == "cuda" else create_block_mask


def prepare_flex(spec: AttentionSpec, doc_lens, n_rows: int, row_len: int) -> FlexLayout:  # noqa: ANN001
    packed = is_packed(doc_lens)
    doc_ids = torch.from_numpy(document_ids(doc_lens, n_rows, row_len)) if packed else None
    return FlexLayout(doc_ids, spec, row_len)


def uncompiled(fn: Callable) -> Callable:
    """`fn` run as PyTorch's unfused reference, without its "called without torch.compile" warning
    (on CPU that path is chosen on purpose; see the backend's caveat)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fn(*args, **kwargs)

    return run


@functools.lru_cache(maxsize=None)
def flex_for(device_type: str) -> Callable:
    """flex_attention compiled once per process on CUDA (for eager callers); the unfused reference elsewhere."""
    if device_type != "cuda":
        return uncompiled(flex_attention)
    # One graph per shape, dtype, mask kind and grad mode: a run needs a few (train, eval, a short
    # last batch), a benchmark or test many. Past dynamo's default limit of 8, flex would silently
    # fall back to the unfused path that materializes every score, so the limit is raised.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


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
        if cell.device == "cpu" and cell.compiled:
            return "FlexAttention's compiled kernel needs CUDA (on CPU it runs an unfused reference)"
        return None

    def caveat(self, cell: Cell) -> str | None:
        if cell.device == "cpu":
            return "CPU runs PyTorch's unfused reference (full score matrix), for checking only"
        return None

    def prepare(self, spec, doc_lens, n_rows, row_len):  # noqa: ANN001, ANN201
        return prepare_flex(spec, doc_lens, n_rows, row_len)

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, layout: FlexLayout | None = None) -> torch.Tensor:
        B, T = q_BTNH.shape[:2]
        if layout is None:  # an eager caller that skipped `prepare`
            layout = prepare_flex(spec, None, B, T).to(q_BTNH.device)
        score_mod = alibi_score_mod(spec.n_heads, spec.causal, str(q_BTNH.device)) if spec.alibi else None
        fn = flex_attention if torch.compiler.is_compiling() else flex_for(q_BTNH.device.type)
        o_BNTH = fn(q_BTNH.transpose(1, 2), k_BTKH.transpose(1, 2), v_BTKH.transpose(1, 2),
                    score_mod=score_mod, block_mask=layout.block_mask, enable_gqa=spec.groups > 1)
        return o_BNTH.transpose(1, 2)
