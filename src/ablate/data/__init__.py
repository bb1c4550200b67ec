"""Data pipeline: corpora, tokenizers, and document-aware packing into (B, T) batches.

`build_data(cfg.data, context, batch_size, seed, vocab_size)` is the one entry point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ablate.data.corpus import CORPORA, Corpus, Document, config_value, split_documents, val_bucket
from ablate.data.packing import DocSet, PackedBatch, TrainLoader, pack_eval, padding_frac
from ablate.data.shards import check_vocab, open_shard, write_shard
from ablate.data.tokenizer import IGNORE_INDEX, ByteTokenizer, PretokenizedTokenizer, Tokenizer
from ablate.errors import DataError

__all__ = [
    "CORPORA",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "Corpus",
    "Data",
    "DocSet",
    "Document",
    "PackedBatch",
    "PretokenizedTokenizer",
    "Tokenizer",
    "TrainLoader",
    "build_data",
    "check_vocab",
    "open_shard",
    "pack_eval",
    "padding_frac",
    "split_documents",
    "val_bucket",
    "vocab_size_for",
    "write_shard",
]


@dataclass
class Data:
    """What training needs from the data: an endless training loader, fixed validation batches,
    the tokenizer, and counts."""

    train: TrainLoader
    tokenizer: Tokenizer
    stats: dict[str, Any]
    _val: DocSet
    _context: int
    _batch_size: int
    _max_val_batches: int | None
    _val_cache: dict[int, list[PackedBatch]] | None = field(default=None, repr=False)

    def val_batches(self, multiple: int = 1) -> list[PackedBatch]:
        """The validation batches in rows of `multiple` x the context (as many tokens a batch: the rows
        are fewer), packed on first use and reused after. The same documents at every multiple."""
        if self._val_cache is None:
            self._val_cache = {}
        if multiple not in self._val_cache:
            rows = max(1, self._batch_size // multiple)
            self._val_cache[multiple] = pack_eval(self._val, self._context * multiple, rows, self.tokenizer,
                                                  self._max_val_batches)
        if multiple == 1:
            self.stats["val_batches"] = len(self._val_cache[1])
        return self._val_cache[multiple]

    def val_tokens_evaluated(self) -> int:
        """The held-out tokens validation reads (data.max_val_batches may stop short of all of them)."""
        return sum(b.n_tokens for b in self.val_batches())

    @property
    def val_docs(self) -> DocSet:
        """The held-out documents, in validation order."""
        return self._val

    def padding_frac(self, split: str = "train") -> float:
        """Padding tokens / all tokens: of the training batches so far (0: training never pads), or
        of the validation batches."""
        if split == "train":
            return self.train.padding_frac
        if split == "val":
            return padding_frac(self.val_batches())
        raise ValueError(f"split must be 'train' or 'val', not '{split}'")


def build_data(data_cfg: Any, context: int, batch_size: int, seed: int, vocab_size: int | None = None) -> Data:
    """Load the corpus named `data_cfg.name` and wrap it for training.

    Keys read from `data_cfg` (absent or None means the default): name ("shakespeare"),
    val_per_mille (50), max_val_batches (all), and per corpus: paths, glob, doc_separator, encoding,
    errors (text); path, eot_id, vocab_size (tokens). `vocab_size` is the model's vocabulary: the tokenizer's ids
    must fit it.
    """
    corpus = CORPORA.get(config_value(data_cfg, "name", "shakespeare")).from_config(data_cfg)
    tokenizer = corpus.tokenizer(vocab_size)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"the '{tokenizer.name}' tokenizer has {tokenizer.vocab_size} ids but the model's vocab size is "
            f"{vocab_size}; raise the vocab size to at least {tokenizer.vocab_size}"
        )
    val_per_mille = int(config_value(data_cfg, "val_per_mille", 50))
    from ablate.config import DataConfig, check_field

    check_field(DataConfig, "val_per_mille", val_per_mille, "data.val_per_mille")
    train, val = corpus.load(tokenizer, val_per_mille)
    max_val = config_value(data_cfg, "max_val_batches", None)
    stats = {
        "n_train_docs": train.n_docs,
        "n_val_docs": val.n_docs,
        "train_tokens": train.n_tokens,
        "val_tokens": val.n_tokens,
    }
    return Data(
        train=TrainLoader(train, context, batch_size, seed, tokenizer),
        tokenizer=tokenizer,
        stats=stats,
        _val=val,
        _context=context,
        _batch_size=batch_size,
        _max_val_batches=None if max_val is None else int(max_val),
    )


def vocab_size_for(data_cfg: Any) -> int:
    """The vocabulary of the corpus `data_cfg` names, from its tokenizer (no documents are read)."""
    return CORPORA.get(config_value(data_cfg, "name", "shakespeare")).from_config(data_cfg).tokenizer(None).vocab_size
