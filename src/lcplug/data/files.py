"""Reading local files for sources: path expansion, JSON lines and text in bounded pieces, resumable by offset.

Offsets are byte offsets, so a source resumes a file where it stopped without re-reading it. Text is cut
after a newline, which never falls inside a UTF-8 character, so each piece decodes on its own.
`file_identity` names a file as it is now, for token caches that must not re-read unchanged files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..eval.haystack import source_files
from .base import DataError, Piece, Source, permutation

Reader = Callable[[Path, int, int], Generator[tuple[Piece, int, int], None, int]]
"""Reads one file from a byte offset (or row) `at` with `doc` documents counted before it: yields each piece
with the offset after it and the documents counted after it, and returns the count at the end of the file.
Resumed at an offset, it counts again whatever follows it."""

GLOB_CHARS = frozenset("*?[")


def expand_paths(paths: Sequence[str], owner: str) -> list[Path]:
    """Files of `paths` (files, directories searched recursively, or glob patterns) in a stable order.

    A path that does not exist, or a pattern that matches nothing, is an error naming it; hidden files and
    directories (`.git`) are left out of directories.
    """
    if not paths:
        raise DataError(f"{owner}: no paths given")
    out: list[Path] = []
    for raw in paths:
        if GLOB_CHARS & set(raw):
            matches = sorted(Path(p) for p in glob.glob(raw, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise DataError(f"{owner}: pattern {raw!r} matches no file")
            out += files
            continue
        path = Path(raw)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in source_files(path, python_only=False) if not _hidden(p.relative_to(path))]
        else:
            raise DataError(f"{owner}: path {raw!r} does not exist")
    return out


def file_identity(path: str | Path, st: os.stat_result, *what: object) -> bytes:
    """A 16-byte key of a file as it is now and of `what` part of it a piece is (offset, parameters).

    The path (absolute), device and inode name the file; size, mtime_ns and ctime_ns change with its
    contents. That is the rule `make` and `datasets`' file fingerprints trust (with ctime added, which no
    tool can set back: `cp -p` or `touch -d` onto the same file still changes it). A file rewritten
    within the clock's resolution to the same size, in place, keeps its identity: `data.cache_verify`
    hashes the contents instead.
    """
    spec = (
        f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        + "".join(f"\0{w}" for w in what)
    )
    return hashlib.blake2b(spec.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


class FileSource(Source):
    """Files in a seeded order per epoch, each read by the reader of its format (JSON lines by default).

    Document d (counting over the epoch's files) goes to rank d mod world; a reader skips others'
    documents without parsing them. The state is (file position, offset in it, documents counted).
    """

    def __init__(self, name: str, paths: Sequence[str], *, shuffle: bool = True, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.files = expand_paths(paths, f"data source {name!r}")
        self.shuffle = shuffle

    def reader(self, path: Path) -> Reader:
        """The reader for `path`."""
        return self.jsonl

    def record(self, record: Any, where: str, group: str) -> Piece | None:
        """The piece of one parsed record, or None (skip it with `self.skip` when it is bad)."""
        raise NotImplementedError  # abstract: each file source defines it

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        n = len(self.files)
        order = permutation(n, self.seed, self.name, "files", self.epoch) if self.shuffle else range(n)
        k, at, doc = int(position.get("file", 0)), int(position.get("at", 0)), int(position.get("doc", 0))
        while k < n:
            path = self.files[order[k]]
            pieces = self.reader(path)(path, at, doc)
            while True:
                try:
                    piece, at, count = next(pieces)
                except StopIteration as end:
                    doc = end.value
                    break
                yield piece, {"file": k, "at": at, "doc": count}
            k, at = k + 1, 0

    def jsonl(self, path: Path, at: int, doc: int) -> Generator[tuple[Piece, int, int], None, int]:
        """One document per non-blank line; bad lines (not UTF-8, not JSON) are skipped and counted."""
        try:
            for line, after in read_lines(path, at):
                doc += 1
                if not self.mine(doc - 1):
                    continue
                where = f"{path} line ending at byte {after}"
                try:
                    record = parse_json_line(line)
                except ValueError:
                    self.skip("bad JSON line", where)
                    continue
                piece = self.record(record, where, str(path))
                if piece is not None:
                    yield piece, after, doc
        except OSError as exc:
            self.skip("unreadable", f"{path} ({exc.strerror})")
        return doc


def read_lines(path: Path, offset: int) -> Iterator[tuple[bytes, int]]:
    """Non-blank lines of a file from byte `offset`, each with the offset just after it."""
    with path.open("rb") as f:
        f.seek(offset)
        for line in f:
            offset += len(line)
            if line.strip():
                yield line, offset


def parse_json_line(line: bytes) -> Any:
    """One JSON line, or raise ValueError (bad UTF-8 or bad JSON alike)."""
    return json.loads(line.decode("utf-8"))


def read_text(path: Path, offset: int, piece_bytes: int) -> Iterator[tuple[str, int, bool]]:
    """A text file from byte `offset` in pieces of about `piece_bytes`, cut after a newline where there is one.

    Yields (text, offset after it, whether it is the end of the file); raises UnicodeDecodeError on bytes
    that are not UTF-8.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read(piece_bytes)
            if len(chunk) == piece_bytes and offset + len(chunk) < size:
                cut = chunk.rfind(b"\n") + 1 or _char_boundary(chunk)
                f.seek(offset + cut)
                chunk = chunk[:cut]
            offset += len(chunk)
            end = offset >= size
            yield chunk.decode("utf-8"), offset, end
            if end:
                return


def _char_boundary(chunk: bytes) -> int:
    """The end of the last whole UTF-8 character that surely fits in `chunk` (its last lead byte is left out)."""
    i = len(chunk)
    while i > 1 and chunk[i - 1] & 0xC0 == 0x80:
        i -= 1
    return i - 1 if i > 1 and chunk[i - 1] >= 0xC0 else len(chunk)
