"""A persistent token cache: text tokenized once, then read back from memory-mapped token arrays.

Tokenizing is the expensive step of the whole pipeline (the Rust BPE takes ~90% of a cold pass), and
every later epoch, length-upsampled repeat, resume, `lcplug data preview` and data-parallel rank on the
node would tokenize the same text again. With `data.cache_dir` set, `TokenStream` asks the cache first.

- **Key**: a 128-bit BLAKE2b hash of the piece's text, under a directory named by the tokenizer's
  fingerprint (its whole `tokenizer.json`, the `tokenizers` version and this format's version). A changed
  source file is changed text, so it simply misses; another tokenizer reads another directory. Keying by
  content (not path and mtime) works for every text source (files, Parquet rows, `datasets` rows,
  builders' text) and cannot serve stale tokens when a file is rewritten within the mtime resolution.
- **Shards**: each process appends what it tokenized to memory, and writes it as one shard file
  (`<time>-<pid>-<random>.tok`: a header, a sorted index, the uint32 tokens) once it holds `flush_tokens`
  tokens, at the end of each epoch of a source, at `close()` and at exit. A shard is written to a
  temporary name and renamed, so readers only ever see whole shards; concurrent ranks write their own.
- **Validation**: a shard's header, fingerprint and sizes are checked when the cache opens, and every
  entry's own checksum (BLAKE2b of its tokens) when it is read. A shard that fails (truncated, another
  tokenizer's, flipped bits) is removed with a warning and its text tokenized again: tokens are never
  served from it.

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

from .base import DataError
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
    return int.from_bytes(hashlib.blake2b(tokens.tobytes(), digest_size=8).digest(), "little")


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
        data = np.memmap(path, dtype=np.uint8, mode="r")
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
    cache where it has them. `misses` counts the (distinct) texts it tokenized, `hits` the non-empty
    texts it did not have to. Thread-safe.
    """

    def __init__(self, root: str | Path, tokenizer: TextTokenizer, *, flush_tokens: int = 1 << 24):
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.dir = Path(root).expanduser() / self.fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir {str(root)!r}: cannot create {str(self.dir)!r} ({exc.strerror})") from None
        self.flush_tokens = flush_tokens
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
        self._merge()
        self._finalizer = weakref.finalize(self, TokenCache._flush_pending, self.dir, self.fingerprint, self._pending)

    def __repr__(self) -> str:
        return f"TokenCache({str(self.dir)!r}, shards={len(self._shards)}, hits={self.hits}, misses={self.misses})"

    # ---- lookup ------------------------------------------------------------------------------------------
    def _merge(self) -> None:
        """One sorted array of every shard's first key word, and where each entry is, for a binary search per key."""
        firsts = [s.index["key"][:, 0] for s in self._shards]
        owner = [np.full(len(s.index), i, np.int32) for i, s in enumerate(self._shards)]
        row = [np.arange(len(s.index), dtype=np.int64) for s in self._shards]
        first = np.concatenate(firsts) if firsts else np.zeros(0, np.uint64)
        order = np.argsort(first, kind="stable")
        self._first = first[order]
        self._owner = np.concatenate(owner)[order] if owner else np.zeros(0, np.int32)
        self._row = np.concatenate(row)[order] if row else np.zeros(0, np.int64)

    def _find(self, key: bytes) -> np.ndarray | None:
        """The ids stored for `key` in a shard (checksum verified), or None."""
        words = np.frombuffer(key, dtype="<u8")
        at = int(np.searchsorted(self._first, words[0]))
        while at < len(self._first) and self._first[at] == words[0]:
            shard = self._shards[self._owner[at]]
            entry = shard.index[self._row[at]]
            at += 1
            if entry["key"][1] != words[1]:
                continue
            start, length = int(entry["start"]), int(entry["length"])
            stored = shard.tokens[start : start + length]
            if _check(stored) != int(entry["check"]):
                self._drop(shard, "an entry's tokens fail their checksum")
                return None
            return stored.astype(np.int32)
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids (int32) of each text, as `TextTokenizer.encode_batch` gives them; only the misses are tokenized."""
        out: list[np.ndarray | None] = [None] * len(texts)
        missing: dict[bytes, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if not text:
                    out[i] = np.zeros(0, np.int32)
                    continue
                key = text_key(text)
                found = self._pending.get(key)
                if found is None and key not in missing:
                    found = self._find(key)
                if found is None:
                    missing.setdefault(key, []).append(i)
                else:
                    out[i] = found
                    self.hits += 1
        if missing:
            encoded = self.tokenizer.encode_batch([texts[v[0]] for v in missing.values()])
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
        """Write what was tokenized since the last flush as a new shard, and read from it from now on."""
        with self._lock:
            if not self._pending:
                return
            path = self._flush_pending(self.dir, self.fingerprint, self._pending)
            self._pending_tokens = 0
            if path is not None:
                self._shards.append(Shard.open(path, self.fingerprint))
                self._merge()

    close = flush

    @staticmethod
    def _flush_pending(directory: Path, fingerprint: str, pending: dict[bytes, np.ndarray]) -> Path | None:
        """Write `pending` as a shard and empty it (also run at exit); None if the disk refused (warned)."""
        if not pending:
            return None
        path = directory / f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        try:
            Shard.write(path, fingerprint, pending)
        except OSError as exc:
            warnings.warn(f"lcplug: could not write token cache shard {str(path)!r} ({exc}); not cached", stacklevel=2)
            path = None
        pending.clear()
        return path

    def _drop(self, shard: Shard, reason: str) -> None:
        self._shards = [s for s in self._shards if s is not shard]
        self._merge()
        self._discard(shard.path, reason)

    @staticmethod
    def _discard(path: Path, reason: str) -> None:
        """Remove a shard that fails validation (another rank may have removed it first), with a warning."""
        warnings.warn(
            f"lcplug: token cache shard {str(path)!r} is corrupt or mismatched ({reason}); removed, "
            "its text is tokenized again",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
