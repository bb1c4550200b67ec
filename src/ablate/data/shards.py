"""Token shards in the llm.c layout, read through np.memmap.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by that many uint16 token ids. Documents are separated by an end-of-text id; both the
llm.c habit of putting it before each document and the habit of putting it after are read right.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ablate.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_SCAN_BLOCK = 1 << 26  # tokens scanned at a time when looking for document ends


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int]) -> Path:
    """Write `tokens` (ids < 65536) as one shard; returns the path."""
    a = np.asarray(tokens)
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint16).max):
        raise DataError(f"token ids must lie in 0..65535 to be stored as uint16 (shard {path})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, a.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(a.astype("<u2").tobytes())
    return path


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Check the header of a shard and map its tokens (read-only)."""
    path = Path(path)
    try:
        with open(path, "rb"):  # readable at all (a shard of another user's, a dangling link)
            size = path.stat().st_size
    except OSError as err:
        raise DataError(f"token shard {path} (from data.path) cannot be read: {err.strerror}") from None
    if size < HEADER_BYTES:
        raise DataError(f"token shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"token shard {path} has magic {header[0]}, expected {MAGIC}")
    if header[1] != VERSION:
        raise DataError(
            f"token shard {path} has version {header[1]}; only version {VERSION} (uint16 tokens) is read"
        )
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise DataError(
            f"token shard {path} declares {n_tokens} tokens ({expected} bytes) but holds {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype="<u2")  # type: ignore[return-value]
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def check_vocab(max_token: int, vocab_size: int, source: str) -> None:
    """Raise if a token id does not fit the model's vocabulary."""
    if max_token >= vocab_size:
        raise DataError(
            f"{source} holds token id {max_token}, which does not fit a vocabulary of size "
            f"{vocab_size}; raise the model's vocab size to at least {max_token + 1}"
        )


@dataclass(frozen=True)
class ShardDocs:
    """One mapped shard and where its documents lie: each document ends with the end-of-text id,
    except perhaps the last one; a lone end-of-text id is an empty document and is dropped."""

    path: str
    tokens: np.ndarray
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64
    max_token: int


def shard_documents(path: str | os.PathLike, eot_id: int) -> ShardDocs:
    """Documents of one shard; cached per process while the file is unchanged."""
    st = Path(path).stat()
    return _shard_documents(str(Path(path).resolve()), st.st_mtime_ns, st.st_size, int(eot_id))


@functools.lru_cache(maxsize=64)
def _shard_documents(path: str, _mtime_ns: int, _size: int, eot_id: int) -> ShardDocs:
    tokens = open_shard(path)
    n = tokens.shape[0]
    eots, max_token = [], -1
    for lo in range(0, n, _SCAN_BLOCK):
        block = np.asarray(tokens[lo : lo + _SCAN_BLOCK])
        eots.append(np.flatnonzero(block == eot_id) + lo)
        max_token = max(max_token, int(block.max()))
    ends = np.concatenate(eots + [np.zeros(0, np.int64)]).astype(np.int64) + 1
    if ends.size == 0 or ends[-1] < n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = ends - starts
    empty = (lengths == 1) & (starts < n)
    if empty.any():
        empty[empty] = np.asarray(tokens[starts[empty]]) == eot_id
    keep = (lengths > 0) & ~empty
    return ShardDocs(path, tokens, starts[keep], lengths[keep], max_token)


def find_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Shards of a split (`train` or `val`) in a folder: files named `*<split>*.bin`, sorted."""
    return sorted(p for p in Path(folder).glob(f"*{split}*.bin") if p.is_file())
