"""A persistent token cache: text tokenized once, then read back from memory-mapped token arrays.

Tokenizing is the expensive step of the whole pipeline (the Rust BPE takes ~90% of a cold pass), and
every later epoch, length-upsampled repeat, resume, `lcplug data preview` and data-parallel rank on the
node would tokenize the same text again. With `data.cache_dir` set, `TokenStream` asks the cache first.

- **Key**: a 128-bit BLAKE2b hash of the piece's text, under a directory named by the tokenizer's
  fingerprint (its whole `tokenizer.json`, the `tokenizers` version and this format's version). A changed
  text simply misses; another tokenizer reads another directory. Content keys work for every text source
  (files, Parquet rows, `datasets` rows, builders' text).
- **File identities**: so that a warm pass neither reads nor hashes unchanged local files, the code and
  plain-text sources name each file piece by the file's identity (path, device, inode, size, mtime_ns,
  ctime_ns, and the piece's offset and parameters: `files.file_identity`), and the cache records which
  content key each identity had (`lcplug.data.fileindex`), with the code source's per-repository
  dependency orders. A known identity is served without opening the file; any change to the file is a
  new identity, read and hashed (and tokenized only if its text is new). `verify=True`
  (`data.cache_verify`) trusts no identity: every file is read and hashed, as for other sources.
- **Shards**: each process appends what it tokenized to memory, and writes it as one shard file
  (`<time>-<pid>-<random>.tok`: a header, a sorted index, the uint32 tokens) once it holds `flush_tokens`
  tokens, at the end of each epoch of a source, at `close()` and at exit. A shard is written to a
  temporary name and renamed, so readers only ever see whole shards; concurrent ranks write their own.
- **Validation**: a shard's header, fingerprint and sizes are checked when the cache opens, and every
  entry's own checksum (BLAKE2b of its tokens) when it is read; an index file's checksum when it opens.
  A file that fails (truncated, another tokenizer's, flipped bits) is removed with a warning and its
  text tokenized (or its files read) again: tokens are never served from it.

Shards written by other processes after a cache opened are seen by caches opened later. Nothing is
ever evicted: delete the directory (at any time) to reclaim the space, ~4 bytes per token.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataError, Known, Piece
from .fileindex import FileIndex
from .tokenize import TextTokenizer

FORMAT = 1
MAGIC = b"LCTOKC01"
SUFFIX = ".tok"
ENTRY = np.dtype([("key", "<u8", (2,)), ("start", "<u8"), ("length", "<u8"), ("check", "<u8")])
"""An index entry: the text's hash, where its tokens start in the shard's token array, how many, their checksum."""
HEAD = 16
"""Bytes before a shard's JSON header: the magic and the header's length."""


def tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """A hash of everything that decides the ids `TextTokenizer.encode_batch` gives (fast tokenizers only)."""
    if tokenizer.fast is None:
        raise DataError(f"the token cache needs a fast (Rust) tokenizer, got {tokenizer!r}")
    import tokenizers

    spec = f"lcplug token cache {FORMAT}\0tokenizers {tokenizers.__version__}\0{tokenizer.fast.to_str()}"
    return hashlib.blake2b(spec.encode("utf-8"), digest_size=16).hexdigest()


def text_key(text: str) -> bytes:
    """The 16-byte key of a text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _check(tokens: np.ndarray) -> int:
    """An entry's checksum: BLAKE2b (64 bits) of its tokens, hashed in place (no copy)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(tokens).data, digest_size=8).digest(), "little")


class ShardError(ValueError):
    """A shard that fails validation."""


@dataclass
class Shard:
    """One validated shard file: its index (sorted by key) and tokens, both views of one memory map."""

    path: Path
    index: np.ndarray
    tokens: np.ndarray

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> Shard:
        """Map and validate `path` (header, fingerprint, sizes, index bounds); ShardError naming what is wrong."""
        size = path.stat().st_size
        if size < HEAD:
            raise ShardError(f"{size} bytes, shorter than a header")
        data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # plain views slice faster; they keep the map
        if bytes(data[:8]) != MAGIC:
            raise ShardError("not a token cache shard (bad magic)")
        head_len = int(data[8:16].view("<u8")[0])
        try:
            head = json.loads(bytes(data[HEAD : HEAD + head_len]).decode("utf-8"))
            entries, tokens, fp, fmt = int(head["entries"]), int(head["tokens"]), head["tokenizer"], head["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"unreadable header ({exc})") from None
        if fmt != FORMAT or fp != fingerprint:
            raise ShardError(f"written for format {fmt} / tokenizer {fp}, not {FORMAT} / {fingerprint}")
        at = HEAD + head_len
        expected = at + entries * ENTRY.itemsize + tokens * 4
        if size != expected:
            raise ShardError(f"{size} bytes, its header describes {expected}")
        index = data[at : at + entries * ENTRY.itemsize].view(ENTRY)
        ids = data[at + entries * ENTRY.itemsize :].view("<u4")
        if entries and int((index["start"] + index["length"]).max()) > tokens:
            raise ShardError("an index entry points past the tokens")
        return cls(path, index, ids)

    @staticmethod
    def write(path: Path, fingerprint: str, items: dict[bytes, np.ndarray]) -> None:
        """Write `items` (key -> ids) as a shard at `path`, atomically (a temporary file renamed)."""
        keys = sorted(items)
        index = np.zeros(len(keys), ENTRY)
        arrays = [items[k].astype("<u4") for k in keys]
        lengths = np.array([len(a) for a in arrays], dtype=np.uint64)
        index["key"] = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
        index["start"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
        index["length"] = lengths
        index["check"] = [_check(a) for a in arrays]
        head = json.dumps(
            {"format": FORMAT, "tokenizer": fingerprint, "entries": len(keys), "tokens": int(lengths.sum())}
        ).encode()
        head += b" " * (-(HEAD + len(head)) % 8)  # the index and tokens start 8-byte aligned
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + head)
            f.write(index.tobytes())
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, path)


class TokenCache:
    """Token ids by text for one tokenizer under `root`, read from shards and extended with what it tokenizes.

    `encode_batch(texts)` is a drop-in for `TextTokenizer.encode_batch`: the same int32 ids, from the
    cache where it has them; `encode_pieces(pieces)` does the same for pieces, where a local file's piece
    may come without its text (`Piece.file`), known by the file's identity (see `lcplug.data.fileindex`).
    As the sources' `FileFacts` it says which file pieces it knows. `misses` counts the (distinct) texts
    it tokenized, `hits` the non-empty texts it did not have to. With `verify`, file identities are
    recorded but never trusted: every file is read and its text hashed. Thread-safe.
    """

    def __init__(
        self, root: str | Path, tokenizer: TextTokenizer, *, flush_tokens: int = 1 << 24, verify: bool = False
    ):
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.dir = Path(root).expanduser() / self.fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir {str(root)!r}: cannot create {str(self.dir)!r} ({exc.strerror})") from None
        self.flush_tokens = flush_tokens
        self.verify = verify
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._pending: dict[bytes, np.ndarray] = {}
        self._pending_tokens = 0
        self._shards: list[Shard] = []
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                self._shards.append(Shard.open(path, self.fingerprint))
            except (ShardError, OSError) as exc:
                self._discard(path, str(exc))
        self._locate()
        self.index = FileIndex(self.dir)
        for path, reason in self.index.load():
            self._discard(path, reason, "index", "its files are read again")
        self._finalizer = weakref.finalize(
            self, TokenCache._flush_pending, self.dir, self.fingerprint, self._pending, self.index
        )

    def __repr__(self) -> str:
        return f"TokenCache({str(self.dir)!r}, shards={len(self._shards)}, hits={self.hits}, misses={self.misses})"

    # ---- lookup ------------------------------------------------------------------------------------------
    def _locate(self) -> None:
        """Where each key's tokens are: (shard, start, length, checksum) as Python values, one dict lookup a piece."""
        self._where: dict[bytes, tuple[Shard, int, int, int]] = {}
        for shard in self._shards:
            index = shard.index
            keys = index["key"].tobytes()
            columns = zip(index["start"].tolist(), index["length"].tolist(), index["check"].tolist())
            for i, (start, length, check) in enumerate(columns):
                self._where[keys[16 * i : 16 * i + 16]] = (shard, start, length, check)

    def _find(self, key: bytes) -> np.ndarray | None:
        """The ids stored for `key` (pending, or in a shard with its checksum verified), or None.

        Shard tokens come as a read-only int32 view of the memory map (ids < 2**31), not a copy."""
        found = self._pending.get(key)
        if found is not None:
            return found
        where = self._where.get(key)
        if where is None:
            return None
        shard, start, length, check = where
        stored = shard.tokens[start : start + length]
        if _check(stored) != check:
            self._drop(shard, "an entry's tokens fail their checksum")
            return None
        return stored.view("<i4")

    # ---- what sources may skip reading (FileFacts) -------------------------------------------------------
    def known(self, identity: bytes) -> Known | None:
        """What the file piece `identity` held, if recorded (never with `verify`). Its tokens are looked up
        when it is encoded; a piece whose tokens are gone by then is read after all (`encode_pieces`)."""
        if self.verify:
            return None
        with self._lock:
            return self.index.files.get(identity)

    def derived(self, key: bytes) -> list[int] | None:
        """A list derived from files' contents, recorded under a key of their identities (never with `verify`)."""
        if self.verify:
            return None
        with self._lock:
            return self.index.derived.get(key)

    def record_derived(self, key: bytes, value: list[int]) -> None:
        with self._lock:
            self.index.put_derived(key, value)

    # ---- encoding ----------------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids (int32) of each text, as `TextTokenizer.encode_batch` gives them; only the misses are tokenized."""
        return self.encode_pieces([Piece(text=t) for t in texts])

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Ids (int32) of each text piece; a file piece's identity is recorded with its text's key.

        A piece given without its text (`file.known`) whose tokens turn out lost (a shard that failed its
        checksum since) has its file read again."""
        out: list[np.ndarray | None] = [None] * len(pieces)
        missing: dict[bytes, list[int]] = {}
        texts: list[str] = []
        with self._lock:
            for i, piece in enumerate(pieces):
                file = piece.file
                if file is not None and file.known is not None:
                    found = self._find(file.known.key)
                    if found is not None:
                        out[i] = found
                        self.hits += 1
                        continue
                text = piece.text if piece.text is not None else file.read()  # type: ignore[union-attr]
                if not text:
                    out[i] = np.zeros(0, np.int32)
                    continue
                key = text_key(text)
                if file is not None:
                    self.index.put(file.identity, Known(key, len(text), file.end))
                found = None if key in missing else self._find(key)
                if found is None:
                    if key not in missing:
                        texts.append(text)
                    missing.setdefault(key, []).append(i)
                else:
                    out[i] = found
                    self.hits += 1
        if missing:
            encoded = self.tokenizer.encode_batch(texts)
            with self._lock:
                self.misses += len(missing)
                self.hits += sum(len(where) - 1 for where in missing.values())  # repeats within the batch
                for (key, where), ids in zip(missing.items(), encoded):
                    for i in where:
                        out[i] = ids
                    self._pending[key] = ids
                    self._pending_tokens += len(ids)
            if self._pending_tokens >= self.flush_tokens:
                self.flush()
        return out  # type: ignore[return-value]  # every slot is filled above

    # ---- writing and dropping shards ---------------------------------------------------------------------
    def flush(self) -> None:
        """Write what was tokenized and recorded since the last flush (a new shard, then a new index file),
        and read from them from now on."""
        with self._lock:
            path = self._flush_pending(self.dir, self.fingerprint, self._pending, self.index)
            self._pending_tokens = 0
            if path is not None:
                self._shards.append(Shard.open(path, self.fingerprint))
                self._locate()

    close = flush

    @staticmethod
    def _flush_pending(
        directory: Path, fingerprint: str, pending: dict[bytes, np.ndarray], index: FileIndex
    ) -> Path | None:
        """Write `pending` as a shard and empty it, then the index's new entries (also run at exit); the
        shard's path, None if there was none or the disk refused (warned)."""
        path = None
        if pending:
            path = directory / f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
            try:
                Shard.write(path, fingerprint, pending)
            except OSError as exc:
                warnings.warn(
                    f"lcplug: could not write token cache shard {str(path)!r} ({exc}); not cached", stacklevel=2
                )
                path = None
            pending.clear()
        try:
            index.flush()
        except OSError as exc:
            warnings.warn(f"lcplug: could not write a token cache index in {str(directory)!r} ({exc})", stacklevel=2)
        return path

    def _drop(self, shard: Shard, reason: str) -> None:
        self._shards = [s for s in self._shards if s is not shard]
        self._locate()
        self._discard(shard.path, reason)

    @staticmethod
    def _discard(path: Path, reason: str, what: str = "shard", redo: str = "its text is tokenized again") -> None:
        """Remove a cache file that fails validation (another rank may have removed it first), with a warning."""
        warnings.warn(
            f"lcplug: token cache {what} {str(path)!r} is corrupt or mismatched ({reason}); removed, {redo}",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
