"""Pack documents into fixed-size (B, T) batches without cross-document attention or targets.

Documents are laid end to end in a stream (training: a seeded shuffle per epoch; validation: the
corpus order) and the stream is cut into rows of T tokens. Each row is a run of *pieces*: stretches
of one document. A document cut by a row end goes on as a new piece in the next row. Positions
restart at 0 at every piece, a token's target is the next token of the same piece (-100 at a
piece's last token), and `doc_lens` lists piece lengths so attention can be kept inside pieces.
All work is vectorised numpy; the only Python loops run over batch rows and over token sources.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ablate.data.tokenizer import IGNORE_INDEX, Tokenizer
from ablate.errors import DataError


@dataclass(frozen=True)
class DocSet:
    """Tokenized documents, each ending with its end-of-document token, kept in flat token arrays
    (`sources`, possibly memory-mapped) so that no per-document Python object is needed."""

    sources: tuple[np.ndarray, ...]
    source: np.ndarray  # (n_docs,) int64: which source array holds the document
    start: np.ndarray  # (n_docs,) int64: offset of the document in that array
    length: np.ndarray  # (n_docs,) int64: tokens, end-of-document token included

    @property
    def n_docs(self) -> int:
        return int(self.length.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.length.sum())

    @classmethod
    def from_token_lists(cls, docs: Sequence[np.ndarray], eos_id: int) -> "DocSet":
        """Concatenate encoded documents into one array, appending `eos_id` to each."""
        length = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        end = np.cumsum(length)
        start = end - length
        dtype = np.uint16 if eos_id <= np.iinfo(np.uint16).max else np.int32
        flat = np.empty(int(end[-1]) if len(docs) else 0, dtype=dtype)
        for d, s, e in zip(docs, start, end):
            flat[s : e - 1] = d
            flat[e - 1] = eos_id
        return cls((flat,), np.zeros(len(docs), np.int64), start, length)

    def subset(self, index: np.ndarray) -> "DocSet":
        return replace(self, source=self.source[index], start=self.start[index], length=self.length[index])

    def document(self, i: int) -> np.ndarray:
        s = int(self.start[i])
        return np.asarray(self.sources[int(self.source[i])][s : s + int(self.length[i])])


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, -100 where no target (piece end, padding)
    positions: torch.Tensor  # (B, T) int64, 0 at the start of every piece
    doc_lens: tuple[tuple[int, ...], ...]  # per row, lengths of its pieces; each row sums to T
    n_pad: int  # padding tokens in the batch
    target_bytes: int | None  # bytes covered by the non-ignored targets, None if unknown

    @property
    def n_tokens(self) -> int:
        """Tokens of documents in the batch (padding left out)."""
        return int(self.tokens.numel()) - self.n_pad

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class _Stream:
    """Documents of a DocSet in a given order, read as one stream of tokens."""

    def __init__(self, docs: DocSet, order: np.ndarray):
        self.docs = docs
        self.order = order
        self.end = np.cumsum(docs.length[order])
        self.n_tokens = int(self.end[-1]) if self.end.size else 0

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, b) of the stream (int64) and a mask of where documents start in them."""
        k = np.arange(np.searchsorted(self.end, a, side="right"), np.searchsorted(self.end, b, side="left") + 1)
        doc = self.order[k]
        d_start = self.end[k] - self.docs.length[doc]  # stream offset of each document
        p_start = np.maximum(d_start, a)
        p_len = np.minimum(self.end[k], b) - p_start
        # index into the document's source array for every token of [a, b)
        index = np.repeat(self.docs.start[doc] + (p_start - d_start) - p_start, p_len) + np.arange(a, b)
        out = np.empty(b - a, dtype=np.int64)
        src = self.docs.source[doc]
        if src.size and (src == src[0]).all():
            out[:] = self.docs.sources[int(src[0])][index]
        else:
            tok_src = np.repeat(src, p_len)
            for s in np.unique(src):
                m = tok_src == s
                out[m] = self.docs.sources[int(s)][index[m]]
        starts = np.zeros(b - a, dtype=bool)
        starts[d_start[d_start >= a] - a] = True
        return out, starts


