"""What an attention call asks of a kernel, independent of which kernel serves it.

Shape suffix legend (used in names across the kernel layer and models):
    B rows in the batch      T tokens per row       N query heads
    K key/value heads        H head dim             D model dim
A tensor named `q_BTNH` has shape (B, T, N, H). Every backend takes q_BTNH, k_BTKH, v_BTKH and
returns o_BTNH in q's dtype.

Two things describe a call. The `AttentionSpec` is static: a model builds it once from its
components (heads, causal, window, ALiBi) and every layer sends the same one. The batch's
*documents* change per batch: `doc_lens` lists, per row, the lengths of the documents packed end
to end in that row (host ints; each row sums to T; None = one document per row). A backend turns
them into its own `Layout` (offsets, a block mask, a dense mask) before the training step, so that
the step itself holds no host work.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

DocLens = tuple[tuple[int, ...], ...]


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
    compiled: bool = False  # called inside a torch.compile'd training step

    def describe(self) -> str:
        parts = [self.device, "causal" if self.causal else "non-causal"]
        parts += [name for name in ("packed", "alibi", "gqa", "window") if getattr(self, name)]
        parts.append("fwd+bwd" if self.backward else "fwd")
        parts.append(f"head_dim={self.head_dim}")
        parts.append(str(self.dtype).replace("torch.", ""))
        if self.compiled:
            parts.append("compiled")
        return " ".join(parts)


@dataclass(frozen=True)
class AttentionSpec:
    """A model's attention problem, the same for every layer and every batch.

    window: a query at i sees keys j with i - window < j <= i (None: unlimited).
    alibi: add -slope_n * (i - j) to each score, with the standard slopes `alibi_slopes(n_heads)`.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool = True
    window: int | None = None
    alibi: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def cell(self, device: str | torch.device, dtype: torch.dtype, backward: bool = True,
             packed: bool = True, compiled: bool = False) -> Cell:
        return Cell(
            device=torch.device(device).type, causal=self.causal, packed=packed, alibi=self.alibi,
            gqa=self.n_kv_heads != self.n_heads, window=self.window is not None, backward=backward,
            head_dim=self.head_dim, dtype=dtype, compiled=compiled,
        )

    def slopes(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """(N,) float32 ALiBi slopes on `device` (one tensor per device, made once)."""
        return _slopes_on(self.n_heads, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _slopes_on(n_heads: int, device: str) -> torch.Tensor:
    return alibi_slopes(n_heads).to(device)


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


# ---- documents: host-side facts about a batch's layout


def is_packed(doc_lens: DocLens | None) -> bool:
    """Whether some row holds more than one document."""
    return doc_lens is not None and any(len(row) > 1 for row in doc_lens)


def check_doc_lens(doc_lens: DocLens, n_rows: int, row_len: int) -> None:
    if len(doc_lens) != n_rows:
        raise ValueError(f"doc_lens has {len(doc_lens)} rows, the batch has {n_rows}")
    for lens in doc_lens:
        if sum(lens) != row_len or min(lens) < 1:
            raise ValueError(f"document lengths {lens} must be >= 1 and sum to the row length {row_len}")


def document_ids(doc_lens: DocLens | None, n_rows: int, row_len: int) -> np.ndarray:
    """(B, T) int32 index of each token's document within its row."""
    if doc_lens is None:
        return np.zeros((n_rows, row_len), dtype=np.int32)
    check_doc_lens(doc_lens, n_rows, row_len)
    return np.stack([np.repeat(np.arange(len(lens), dtype=np.int32), lens) for lens in doc_lens])


def flat_doc_lens(doc_lens: DocLens | None, n_rows: int, row_len: int) -> list[int]:
    """Document lengths over the batch read as one long sequence (rows end on document ends)."""
    if doc_lens is None:
        return [row_len] * n_rows
    return [n for row in doc_lens for n in row]


def attended_keys(n: int, window: int | None, causal: bool = True) -> int:
    """(query, key) pairs a document of n tokens attends: n(n+1)/2 causal, fewer under a window."""
    if not causal:
        w = n if window is None else min(window, n)
        return n * n if w >= n else n * (2 * w - 1) - w * (w - 1)
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attended_pairs(spec: AttentionSpec, doc_lens: DocLens | None, n_rows: int, row_len: int) -> int:
    """Unmasked (query, key) pairs of a batch: the work an attention kernel that skips masked
    tiles really has to do (the FLOP count of benchmarks and MFU is built on it)."""
    return sum(attended_keys(n, spec.window, spec.causal) for n in flat_doc_lens(doc_lens, n_rows, row_len))


# ---- reference masks, on any device


def allowed_mask(spec: AttentionSpec, doc_BT: torch.Tensor | None, row_len: int,
                 device: torch.device | str) -> torch.Tensor:
    """(B|1, 1, T, T) bool: True where query i may attend to key j (causal, document, window)."""
    i = torch.arange(row_len, device=device)
    rel = i[:, None] - i[None, :]  # i - j
    ok = torch.ones(row_len, row_len, dtype=torch.bool, device=device)
    if spec.causal:
        ok &= rel >= 0
    if spec.window is not None:
        ok &= rel < spec.window if spec.causal else rel.abs() < spec.window
    ok = ok[None]
    if doc_BT is not None:
        ok = ok & (doc_BT[:, :, None] == doc_BT[:, None, :])
    return ok[:, None]


def alibi_bias(slopes_N: torch.Tensor, row_len: int, causal: bool) -> torch.Tensor:
    """(1, N, T, T) float32 additive ALiBi bias: -slope * (i - j), or -slope * |i - j| if non-causal."""
    i = torch.arange(row_len, device=slopes_N.device)
    dist = (i[:, None] - i[None, :]).float()
    if not causal:
        dist = dist.abs()
    return (-slopes_N.float()[:, None, None] * dist)[None]
