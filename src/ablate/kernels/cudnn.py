"""cuDNN fused attention: ragged (packed-document) SDPA for packed rows and ALiBi, via nvidia-cudnn-frontend.

Rows with several documents (and every ALiBi batch) run cuDNN's ragged SDPA through the opaque
`ablate::ragged_attention` op (`ablate.kernels.ragged`, graphs in `ablate.kernels.cudnn_graphs`):
torch.compile traces around it, and a new document layout changes only device data. Rows of one
document each, without ALiBi, are plain causal attention: they go to torch's SDPA, whose fused
kernel on Hopper is cuDNN's own dense attention (faster there than the ragged graph).

ALiBi uses cuDNN's built-in causal ALiBi mask, whose slopes are the standard geometric ones of
`ablate.kernels.spec.alibi_slopes(n_heads)`, the ones every ALiBi spec carries.

Optional dependency: `pip install 'ablate[cudnn]'` (nvidia-cudnn-frontend), imported lazily.
"""
from __future__ import annotations

import torch

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.cudnn_graphs import INSTALL_HINT, offset_dtype, why_unavailable
from ablate.kernels.ragged import RaggedLayout, prepare_ragged, ragged_attention
from ablate.kernels.sdpa import sdpa
from ablate.kernels.spec import AttentionSpec, Cell, is_packed

__all__ = ["CudnnBackend", "INSTALL_HINT"]
MAX_HEAD_DIM_FWD = 256
MAX_HEAD_DIM_BWD = 128
_IO_DTYPES = (torch.bfloat16, torch.float16)


@BACKENDS.register("cudnn")
class CudnnBackend(Backend):
    """cuDNN SDPA over packed documents: causal or not, ALiBi (causal), GQA/MQA, fwd and bwd."""

    name = "cudnn"

    def unavailable(self) -> str | None:
        return why_unavailable()

    def refuse(self, cell: Cell) -> str | None:
        if cell.device != "cuda":
            return "cuDNN attention runs on CUDA devices only"
        if cell.dtype not in _IO_DTYPES:
            return f"cuDNN fused attention takes bfloat16 or float16, not {cell.dtype}"
        if cell.window:
            return "sliding-window attention is not served by the cudnn backend"
        if cell.alibi and not cell.causal:
            return "cuDNN's ALiBi mask is causal only"
        limit = MAX_HEAD_DIM_BWD if cell.backward else MAX_HEAD_DIM_FWD
        if cell.head_dim % 8 or cell.head_dim > limit:
            return f"head_dim={cell.head_dim}: cuDNN needs a multiple of 8 <= {limit} ({'fwd+bwd' if cell.backward else 'fwd'})"
        return None

    def prepare(self, spec, doc_lens, n_rows, row_len):  # noqa: ANN001, ANN201
        if not is_packed(doc_lens) and not spec.alibi:
            return None  # dense causal: SDPA
        return prepare_ragged(spec, doc_lens, n_rows, row_len, offset_dtype())

    def packs_qkv(self, spec: AttentionSpec, layout: RaggedLayout | None) -> bool:
        """The ragged graph reads packed buffers. On dense rows, GQA/MQA gain from separate
        projections as well: their gradients go to their own matmuls, where a fused projection's
        backward first assembles them into one (B, T, (N + 2K) * H) buffer (on an H200 the Llama
        cell of benchmarks/train_throughput.py went from 1.010x to 1.028x the plain trainer's tokens/s;
        since then RoPE models take q and k from one matmul whatever this says, so this serves GQA/MQA
        under the other positional schemes)."""
        return layout is not None or spec.alibi or spec.groups > 1

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec, layout: RaggedLayout | None = None) -> torch.Tensor:
        if layout is None:
            if spec.alibi:
                layout = prepare_ragged(spec, None, *q_BTNH.shape[:2], offset_dtype()).to(q_BTNH.device)
            else:
                return sdpa(q_BTNH, k_BTKH, v_BTKH, spec, None)
        # packed here, in the traced step, so that autograd saves the packed tensors (no copy in the
        # backward) and a copy that is still needed fuses with its producer
        q_BTNH, k_BTKH, v_BTKH = q_BTNH.contiguous(), k_BTKH.contiguous(), v_BTKH.contiguous()
        o_BTNH, _ = ragged_attention(q_BTNH, k_BTKH, v_BTKH, *layout.op_args(), spec.causal, spec.alibi)
        return o_BTNH
