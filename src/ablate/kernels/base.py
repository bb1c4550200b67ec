"""The contract every attention backend keeps, and the registry that holds them.

A backend works in two phases, so that a compiled training step holds no host work:

    layout = backend.prepare(spec, doc_lens, B, T)   # host: CPU tensors, any thread, with the batch
    layout = layout.to(device)                       # before the step: non-blocking copies
    o_BTNH = backend.attend(q_BTNH, k_BTKH, v_BTKH, spec, layout)   # in the step, traceable

`prepare` returns None when the backend needs nothing beyond the spec for that batch (one
document per row). `backend(q, k, v, spec, doc_lens)` does all three, for notebooks and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ablate.kernels.spec import AttentionSpec, Cell, DocLens
from ablate.registry import Registry


@dataclass
class Layout:
    """A batch's document layout as a backend needs it: tensor fields move with `to`.

    Fields named `host_*` stay on the host (metadata an opaque kernel reads without a device sync).
    Subclasses add fields, and may override `finish` to build device-side objects once the tensors
    are there (a block mask, a dense mask).
    """

    def _tensors(self):  # noqa: ANN202
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor) and not f.name.startswith("host_")]

    def pin_memory(self) -> "Layout":
        return replace(self, **{name: t.pin_memory() for name, t in self._tensors()})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Layout":
        device = torch.device(device)
        moved = replace(self, **{name: t.to(device, non_blocking=non_blocking) for name, t in self._tensors()})
        return moved.finish(device)

    def finish(self, device: torch.device) -> "Layout":
        return self


class Backend:
    """A kernel that computes attention for the cells it supports.

    Subclasses set `name`, implement `attend` (and `prepare` if they need a per-batch layout), and
    say in `refuse` why a cell is not served (None = served). `unavailable` says why the backend
    cannot run at all here (missing package, unsupported GPU), or None.
    """

    name: str = "?"

    def unavailable(self) -> str | None:
        return None

    def refuse(self, cell: Cell) -> str | None:
        raise NotImplementedError

    def prepare(self, spec: AttentionSpec, doc_lens: DocLens | None, n_rows: int, row_len: int) -> Layout | None:
        return None

    def attend(self, q_BTNH: torch.Tensor, k_BTKH: torch.Tensor, v_BTKH: torch.Tensor, spec: AttentionSpec,
               layout: Layout | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q_BTNH: torch.Tensor, k_BTKH: torch.Tensor, v_BTKH: torch.Tensor, spec: AttentionSpec,
                 doc_lens: DocLens | None = None) -> torch.Tensor:
        """Attention over a batch whose documents are `doc_lens`, all phases at once."""
        B, T = q_BTNH.shape[:2]
        layout = self.prepare(spec, doc_lens, B, T)
        return self.attend(q_BTNH, k_BTKH, v_BTKH, spec, None if layout is None else layout.to(q_BTNH.device))

    def packs_qkv(self, spec: AttentionSpec, layout: Layout | None) -> bool:
        """True when `attend` reads q, k and v as separate packed (B, T, heads, H) buffers for this
        batch: the model then projects them with one matmul each (row blocks of its fused weight)
        instead of slicing one fused projection into strided views the kernel would copy. Under a
        rotating positional scheme (RoPE) the model projects q and k together whatever this says:
        the rotation kernel writes them as separate packed buffers."""
        return False

    def caveat(self, cell: Cell) -> str | None:
        """A cost worth knowing when the backend serves `cell` (a copy, an O(T^2) mask), or None."""
        return None

    def why_not(self, cell: Cell) -> str | None:
        """The reason this backend cannot serve `cell`, or None if it can.

        The static refusal comes first: it is cheap, and it is the more useful message (a CPU cell
        refused by a CUDA-only backend should say so, not that its package failed to load).
        """
        return self.refuse(cell) or self.unavailable()

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


BACKENDS: Registry[type[Backend]] = Registry("backend")
