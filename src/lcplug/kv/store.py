"""Lower tiers: where sealed KV blocks go when they leave the device.

A sealed block never changes, so a lower tier is write-once per block: spilling a block that already has
a lower copy only drops its hot copy, and a read never has to write back. Each store serves one layer.

- `HostStore`: CPU memory (pinned when CUDA exists, so copies to the GPU can run asynchronously).
- `DiskStore`: one append-only file per layer in a private directory, read through `mmap`; its in-memory
  index maps each block to (offset, sizes, CRC-32), and every read is verified against the checksum.

Both count `bytes_read` (lower-tier bytes a gather read) and `bytes_stored` (bytes the tier holds), which
is what a quantized tier (`quant.QuantizedStore`, wrapping either) saves on.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import KVCacheError

if TYPE_CHECKING:
    from .quant import QuantizedStore

KV = tuple[torch.Tensor, torch.Tensor]


class HostStore:
    """Blocks in host memory."""

    def __init__(self) -> None:
        self.blocks: dict[int, KV] = {}
        self._pin = torch.cuda.is_available()
        self.bytes_read = 0
        self.bytes_stored = 0

    def __contains__(self, block: int) -> bool:
        return block in self.blocks

    def put(self, block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.blocks[block] = (self._host_copy(keys), self._host_copy(values))
        self.bytes_stored += _nbytes(keys) + _nbytes(values)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        return out.copy_(t)

    def get_many(self, blocks: list[int], device: torch.device) -> dict[int, KV]:
        out = {}
        for b in blocks:
            k, v = self.blocks[b]
            self.bytes_read += _nbytes(k) + _nbytes(v)
            out[b] = (k.to(device, non_blocking=self._pin), v.to(device, non_blocking=self._pin))
        return out

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes_stored = 0

    def close(self) -> None:
        self.clear()


@dataclass(frozen=True)
class _Entry:
    offset: int
    key_bytes: int
    value_bytes: int
    crc: int
    key_layout: tuple[tuple[int, ...], torch.dtype]
    value_layout: tuple[tuple[int, ...], torch.dtype]


class DiskStore:
    """Blocks appended to `<directory>/<name>.kv`, located by an in-memory index, read via mmap and CRC-checked."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.kv"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise KVCacheError(f"kv: cannot create block file {self.path}: {exc.strerror or exc}") from exc
        self.index: dict[int, _Entry] = {}
        self._end = 0
        self._map: mmap.mmap | None = None
        self.bytes_read = 0

    @property
    def bytes_stored(self) -> int:
        return self._end

    def __contains__(self, block: int) -> bool:
        return block in self.index

    def put(self, block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        k, v = host_bytes(keys), host_bytes(values)
        crc = zlib.crc32(v, zlib.crc32(k))
        try:
            for part, offset in ((k, self._end), (v, self._end + len(k))):
                if os.pwrite(self._fd, part, offset) != len(part):
                    raise OSError(28, "short write (disk full?)")
        except OSError as exc:
            raise KVCacheError(
                f"kv: cannot write block {block} to {self.path}: {exc.strerror or exc} (disk full or unwritable?)"
            ) from exc
        self.index[block] = _Entry(self._end, len(k), len(v), crc, _layout(keys), _layout(values))
        self._end += len(k) + len(v)

    def get_many(self, blocks: list[int], device: torch.device) -> dict[int, KV]:
        """Read `blocks`, verifying each one's checksum; a missing or corrupted block raises KVCacheError."""
        size = os.fstat(self._fd).st_size
        out = {}
        for b in blocks:
            entry = self.index.get(b)
            if entry is None:
                raise KVCacheError(f"kv: block {b} is missing from the index of {self.path}")
            end = entry.offset + entry.key_bytes + entry.value_bytes
            if end > size:
                raise KVCacheError(
                    f"kv: block {b} of {self.path} is missing: the file holds {size} bytes, the block ends at {end}"
                )
            view = self._bytes(entry.offset, end)
            crc, flat = zlib.crc32(view), torch.from_numpy(view.copy())
            del view  # release the map's export now: a traceback holding it would keep the map from closing
            if crc != entry.crc:
                raise KVCacheError(f"kv: block {b} of {self.path} is corrupted (checksum mismatch); refusing to use it")
            keys = _from_bytes(flat[: entry.key_bytes], entry.key_layout)
            values = _from_bytes(flat[entry.key_bytes :], entry.value_layout)
            self.bytes_read += end - entry.offset
            out[b] = (keys.to(device), values.to(device))
        return out

    def _bytes(self, start: int, end: int) -> np.ndarray:
        """A read-only view of file bytes [start, end), remapping once the file has grown past the map."""
        if self._map is None or end > len(self._map):
            self._unmap()
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._map, dtype=np.uint8, count=end - start, offset=start)

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def clear(self) -> None:
        self._unmap()
        os.ftruncate(self._fd, 0)
        self.index.clear()
        self._end = 0

    def close(self) -> None:
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of `t` in row-major order, on the host (no copy when it is already a contiguous CPU tensor)."""
    return memoryview(t.detach().to("cpu").contiguous().view(torch.uint8).flatten().numpy())


def _layout(t: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(t.shape), t.dtype


def _from_bytes(flat: torch.Tensor, layout: tuple[tuple[int, ...], torch.dtype]) -> torch.Tensor:
    shape, dtype = layout
    return flat.view(dtype).view(shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def private_directory(parent: str | os.PathLike | None) -> Path:
    """A fresh directory only this user can enter (mode 0700) under `parent` (None: the system temp dir)."""
    if parent is not None and not Path(parent).is_dir():
        raise KVCacheError(f"kv: path {str(parent)!r} is not a directory")
    try:
        directory = Path(tempfile.mkdtemp(prefix="lcplug-kv-", dir=parent))
    except OSError as exc:
        where = parent if parent is not None else tempfile.gettempdir()
        raise KVCacheError(f"kv: cannot create a cache directory in {str(where)!r}: {exc.strerror or exc}") from exc
    os.chmod(directory, 0o700)
    return directory


def release(
    stores: list[HostStore | DiskStore | QuantizedStore],
    directory: Path | None,
    workers: tuple[Any, ...] | list[Any] = (),
) -> None:
    """Stop read-ahead `workers` (anything with `close()`), close every store and remove the private
    directory (a finalizer: it must not reference the cache)."""
    for worker in workers:
        worker.close()
    for store in stores:
        store.close()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
