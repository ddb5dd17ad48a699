"""`text`: local text, JSON-lines and Parquet files as documents."""

from __future__ import annotations

import functools
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lcplug.data.base import DataContext, FileText, Piece, Source, SourcePlugin
from lcplug.data.files import FileSource, Reader, file_identity, read_text
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH = 1024


@dataclass(frozen=True)
class TextParams(Params):
    paths: list[str] = param(help="files, directories (searched recursively) or glob patterns")
    format: Literal["auto", "txt", "jsonl", "parquet"] = param(
        "auto", "auto: by suffix (.jsonl/.ndjson/.json JSON lines, .parquet, anything else plain text)"
    )
    field: str = param("text", "the field (JSON lines) or column (Parquet) holding the text")
    group_field: str | None = param(None, "a field/column naming each record's group (e.g. rephrasings of one doc)")
    shuffle: bool = param(True, "file order seeded per epoch (records keep their order within a file)")
    piece_bytes: int = param(
        1 << 20, "plain-text files stream in pieces of about this size", check=lambda v: v >= 1024, valid=">= 1024"
    )


class TextSource(FileSource):
    """Plain-text files are one document each (streamed in pieces); JSON-lines and Parquet have one per record.

    Undecodable files, bad JSON lines and records without the text field are skipped and counted.
    """

    def __init__(self, name: str, params: TextParams, **kwargs: Any):
        super().__init__(name, params.paths, shuffle=params.shuffle, **kwargs)
        self.params = params

    def reader(self, path: Path) -> Reader:
        fmt = self.params.format
        if fmt == "auto":
            suffix = path.suffix.lower()
            fmt = "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "txt"
        return {"txt": self._txt, "jsonl": self.jsonl, "parquet": self._parquet}[fmt]

    def _txt(self, path: Path, at: int, doc: int) -> Generator[tuple[Piece, int, int], None, int]:
        """One document per file, streamed in pieces; with a token cache, the pieces it knows are not read."""
        try:
            st = path.stat()
        except OSError as exc:
            self.skip("unreadable", f"{path} ({exc.strerror})")
            return doc + 1
        size = st.st_size
        if at >= size > 0:
            return doc  # resumed after the file's last piece
        if at == 0 and not self.mine(doc):
            return doc + 1
        if size == 0:
            self.skip("empty", str(path))
            return doc + 1
        first = at == 0
        try:
            while True:
                identity = file_identity(path, st, "text", at, self.params.piece_bytes)
                known = self.facts.known(identity) if self.facts is not None else None
                text, after = (
                    (None, known.end) if known is not None else next(read_text(path, at, self.params.piece_bytes))[:2]
                )
                end = after >= size
                where = FileText(identity, after, functools.partial(self._reread, path, at, after), known)
                yield Piece(text=text, first=first, last=end, size=size, group=str(path), file=where), after, doc + end
                first, at = False, after
                if end:
                    return doc + 1
        except UnicodeDecodeError:
            self.skip("undecodable", str(path))
            if not first:  # close the document its decodable start began
                yield Piece(text="", first=False, last=True, group=str(path)), size, doc + 1
        except OSError as exc:
            self.skip("unreadable", f"{path} ({exc.strerror})")
        return doc + 1

    def _reread(self, path: Path, start: int, end: int) -> str:
        """The text of bytes [start, end) of a file ('' if it cannot be read now, skipped and counted)."""
        try:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(end - start).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.skip("unreadable", f"{path} ({exc})")
            return ""

    def _parquet(self, path: Path, at: int, doc: int) -> Generator[tuple[Piece, int, int], None, int]:
        """One document per row; `at` is the rows already passed, so the file's first row is document doc - at."""
        start = doc - at
        try:
            import pyarrow.parquet as pq

            columns = [self.params.field] + ([self.params.group_field] if self.params.group_field else [])
            table = pq.ParquetFile(path)
            rows = table.metadata.num_rows
            row = 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
                if row + batch.num_rows > at:
                    for i, record in enumerate(batch.to_pylist()):
                        r = row + i
                        if r >= at and self.mine(start + r):
                            piece = self.record(record, f"{path} row {r}", str(path))
                            if piece is not None:
                                yield piece, r + 1, start + r + 1
                row += batch.num_rows
        except (ImportError, OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            self.skip("unreadable parquet", f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            return doc
        return start + rows

    def record(self, record: Any, where: str, group: str) -> Piece | None:
        text = record.get(self.params.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            self.skip(f"no text field {self.params.field!r}", where)
            return None
        if not text:
            return None
        named = record.get(self.params.group_field) if self.params.group_field else None
        return Piece(text=text, group=group if named is None else str(named))


class Text(SourcePlugin):
    """Local text files, JSON lines and Parquet: plain files are documents, records of the others are.

    Paths may be files, directories (all non-hidden files, recursively) or glob patterns; a path that does
    not exist is an error at once. Big plain-text files stream in pieces (bounded memory). Undecodable
    files, bad JSON lines and records without the text field are skipped and counted, never a crash.
    """

    name = "text"
    Params = TextParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return TextSource(name, self.params, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(Text)
