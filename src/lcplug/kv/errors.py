"""The one error the KV tiers raise: a cache that cannot hold or return a block says so, by name."""

from __future__ import annotations

from ..errors import LcplugError


class KVCacheError(LcplugError):
    """A KV block cannot be stored or read back intact (unwritable directory, disk full, missing or corrupted
    block, an operation the tiered cache does not support).

    Raised instead of ever returning keys/values that are not exactly the ones stored: a wrong block
    would silently change the generated tokens.
    """
