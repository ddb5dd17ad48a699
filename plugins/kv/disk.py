"""`disk`: dense layers spill KV blocks beyond `hot_tokens` to memory-mapped, checksummed files."""

from __future__ import annotations

from lcplug.hookspecs import hookimpl
from lcplug.kv import TieredKVPlugin
from lcplug.kv.params import DiskTierParams


class DiskTier(TieredKVPlugin):
    """Keep `hot_tokens` per dense layer on the device, the colder blocks in files on disk.

    Blocks go to one append-only file per layer in a private (0700) directory under `path`, are read back
    through mmap and verified against a per-block CRC-32: a missing or corrupted block raises
    `KVCacheError`, never returns other values. The directory is removed when the cache closes, also on
    an exception. Pattern layers keep only their window, on the device.
    """

    name = "disk"
    tier = "disk"
    Params = DiskTierParams


@hookimpl
def lcplug_register(register):
    register(DiskTier)
