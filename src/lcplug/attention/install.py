"""Install an attention plugin on one model instance.

Every attention module gets an `lcplug_attention` submodule: the plugin's module on the selected
layers, `NativeAttention` on the rest. Then only this model is switched to the dispatcher with the
public `set_attn_implementation`. All steps go through the transaction, so a failure leaves nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError
from .dispatch import DISPATCHER_NAME, SUBMODULE, ensure_registered
from .layer import NativeAttention

if TYPE_CHECKING:
    from ..patching import PatchContext
    from ..plugin import AttentionPlugin


def install_attention(plugin: AttentionPlugin, ctx: PatchContext) -> None:
    ensure_registered()
    model, adapter, txn = ctx.model, ctx.adapter, ctx.txn
    native_impl = model.config._attn_implementation
    if native_impl == DISPATCHER_NAME:
        raise UnsupportedModelError("model already runs lcplug's attention dispatcher; unpatch it first")
    modules = adapter.attention_modules(model)
    selected = set(ctx.layers)
    for idx, module in sorted(modules.items()):
        native_fn = adapter.native_attention(module, native_impl)
        if idx in selected:
            layer = plugin.layer_attention(idx, module, adapter, native_fn=native_fn, native_impl=native_impl)
        else:
            layer = NativeAttention(native_fn, native_impl)
        layer.to(device=_device_of(module))
        layer.train(module.training)  # a new submodule must follow the model's current train/eval mode
        txn.add_module(module, SUBMODULE, layer)
    txn.call(
        lambda: model.set_attn_implementation(DISPATCHER_NAME),
        lambda: model.set_attn_implementation(native_impl),
    )
    if model.config._attn_implementation != DISPATCHER_NAME:
        raise UnsupportedModelError(
            f"{type(model).__name__} did not accept attn_implementation={DISPATCHER_NAME!r}: its attention does not "
            "go through transformers' AttentionInterface, so it needs a family adapter"
        )


def _device_of(module):
    for p in module.parameters():
        return p.device
    return "cpu"
