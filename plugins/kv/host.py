"""`host`: dense layers spill KV blocks beyond `hot_tokens` to host memory (pinned when CUDA exists)."""

from __future__ import annotations

from lcplug.hookspecs import hookimpl
from lcplug.kv import TieredKVPlugin
from lcplug.kv.params import SpillTierParams


class HostTier(TieredKVPlugin):
    """Keep `hot_tokens` per dense layer on the device, the colder blocks in host memory.

    Sink and most recent blocks stay pinned on the device; the others leave least-recently-used first and
    are copied back for each step that reads them. Pattern layers keep only their window, on the device.
    """

    name = "host"
    tier = "host"
    Params = SpillTierParams


@hookimpl
def lcplug_register(register):
    register(HostTier)
