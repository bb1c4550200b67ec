"""xformers.ops.memory_efficient_attention (FA2 / cutlass kernels), CUDA only.

Masks are xformers bias classes; a packed batch's block-diagonal bias is built once per batch, when its
layout reaches the device (`XformersLayout`):
    dense causal          LowerTriangularMask on (B, T, N, H)
    packed rows           BlockDiagonalCausalMask.from_seqlens(all documents of the batch) on the
                          batch flattened to one row (1, B*T, N, H); rows end on document ends
    window                BlockDiagonalCausalMask(...).make_local_attention(window) on the same
                          flattened layout (dense rows are one document each); a query at i sees
                          keys with i - window < j <= i, as in the spec
    ALiBi (dense causal)  LowerTriangularMaskWithTensorBias with a (B, N, T, T) bias whose rows
                          are padded to a multiple of 8 (xformers' alignment rule); forward only
Refused, with the reason: ALiBi with backward (LowerTriangularMaskWithTensorBias has no backward
op), ALiBi on packed rows (no bias class combines block-diagonal with a tensor bias), windowed
non-causal attention (the two-sided local mask has no fp32 backward op), every CPU cell, and compiled
training steps (the biases hold host-side sequence lists that torch.compile cannot trace).

GQA/MQA: forward-only calls use xformers' 5-D BMGHK layout, K/V expanded with stride 0 (no copy).
BMGHK has no backward op (xformers documents it as forward-only), and in the 4-D BMHK layout a
(B, T, K, G, H) expand cannot be reshaped to N heads without a copy, so calls that need gradients
repeat K/V to N heads (a copy of O(T*N*H), reduced back to K heads by autograd).

xformers is imported only when a CUDA cell asks for it (or the table asks whether it is
available). On a CPU-only torch its import logs "xFormers can't load C++/CUDA extensions" through
the `xformers` logger; `import_xformers` drops that one record there, so CPU runs stay quiet.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ablate.kernels.base import BACKENDS, Backend, Layout
from ablate.kernels.spec import AttentionSpec, Cell, DocLens, alibi_bias, check_doc_lens, flat_doc_lens, is_packed

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _DropExtensionWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "C++/CUDA extensions" not in record.getMessage()


@functools.lru_cache(maxsize=None)
def import_xformers() -> SimpleNamespace:
    """xformers' attention op and bias module, imported once. Without CUDA the extension warning
    is dropped (nothing it names could run anyway); with CUDA it is kept, since it says which of
    xformers' own kernels are missing (its ops then fall back to PyTorch's flash and cutlass)."""
    logger = logging.getLogger("xformers")
    quiet = _DropExtensionWarning()
    if not torch.cuda.is_available():
        logger.addFilter(quiet)
    try:
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias
    finally:
        logger.removeFilter(quiet)
    return SimpleNamespace(attention=xops.memory_efficient_attention, bias=attn_bias)


def aligned_alibi(spec: AttentionSpec, n_rows: int, row_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(B, N, T, T) ALiBi bias as a view of a buffer whose last dim is padded to a multiple of 8."""
    padded = -(-row_len // 8) * 8
    buf = torch.zeros(1, spec.n_heads, row_len, padded, dtype=dtype, device=device)
    buf[..., :row_len] = alibi_bias(spec.slopes(device), row_len, causal=True)
    return buf[..., :row_len].expand(n_rows, -1, -1, -1)


@dataclass
class XformersLayout(Layout):
    """A batch's documents as xformers' block-diagonal bias (made on the device by `finish`)."""

    doc_lens: DocLens
    spec: AttentionSpec
    bias: object = None

    def finish(self, device: torch.device) -> "XformersLayout":
        xf = import_xformers()
        n_rows, row_len = len(self.doc_lens), sum(self.doc_lens[0])
        self.bias = block_diagonal(xf, self.spec, flat_doc_lens(self.doc_lens, n_rows, row_len), device)
        return self


def block_diagonal(xf: SimpleNamespace, spec: AttentionSpec, lens: list[int], device: torch.device):  # noqa: ANN201
    """The bias for documents `lens` laid end to end in one row (causal, windowed, or neither)."""
    if not spec.causal:  # packed, non-causal, no window (windowed non-causal is refused)
        return xf.bias.BlockDiagonalMask.from_seqlens(lens, device=device)
    bias = xf.bias.BlockDiagonalCausalMask.from_seqlens(lens, device=device)
    return bias if spec.window is None else bias.make_local_attention(spec.window)


def attn_bias_for(xf: SimpleNamespace, spec: AttentionSpec, layout: XformersLayout | None, n_rows: int,
                  row_len: int, dtype: torch.dtype, device: torch.device):  # noqa: ANN201
    """(bias, flat): the xformers bias for this batch, and whether rows are flattened to one."""
    if layout is not None:
        return layout.bias, True
    if spec.alibi:
        return xf.bias.LowerTriangularMaskWithTensorBias(aligned_alibi(spec, n_rows, row_len, dtype, device)), False
    if spec.window is None:
        return (xf.bias.LowerTriangularMask() if spec.causal else None), False
    return _dense_rows_bias(spec, n_rows, row_len, str(device)), True


@functools.lru_cache(maxsize=16)
def _dense_rows_bias(spec: AttentionSpec, n_rows: int, row_len: int, device: str):  # noqa: ANN202
    return block_diagonal(import_xformers(), spec, [row_len] * n_rows, torch.device(device))


def group_heads(q_BTNH, k_BTKH, v_BTKH, groups: int, needs_grad: bool, has_tensor_bias: bool):
    """q/k/v in the layout xformers takes for GQA: 5-D BMGHK (forward, no copy) or repeated K/V.

    B and T here are those of the call (B*T flattened to one row for block-diagonal masks).
    """
    B, T, K, H = k_BTKH.shape
    if not needs_grad and not has_tensor_bias:
        q = q_BTNH.reshape(B, T, K, groups, H)
        return q, k_BTKH[:, :, :, None].expand(B, T, K, groups, H), \
            v_BTKH[:, :, :, None].expand(B, T, K, groups, H)
    return q_BTNH, k_BTKH.repeat_interleave(groups, dim=2), v_BTKH.repeat_interleave(groups, dim=2)


@BACKENDS.register("xformers")
class XformersBackend(Backend):
    name = "xformers"

    def unavailable(self) -> str | None:
        try:
            import_xformers()
        except ImportError as err:
            return f"xformers cannot be imported ({err})"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def refuse(self, cell: Cell) -> str | None:
        if cell.device != "cuda":
            return "xformers kernels need CUDA"
        if cell.dtype not in DTYPES:
            return f"xformers kernels take float16, bfloat16 or float32, not {cell.dtype}"
        if cell.head_dim % 8:
            return "xformers kernels need head_dim to be a multiple of 8"
        if cell.alibi and cell.packed:
            return "no xformers bias class combines block-diagonal (packed) masks with ALiBi"
        if cell.alibi and (cell.window or not cell.causal):
            return "ALiBi is wired only as LowerTriangularMaskWithTensorBias (causal, no window)"
        if cell.alibi and cell.backward:
            return "xformers' LowerTriangularMaskWithTensorBias (causal + ALiBi) has no backward op"
        if cell.window and not cell.causal:
            return "xformers' two-sided local mask has no fp32 backward op; only causal windows"
        if cell.compiled:
            return ("xformers' attention biases carry host-side Python state (sequence start lists) that "
                    "torch.compile cannot trace; use train.compile=false with xformers, or backend=cudnn, flex or sdpa")
        return None

    def caveat(self, cell: Cell) -> str | None:
        if cell.gqa and (cell.backward or cell.alibi):
            return "GQA repeats K/V to N heads (5-D BMGHK is forward-only, no tensor bias)"
        if cell.alibi:
            return "ALiBi bias is a dense (B, N, T, T) tensor"
        return None

    def prepare(self, spec, doc_lens, n_rows, row_len):  # noqa: ANN001, ANN201
        if not is_packed(doc_lens):
            return None
        check_doc_lens(doc_lens, n_rows, row_len)
        return XformersLayout(doc_lens, spec)

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, layout: XformersLayout | None = None) -> torch.Tensor:
        xf = import_xformers()
        B, T, N, H = q_BTNH.shape
        bias, flat = attn_bias_for(xf, spec, layout, B, T, q_BTNH.dtype, q_BTNH.device)
        q, k, v = q_BTNH, k_BTKH, v_BTKH
        if flat:  # before grouping, so that an expanded K/V is never reshaped (which would copy)
            q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
        if spec.groups > 1:
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            q, k, v = group_heads(q, k, v, spec.groups, needs_grad, spec.alibi)
        return xf.attention(q, k, v, attn_bias=bias).reshape(B, T, N, H)
