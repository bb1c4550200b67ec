"""The attention kernel layer: one contract, several backends, and a capability table to pick one.

A model builds one `AttentionSpec` (heads, causal, window, ALiBi) from its components; the run picks
a `Backend` once with `select_backend(spec.cell(device, dtype, ...), name)` and hands it to the
model's attention layers. Per batch, `backend.prepare(spec, doc_lens, B, T)` turns the batch's
documents into the backend's layout (on the host, with the batch), and every layer calls
`backend.attend(q_BTNH, k_BTKH, v_BTKH, spec, layout)`; `backend(q, k, v, spec, doc_lens)` does both.

Importing this package registers every backend but loads no optional kernel package: xformers is
imported only when a CUDA cell asks for it (see `xformers_backend`), and so is cuDNN's frontend.
"""
from ablate.kernels import cudnn, eager, flex, sdpa, xformers_backend  # noqa: F401 (registration)
from ablate.kernels.base import BACKENDS, Backend, Layout
from ablate.kernels.select import (
    KernelRefused,
    capability_table,
    format_table,
    get_backend,
    preference,
    select_backend,
    standard_cells,
)
from ablate.kernels.spec import AttentionSpec, Cell, DocLens, alibi_slopes, attended_pairs

__all__ = [
    "AttentionSpec",
    "BACKENDS",
    "Backend",
    "Cell",
    "DocLens",
    "Layout",
    "KernelRefused",
    "alibi_slopes",
    "attended_pairs",
    "capability_table",
    "format_table",
    "get_backend",
    "preference",
    "select_backend",
    "standard_cells",
]
