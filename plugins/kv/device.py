"""`device`: every KV block stays on the compute device (block-granular; pattern layers keep only their window)."""

from __future__ import annotations

from lcplug.hookspecs import hookimpl
from lcplug.kv import TieredKVPlugin
from lcplug.kv.params import DeviceTierParams


class DeviceTier(TieredKVPlugin):
    """Keep the whole KV cache on the device, in blocks.

    Nothing spills; a layer patched with a static attention pattern (sliding window, streaming blocks)
    drops the blocks its pattern can no longer read, so its cache stops growing with the context.
    """

    name = "device"
    tier = "device"
    Params = DeviceTierParams


@hookimpl
def lcplug_register(register):
    register(DeviceTier)