def assemble(tokens: np.ndarray, doc_start: np.ndarray, context: int, pad_id: int, tokenizer: Tokenizer,
             rows: int | None = None) -> PackedBatch:
    """Cut a token stretch into rows of `context`, padding the end if the stretch is short (to
    `rows` rows if given, so that every batch of a set has one shape)."""
    n = tokens.shape[0]
    rows = max(1, math.ceil(n / context), rows or 0)
    n_pad = rows * context - n
    if n_pad:
        tokens = np.concatenate([tokens, np.full(n_pad, pad_id, dtype=np.int64)])
        doc_start = np.concatenate([doc_start, np.zeros(n_pad, dtype=bool)])
        doc_start[n] = True  # padding is a piece of its own
    tok = tokens.reshape(rows, context)
    piece_start = doc_start.reshape(rows, context).copy()
    piece_start[:, 0] = True
    col = np.broadcast_to(np.arange(context), (rows, context))
    positions = col - np.maximum.accumulate(np.where(piece_start, col, 0), axis=1)
    targets = np.full((rows, context), IGNORE_INDEX, dtype=np.int64)
    targets[:, :-1] = np.where(piece_start[:, 1:], IGNORE_INDEX, tok[:, 1:])
    if n_pad:
        targets.reshape(-1)[n - 1 :] = IGNORE_INDEX
    doc_lens = tuple(tuple(np.diff(np.append(np.flatnonzero(r), context)).tolist()) for r in piece_start)
    return PackedBatch(
        tokens=torch.from_numpy(tok),
        targets=torch.from_numpy(targets),
        positions=torch.from_numpy(np.ascontiguousarray(positions)),
        doc_lens=doc_lens,
        n_pad=int(n_pad),
        target_bytes=tokenizer.target_bytes(targets),
    )


class TrainLoader:
    """Endless training batches: every epoch is a fresh seeded shuffle of the documents, laid end to
    end, so rows are always full (no padding). Deterministic given the seed, and resumable:
    `state_dict()` after k batches, `load_state_dict()` in a new loader, and the batches that follow
    are those an uninterrupted run would have seen."""

    def __init__(self, docs: DocSet, context: int, batch_size: int, seed: int, tokenizer: Tokenizer):
        if docs.n_docs == 0:
            raise DataError("the training split holds no documents")
        if context < 1 or batch_size < 1:
            raise ValueError(f"context ({context}) and batch_size ({batch_size}) must be positive")
        self.docs, self.context, self.batch_size = docs, context, batch_size
        self.seed, self.tokenizer = int(seed), tokenizer
        self.epoch, self.cursor = 0, 0
        self.tokens_seen, self.pad_seen = 0, 0
        self._streams: dict[int, _Stream] = {}

    def _stream(self, epoch: int) -> _Stream:
        if epoch not in self._streams:
            rng = np.random.default_rng([self.seed, epoch])
            self._streams = {e: s for e, s in self._streams.items() if e >= epoch - 1}
            self._streams[epoch] = _Stream(self.docs, rng.permutation(self.docs.n_docs))
        return self._streams[epoch]

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        need = self.batch_size * self.context
        total = self.docs.n_tokens
        parts, starts = [], []
        while need:
            take = min(need, total - self.cursor)
            tok, st = self._stream(self.epoch).read(self.cursor, self.cursor + take)
            parts.append(tok)
            starts.append(st)
            self.cursor += take
            need -= take
            if self.cursor == total:
                self.epoch, self.cursor = self.epoch + 1, 0
        tok = parts[0] if len(parts) == 1 else np.concatenate(parts)
        st = starts[0] if len(starts) == 1 else np.concatenate(starts)
        batch = assemble(tok, st, self.context, self.tokenizer.eos_id, self.tokenizer)
        self.tokens_seen += tok.size
        self.pad_seen += batch.n_pad
        return batch

    @property
    def padding_frac(self) -> float:
        """Padding tokens / all tokens over the batches given so far (0 by construction)."""
        return self.pad_seen / max(1, self.tokens_seen + self.pad_seen)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_tokens": self.docs.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n_tokens = int(state.get("n_tokens", self.docs.n_tokens))
        if n_tokens != self.docs.n_tokens or int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data state was saved for {n_tokens} training tokens and seed {state.get('seed')}, "
                f"but this loader has {self.docs.n_tokens} tokens and seed {self.seed}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def pack_eval(
    docs: DocSet, context: int, batch_size: int, tokenizer: Tokenizer, max_batches: int | None = None
) -> list[PackedBatch]:
    """Validation batches: documents in corpus order, packed once. Every batch has `batch_size`
    rows (one shape for a compiled model); only the end of the last batch is padding."""
    stream = _Stream(docs, np.arange(docs.n_docs))
    per_batch = batch_size * context
    total = stream.n_tokens if max_batches is None else min(stream.n_tokens, max_batches * per_batch)
    batches = []
    for a in range(0, total, per_batch):
        tok, st = stream.read(a, min(a + per_batch, total))
        batches.append(assemble(tok, st, context, tokenizer.eos_id, tokenizer, rows=batch_size))
    return batches


def padding_frac(batches: Sequence[PackedBatch]) -> float:
    """Padding tokens / all tokens of a list of batches."""
    total = sum(b.tokens.numel() for b in batches)
    return sum(b.n_pad for b in batches) / max(1, total)
