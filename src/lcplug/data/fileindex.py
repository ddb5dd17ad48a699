"""The token cache's index of local files: what each file piece's text was, by the file's identity.

A warm pass should not re-read or re-hash files that did not change. Sources of local files name each
piece by its file's identity (`files.file_identity`: path, device, inode, size, mtime, ctime, and the
piece's offset and parameters); this index maps an identity to the piece's content key (under which
the token shards hold its tokens), its length in characters and where it ends in the file. It also
keeps lists of integers derived from files' contents under keys of their identities: the code source's
dependency order of a repository, so a warm pass does not scan imports either.

Files are written like the shards: one `<time>-<pid>-<random>.idx` per flush that has new entries,
written to a temporary name and renamed, with a BLAKE2b checksum of its body in the header. A file
that fails validation is left out (and removed, with a warning, by the cache): its files are read and
hashed again. An entry only says which text a file held; the tokens are still found by content key
and checked against their own checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .base import Known

FORMAT = 1
MAGIC = b"LCFIDX01"
SUFFIX = ".idx"
RECORD = np.dtype([("identity", "V16"), ("key", "V16"), ("chars", "<u8"), ("end", "<u8")])
HEAD = 16
"""Bytes before an index file's JSON header: the magic and the header's length."""


class IndexFileError(ValueError):
    """An index file that fails validation."""


def _digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class FileIndex:
    """File identities -> `Known`, and derived lists by key: the union of a directory's index files, plus
    what this process recorded since its last `flush`. Not thread-safe (the token cache locks around it)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.files: dict[bytes, Known] = {}
        self.derived: dict[bytes, list[int]] = {}
        self.pending_files: dict[bytes, Known] = {}
        self.pending_derived: dict[bytes, list[int]] = {}

    def load(self) -> list[tuple[Path, str]]:
        """Read every index file of the directory (later ones win); the ones that fail, with the reason."""
        failed = []
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                files, derived = self.read(path)
            except (IndexFileError, OSError) as exc:
                failed.append((path, str(exc)))
                continue
            self.files.update(files)
            self.derived.update(derived)
        return failed

    def put(self, identity: bytes, known: Known) -> None:
        if self.files.get(identity) != known:
            self.files[identity] = self.pending_files[identity] = known

    def put_derived(self, key: bytes, value: list[int]) -> None:
        if self.derived.get(key) != value:
            self.derived[key] = self.pending_derived[key] = list(value)

    def flush(self) -> Path | None:
        """Write what was recorded since the last flush as a new index file (none if nothing was)."""
        if not self.pending_files and not self.pending_derived:
            return None
        path = self.dir / f"{time.time_ns():x}-{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"
        self.write(path, self.pending_files, self.pending_derived)
        self.pending_files.clear()
        self.pending_derived.clear()
        return path

    @staticmethod
    def write(path: Path, files: dict[bytes, Known], derived: dict[bytes, list[int]]) -> None:
        """Write `files` and `derived` at `path`, atomically (a temporary file renamed)."""
        records = np.zeros(len(files), RECORD)
        records["identity"] = list(files)
        records["key"] = [k.key for k in files.values()]
        records["chars"] = [k.chars for k in files.values()]
        records["end"] = [k.end for k in files.values()]
        body = records.tobytes() + json.dumps({k.hex(): v for k, v in derived.items()}).encode()
        head = json.dumps({"format": FORMAT, "files": len(files), "check": _digest(body)}).encode()
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + head + body)
        os.replace(tmp, path)

    @staticmethod
    def read(path: Path) -> tuple[dict[bytes, Known], dict[bytes, list[int]]]:
        """The entries of one index file, validated (magic, header, checksum); IndexFileError naming what is wrong."""
        data = path.read_bytes()
        if len(data) < HEAD or data[:8] != MAGIC:
            raise IndexFileError("not a token cache index (bad magic)")
        head_len = int.from_bytes(data[8:HEAD], "little")
        try:
            head = json.loads(data[HEAD : HEAD + head_len].decode("utf-8"))
            fmt, n, check = head["format"], int(head["files"]), head["check"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"unreadable header ({exc})") from None
        if fmt != FORMAT:
            raise IndexFileError(f"written for format {fmt}, not {FORMAT}")
        body = data[HEAD + head_len :]
        if _digest(body) != check or len(body) < n * RECORD.itemsize:
            raise IndexFileError("its body fails its checksum")
        records = np.frombuffer(body, RECORD, count=n)
        identities, keys = records["identity"].tobytes(), records["key"].tobytes()
        files = {
            identities[16 * i : 16 * i + 16]: Known(keys[16 * i : 16 * i + 16], int(chars), int(end))
            for i, (chars, end) in enumerate(zip(records["chars"].tolist(), records["end"].tolist()))
        }
        try:
            derived = {
                bytes.fromhex(k): [int(x) for x in v] for k, v in json.loads(body[n * RECORD.itemsize :]).items()
            }
        except (ValueError, TypeError, AttributeError) as exc:
            raise IndexFileError(f"unreadable derived entries ({exc})") from None
        return files, derived
