"""The contract every attention backend keeps, and the registry that holds them."""
from __future__ import annotations

import torch

from ablate.kernels.spec import AttentionSpec, Cell
from ablate.registry import Registry


class Backend:
    """A kernel that computes attention for the cells it supports.

    Subclasses set `name`, implement `attend`, and say in `refuse` why a cell is not served
    (None = served). `unavailable` says why the backend cannot run at all here (missing package,
    unsupported GPU), or None.
    """

    name: str = "?"

    def unavailable(self) -> str | None:
        return None

    def refuse(self, cell: Cell) -> str | None:
        raise NotImplementedError

    def attend(
        self, q_BTNH: torch.Tensor, k_BTKH: torch.Tensor, v_BTKH: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor:
        raise NotImplementedError

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
