"""The attention kernel layer: one contract, several backends, and a capability table to pick one.

Model code builds an `AttentionSpec` once per batch, asks `select_backend(spec.cell(...), name)`
once per run for a `Backend`, and calls `backend.attend(q_BTNH, k_BTKH, v_BTKH, spec)`.

Importing this package registers every backend but loads no optional kernel package: xformers is
imported only when a CUDA cell asks for it (see `xformers_backend`), and so is cuDNN's frontend.
"""
from ablate.kernels import cudnn, eager, flex, sdpa, xformers_backend  # noqa: F401 (registration)
from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.select import (
    KernelRefused,
    capability_table,
    format_table,
    get_backend,
    preference,
    select_backend,
    standard_cells,
)
from ablate.kernels.spec import AttentionSpec, Cell, alibi_slopes

__all__ = [
    "AttentionSpec",
    "BACKENDS",
    "Backend",
    "Cell",
    "KernelRefused",
    "alibi_slopes",
    "capability_table",
    "format_table",
    "get_backend",
    "preference",
    "select_backend",
    "standard_cells",
]
