"""Tokenizers: byte-level for text corpora, a pass-through one for pre-tokenized shards.

Every tokenizer knows how many bytes of text a target token stands for, so that the loss can be
reported in bits per byte; `target_bytes` returns None where that is unknown.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100


def _as_array(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch.Tensor
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids)


class Tokenizer:
    """Common interface: `encode`, `decode`, `vocab_size`, `eos_id`, `bytes_per_token`."""

    name: str = "base"
    vocab_size: int
    eos_id: int
    # bytes of text each token id stands for (shape (vocab_size,)), or None when unknown
    bytes_per_token: np.ndarray | None = None

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError(f"tokenizer '{self.name}' cannot encode text")

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError(f"tokenizer '{self.name}' cannot decode tokens")

    def target_bytes(self, targets: Any) -> int | None:
        """Bytes of text covered by the targets that are not IGNORE_INDEX; None if unknown."""
        if self.bytes_per_token is None:
            return None
        t = _as_array(targets).reshape(-1)
        t = t[t != IGNORE_INDEX]
        return int(self.bytes_per_token[t].sum())


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, 256 ends a document; 257 ids in all."""

    name = "bytes"

    def __init__(self) -> None:
        self.eos_id = 256
        self.vocab_size = 257
        self.bytes_per_token = np.ones(self.vocab_size, dtype=np.int64)
        self.bytes_per_token[self.eos_id] = 0

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as a uint16 array (no end-of-document token)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Bytes back to text; end-of-document tokens become newlines, bad UTF-8 is replaced."""
        a = _as_array(ids).reshape(-1).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for the byte tokenizer (vocab {self.vocab_size})")
        a = np.where(a == self.eos_id, ord("\n"), a)
        return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def target_bytes(self, targets: Any) -> int | None:
        t = _as_array(targets)
        return int(np.count_nonzero((t >= 0) & (t < 256)))


class PretokenizedTokenizer(Tokenizer):
    """Stands for whatever tokenizer made a token shard: knows its vocabulary size and
    end-of-text id, but not the text, so bits per byte is not available."""

    name = "pretokenized"

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"end-of-text id {eos_id} is outside the vocabulary of size {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.bytes_per_token = None
