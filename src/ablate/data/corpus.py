"""Corpora: where documents come from and how they split into train and validation.

The split is by document and depends only on the document id: a document is in validation when a
stable hash of its id, mod 1000, is below `val_per_mille`. Parsed documents are cached per process.
"""
from __future__ import annotations

import codecs
import encodings
import functools
import gzip
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ablate.data.packing import DocSet
from ablate.data.shards import check_vocab, find_shards, shard_documents
from ablate.data.tokenizer import ByteTokenizer, PretokenizedTokenizer, Tokenizer
from ablate.errors import DataError
from ablate.registry import Registry

CORPORA: Registry = Registry("data")


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` for a dataclass, dict or DictConfig; `default` when absent or None."""
    if cfg is None:
        return default
    value = cfg.get(key, None) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _hash64(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def val_bucket(doc_id: str) -> int:
    """Stable bucket in 0..999 of a document id (independent of hash seeds and RNG state)."""
    return _hash64(doc_id) % 1000


def split_documents(docs: tuple[Document, ...], val_per_mille: int) -> tuple[list[Document], list[Document]]:
    """Train documents in corpus order; validation documents in a fixed hashed order, so that a cap
    on validation batches still samples the whole corpus rather than its first files."""
    train, val = [], []
    for d in docs:
        (val if val_bucket(d.id) < val_per_mille else train).append(d)
    return train, sorted(val, key=lambda d: _hash64(d.id))


def _splitmix_bucket(index: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Vectorised stable bucket in 0..999 of (salt, index) pairs, e.g. (shard, document index)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + salt.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(1000)).astype(np.int64)


class Corpus:
    """A source of documents. `tokenizer()` says how its documents are tokenized and `load()`
    gives the train and validation documents, tokenized."""

    @classmethod
    def from_config(cls, cfg: Any) -> "Corpus":
        return cls()

    def tokenizer(self, model_vocab: int | None) -> Tokenizer:
        return ByteTokenizer()

    def load(self, tokenizer: Tokenizer, val_per_mille: int) -> tuple[DocSet, DocSet]:
        raise NotImplementedError


class TextCorpus(Corpus):
    """A corpus of text documents, split by document id and encoded with the tokenizer."""

    def documents(self) -> tuple[Document, ...]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def split(self, val_per_mille: int) -> tuple[list[Document], list[Document]]:
        train, val = split_documents(self.documents(), val_per_mille)
        if not train:
            raise DataError(f"{self.describe()}: no documents are left for training; lower data.val_per_mille")
        if not val and val_per_mille > 0:
            raise DataError(
                f"{self.describe()}: none of its {len(train)} documents fell in the validation split; "
                "split files into more documents (data.doc_separator) or raise data.val_per_mille"
            )
        return train, val

    def load(self, tokenizer: Tokenizer, val_per_mille: int) -> tuple[DocSet, DocSet]:
        return tuple(  # type: ignore[return-value]
            DocSet.from_token_lists([tokenizer.encode(d.text) for d in part], tokenizer.eos_id)
            for part in self.split(val_per_mille)
        )


# ---------------------------------------------------------------------------------------------
# Shakespeare, bundled with the package

BUNDLE = "shakespeare.jsonl.gz"  # package data of ablate.data, rebuilt by `python -m ablate.data.bundle`


def read_bundle(source: str | os.PathLike | BinaryIO) -> tuple[Document, ...]:
    """The documents of a gzip-compressed JSON Lines file of {"id", "text"} records, in file order."""
    with gzip.open(source, "rt", encoding="utf-8") as lines:
        return tuple(Document(record["id"], record["text"]) for record in map(json.loads, lines))


@functools.lru_cache(maxsize=1)
def shakespeare_documents() -> tuple[Document, ...]:
    """The bundled plays, one document per scene, read once per process."""
    resource = resources.files("ablate.data").joinpath(BUNDLE)
    if not resource.is_file():
        raise DataError(f"the shakespeare corpus ({BUNDLE}) is missing from the ablate package; reinstall it")
    with resource.open("rb") as f:
        return read_bundle(f)


@CORPORA.register("shakespeare")
class ShakespeareCorpus(TextCorpus):
    """Shakespeare's 38 plays as plain text, one document per scene (prologues and epilogues count
    as scenes), ids `play/act/scene`; read from the compressed file shipped in this package."""

    def documents(self) -> tuple[Document, ...]:
        return shakespeare_documents()

    def describe(self) -> str:
        return "the shakespeare corpus"


# ---------------------------------------------------------------------------------------------
# Local text files


# error handlers that decode to text the byte tokenizer can encode as UTF-8
DECODE_ERRORS = ("strict", "replace", "ignore", "backslashreplace")


def _codec_name(name: str) -> str:
    return encodings.normalize_encoding(name).lower()


def check_decoding(encoding: str, errors: str) -> None:
    """Refuse an encoding (`data.encoding`) or error handler (`data.errors`) that cannot decode text files."""
    fix = "name a text encoding such as utf-8, latin-1 or cp1252"
    try:
        info: codecs.CodecInfo | None = codecs.lookup(encoding)
    except LookupError:
        info = None
    # a registered codec search function may answer every name (some installed packages add one): trust a
    # codec of the standard library, or one that carries the name asked for
    in_stdlib = encodings.search_function(encoding.lower()) is not None
    if info is None or not (in_stdlib or _codec_name(info.name) == _codec_name(encoding)):
        raise DataError(f"data.encoding='{encoding}' is an unknown encoding; {fix}")
    try:
        b"\n".decode(encoding)  # a codec that is not a text encoding refuses here (not on b"")
    except LookupError:
        raise DataError(f"data.encoding='{encoding}' is not a text encoding; {fix}") from None
    except UnicodeError:
        pass  # a text encoding in which a lone newline byte does not decode (utf-16)
    if errors not in DECODE_ERRORS:
        choices = ", ".join(DECODE_ERRORS)
        raise DataError(f"data.errors='{errors}' is not an error handler for decoding text; choose one of: {choices}")


def decode_file(path: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The text of a file, with universal newlines. With `errors="strict"` a byte that does not decode
    stops the run, naming the file, the byte's offset and line, and the fix."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"text file '{path}' (from data.paths) cannot be read: {err.strerror}") from None
    try:
        text = raw.decode(encoding, errors)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"text file '{path}' is not valid {encoding}: byte {e.start} (0x{raw[e.start]:02x}, line {line}): "
            f"{e.reason}. Set data.encoding=latin-1 if the file is Latin-1, "
            "or data.errors=replace to accept replacement characters; a file that is not text does not belong in "
            "data.paths (narrow data.glob)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


@CORPORA.register("text")
class TextFilesCorpus(TextCorpus):
    """Text files, listed or found in folders (`data.paths`, folders searched with `data.glob`,
    recursively). A file is one document unless `data.doc_separator` is set: then the file is cut
    at every occurrence of that literal string (e.g. "\\n\\n\\n" or a marker line) and each
    non-blank piece is a document. Ids are `file#piece`, files named relative to their folder.

    Files are decoded with `data.encoding` (default utf-8). A byte that does not decode is refused
    unless `data.errors` says otherwise: `replace` puts U+FFFD in its place, `ignore` drops it,
    `backslashreplace` writes it as `\\xNN`. The byte tokenizer sees the decoded text encoded as UTF-8,
    so bits per byte counts the UTF-8 bytes of the text, not the bytes of the file: with another
    encoding every character beyond ASCII counts as its UTF-8 bytes (an `é` of a latin-1 file, one
    byte there, counts as 2), each U+FFFD from `replace` counts as 3, and dropped bytes count as none."""

    def __init__(
        self,
        paths: list[str],
        glob: str = "*.txt",
        doc_separator: str | None = None,
        encoding: str = "utf-8",
        errors: str = "strict",
    ):
        check_decoding(encoding, errors)
        self.paths = [str(p) for p in paths]
        self.glob = glob
        self.doc_separator = doc_separator
        self.encoding = encoding
        self.errors = errors

    @classmethod
    def from_config(cls, cfg: Any) -> "TextFilesCorpus":
        paths = config_value(cfg, "paths", [])
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise DataError("the 'text' corpus needs files or folders in data.paths")
        return cls(
            paths,
            config_value(cfg, "glob", "*.txt"),
            config_value(cfg, "doc_separator", None),
            config_value(cfg, "encoding", "utf-8"),
            config_value(cfg, "errors", "strict"),
        )

    def describe(self) -> str:
        return f"the text corpus at {', '.join(self.paths)}"

    def files(self) -> list[tuple[str, Path]]:
        """(id prefix, file) pairs in a fixed order."""
        found: list[tuple[str, Path]] = []
        for p in map(Path, self.paths):
            if p.is_file():
                found.append((p.name, p))
            elif p.is_dir():
                found.extend((f.relative_to(p).as_posix(), f) for f in sorted(p.rglob(self.glob)) if f.is_file())
            else:
                raise DataError(f"text corpus path '{p}' (from data.paths) does not exist")
        return found

    def documents(self) -> tuple[Document, ...]:
        files = self.files()
        key = tuple((name, str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for name, f in files)
        docs = _text_documents(key, self.doc_separator, self.encoding, self.errors)
        if not docs:
            raise DataError(f"{self.describe()} is empty: no text in its {len(files)} files matching '{self.glob}'")
        return docs


@functools.lru_cache(maxsize=16)
def _text_documents(
    files: tuple[tuple[str, str, int, int], ...], separator: str | None, encoding: str, errors: str
) -> tuple[Document, ...]:
    docs = []
    for name, path, _, _ in files:
        text = decode_file(path, encoding, errors)
        pieces = text.split(separator) if separator else [text]
        docs.extend(Document(f"{name}#{i}", piece.strip("\n")) for i, piece in enumerate(pieces) if piece.strip())
    return tuple(docs)


# ---------------------------------------------------------------------------------------------
# Pre-tokenized shards


@CORPORA.register("tokens")
class TokenShardCorpus(Corpus):
    """uint16 token shards in the llm.c layout, in the folder `data.path`: `*train*.bin` for training
    and `*val*.bin` for validation. Without val shards, training documents are split by a stable
    hash of (shard name, document index). `data.eot_id` ends documents;
    `data.vocab_size` is the tokenizer's vocabulary (default: the model's, else max id + 1)."""

    def __init__(self, path: str, eot_id: int, vocab_size: int | None = None):
        self.path = Path(path)
        self.eot_id = int(eot_id)
        self.vocab_size = vocab_size
        if not self.path.is_dir():
            raise DataError(f"token shard folder '{self.path}' (from data.path) does not exist")
        self.train_files = find_shards(self.path, "train")
        self.val_files = find_shards(self.path, "val")
        if not self.train_files:
            raise DataError(f"no training shards (*train*.bin) in '{self.path}' (data.path)")

    @classmethod
    def from_config(cls, cfg: Any) -> "TokenShardCorpus":
        path = config_value(cfg, "path", None)
        if path is None:
            raise DataError("the 'tokens' corpus needs the shard folder in data.path")
        eot_id = config_value(cfg, "eot_id", None)
        if eot_id is None:
            raise DataError("the 'tokens' corpus needs data.eot_id, the id that ends each document")
        return cls(path, eot_id, config_value(cfg, "vocab_size", None))

    def _shards(self):
        return [shard_documents(f, self.eot_id) for f in self.train_files + self.val_files]

    def tokenizer(self, model_vocab: int | None) -> Tokenizer:
        vocab = self.vocab_size or model_vocab
        if vocab is None:
            vocab = max([self.eot_id] + [s.max_token for s in self._shards()]) + 1
        return PretokenizedTokenizer(int(vocab), self.eot_id)

    def load(self, tokenizer: Tokenizer, val_per_mille: int) -> tuple[DocSet, DocSet]:
        shards = self._shards()
        for s in shards:
            check_vocab(s.max_token, tokenizer.vocab_size, f"token shard {s.path}")
        n_train = len(self.train_files)
        train = _docset(shards[:n_train])
        if self.val_files:
            val = _docset(shards[n_train:])
            if val.n_tokens == 0:
                empty = ", ".join(str(f) for f in self.val_files)
                raise DataError(f"the validation shards ({empty}) hold no tokens; write tokens into them, or remove "
                                "them to hold out training documents instead (data.val_per_mille per thousand)")
            return train, val
        salts = np.concatenate([np.full(s.starts.size, _name_salt(s.path), np.int64) for s in shards[:n_train]])
        index = np.concatenate([np.arange(s.starts.size) for s in shards[:n_train]])
        in_val = _splitmix_bucket(index, salts) < val_per_mille
        return train.subset(np.flatnonzero(~in_val)), train.subset(np.flatnonzero(in_val))


_NONE = np.zeros(0, np.int64)


def _name_salt(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(Path(path).name.encode(), digest_size=4).digest(), "little")


def _docset(shards: list) -> DocSet:
    return DocSet(
        sources=tuple(s.tokens for s in shards),
        source=np.concatenate([np.full(s.starts.size, i, np.int64) for i, s in enumerate(shards)] + [_NONE]),
        start=np.concatenate([s.starts for s in shards] + [_NONE]),
        length=np.concatenate([s.lengths for s in shards] + [_NONE]),
    )
