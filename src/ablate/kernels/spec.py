"""What an attention call asks of a kernel, independent of which kernel serves it.

Shape suffix legend (used in names across the kernel layer and models):
    B rows in the batch      T tokens per row       N query heads
    K key/value heads        H head dim             D model dim
A tensor named `q_BTNH` has shape (B, T, N, H). Every backend takes q_BTNH, k_BTKH, v_BTKH and
returns o_BTNH in q's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Cell:
    """The static description of a run's attention: what the capability table is keyed on."""

    device: str  # "cpu" or "cuda"
    causal: bool = True
    packed: bool = False  # rows hold several documents that must not see each other
    alibi: bool = False
    gqa: bool = False  # fewer key/value heads than query heads (GQA or MQA)
    window: bool = False  # local (sliding-window) attention
    backward: bool = True  # gradients are needed
    head_dim: int = 64
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        parts = [self.device, "causal" if self.causal else "non-causal"]
        parts += [name for name in ("packed", "alibi", "gqa", "window") if getattr(self, name)]
        parts.append("fwd+bwd" if self.backward else "fwd")
        parts.append(f"head_dim={self.head_dim}")
        parts.append(str(self.dtype).replace("torch.", ""))
        return " ".join(parts)


@dataclass(eq=False)
class AttentionSpec:
    """One batch's attention problem. Built once per forward pass and shared by every layer.

    doc_lens: per row, the lengths of the documents packed end to end in that row (host ints; each
    row sums to T). None means one document per row. Tokens attend only within their document.
    window: a query at i sees keys j with i - window < j <= i (None: unlimited).
    alibi_slopes: (N,) float32, the bias added to a score is -slope * (i - j).
    cache: backend-prepared objects for this layout (masks, block masks, offsets), so that the
    work is done once per batch and not once per layer.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool = True
    doc_lens: tuple[tuple[int, ...], ...] | None = None
    alibi_slopes: torch.Tensor | None = None
    window: int | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def packed(self) -> bool:
        return self.doc_lens is not None and any(len(row) > 1 for row in self.doc_lens)

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def cell(self, device: str | torch.device, dtype: torch.dtype, backward: bool) -> Cell:
        return Cell(
            device=torch.device(device).type,
            causal=self.causal,
            packed=self.doc_lens is not None,
            alibi=self.alibi_slopes is not None,
            gqa=self.n_kv_heads != self.n_heads,
            window=self.window is not None,
            backward=backward,
            head_dim=self.head_dim,
            dtype=dtype,
        )

    def flat_doc_lens(self, n_rows: int, row_len: int) -> list[int]:
        """Document lengths over the batch read as one long sequence (rows end on document ends)."""
        if self.doc_lens is None:
            return [row_len] * n_rows
        return [n for row in self.doc_lens for n in row]

    def cached(self, key: str, make):  # noqa: ANN001 - a zero-argument factory
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def document_ids(spec: AttentionSpec, n_rows: int, row_len: int, device: torch.device) -> torch.Tensor:
    """(B, T) int32 index of each token's document within its row."""
    if spec.doc_lens is None:
        return torch.zeros(n_rows, row_len, dtype=torch.int32, device=device)
    rows = []
    for lens in spec.doc_lens:
        if sum(lens) != row_len:
            raise ValueError(f"document lengths {lens} do not sum to the row length {row_len}")
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(rows).to(device=device, dtype=torch.int32, non_blocking=True)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): a geometric sequence, interleaved for non-powers of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def allowed_mask(spec: AttentionSpec, n_rows: int, row_len: int, device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) bool: True where query i may attend to key j (causal, document, window)."""
    i = torch.arange(row_len, device=device)
    rel = i[:, None] - i[None, :]  # i - j
    ok = torch.ones(row_len, row_len, dtype=torch.bool, device=device)
    if spec.causal:
        ok &= rel >= 0
    if spec.window is not None:
        ok &= rel < spec.window if spec.causal else rel.abs() < spec.window
    ok = ok.expand(n_rows, row_len, row_len)
    if spec.packed:  # otherwise every row is one document
        doc = document_ids(spec, n_rows, row_len, device)
        ok = ok & (doc[:, :, None] == doc[:, None, :])
    return ok[:, None]


def alibi_bias(slopes_N: torch.Tensor, row_len: int, causal: bool) -> torch.Tensor:
    """(1, N, T, T) float32 additive ALiBi bias: -slope * (i - j), or -slope * |i - j| if non-causal."""
    i = torch.arange(row_len, device=slopes_N.device)
    dist = (i[:, None] - i[None, :]).float()
    if not causal:
        dist = dist.abs()
    return (-slopes_N.float()[:, None, None] * dist)[None]
