"""The conformance kit passes lcplug's own plugins and catches broken ones.

Broken plugins are registered by hand (`register_module`), each wrong in one way a real plugin could be:
a layer that writes to a model weight, a layer that does not do what its `pattern` says, a pattern whose
`key_intervals` miss keys its predicate accepts, and parameters without help text or with a default that
fails its own check. The kit must fail exactly the check each one breaks.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch

import lcplug
from lcplug.attention import NativeAttention, PatternAttention, SlidingWindowPattern, reference_attention
from lcplug.attention.layer import LayerAttention, dense_allowed
from lcplug.testing import CHECKS, check_pattern_coverage, check_plugin
from lcplug.testing import FAMILIES as FAMILIES_ALL

pytest_plugins = ["pytester"]

FAMILIES = ("llama", "gemma3_text", "gpt_neox")
"""Plain GQA; own sliding layers + per-layer-type RoPE; no GQA, partial rotary and a parallel residual."""

FIRST_PARTY = [
    ("attention", "full"),
    ("attention", "sliding-window:window=4,sinks=1"),
    ("rope", "linear:factor=2"),
    ("rope", "yarn:factor=4"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one torch thread; more only contend for the cores (5x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("kind", "spec"), FIRST_PARTY, ids=[s for _, s in FIRST_PARTY])
def test_first_party_plugins_conform(kind, spec, family, tmp_path):
    report = check_plugin(kind, spec, family, workdir=tmp_path)
    assert [(r.name, r.status) for r in report.results] == [(c, "pass") for c in CHECKS], report
    assert list(tmp_path.iterdir()), "the manifest check saves its checkpoint under workdir"


def test_a_layer_subset_and_learnable_sinks_conform():
    check_plugin("attention", "sliding-window:window=4,sinks=2,learnable_sink=true,sink_init=0.5", layers="0,2")


@pytest.mark.lcplug_families("llama", "qwen2")
def test_pytest_plugin_fixtures(conformance, lcplug_family, tiny_model_factory, request):
    """The fixtures of lcplug's pytest11 plugin: the marker parametrizes the family, the checker writes to tmp."""
    assert lcplug_family in ("llama", "qwen2")
    assert request.node.callspec.params["lcplug_family"] == lcplug_family
    assert tiny_model_factory(lcplug_family).config.model_type == lcplug_family
    report = conformance("attention", "sliding-window:window=8", lcplug_family, checks=("round_trip", "reference"))
    assert report.passed and [r.name for r in report.results] == ["round_trip", "reference"]
    assert conformance.workdir is not None and conformance.workdir.is_dir()


def test_family_marker_and_option_select_families(pytester):
    """The marker's families win, no marker arguments mean every family, the option sets the default."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lcplug_families("qwen2", "olmo2")
        def test_marked(lcplug_family): pass

        @pytest.mark.lcplug_families
        def test_every(lcplug_family): pass

        def test_default(lcplug_family): pass

        @pytest.mark.parametrize("lcplug_family", ["phi3"])
        def test_by_hand(lcplug_family): pass
        """
    )

    def collected(*args: str) -> list[str]:
        result = pytester.runpytest("--collect-only", "-q", *args)
        return [line.split("::")[1] for line in result.outlines if "::" in line]

    ids = collected()
    assert ids[:2] == ["test_marked[qwen2]", "test_marked[olmo2]"]
    assert ids[2:-2] == [f"test_every[{family}]" for family in FAMILIES_ALL]
    assert ids[-2:] == ["test_default[llama]", "test_by_hand[phi3]"]
    assert [i for i in collected("--lcplug-families=gpt_neox,qwen3") if i.startswith("test_default")] == [
        "test_default[gpt_neox]",
        "test_default[qwen3]",
    ]
    assert len([i for i in collected("--lcplug-families=all") if i.startswith("test_default")]) == len(FAMILIES_ALL)
    result = pytester.runpytest("--collect-only", "-q", "--lcplug-families=llama,nope")
    assert "--lcplug-families: unknown family 'nope'" in result.stdout.str() + result.stderr.str()


# ---- broken plugins ------------------------------------------------------------------------------------


class WeightWritingLayer(NativeAttention):
    """Runs the model's own attention, but nudges a weight of the attention module on every call."""

    def forward(self, module, query, key, value, mask, **kwargs: Any):
        with torch.no_grad():
            next(module.parameters()).add_(1e-3)
        return super().forward(module, query, key, value, mask, **kwargs)


class WeightWriter(lcplug.AttentionPlugin):
    """Broken on purpose: its layers write to the model's weights, so unpatch cannot restore them."""

    name = "conformance-weight-writer"

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        return WeightWritingLayer(native_fn, native_impl)


class PatternIgnoringLayer(NativeAttention):
    """Claims a sliding window of 4 but runs the model's own full attention."""

    pattern = SlidingWindowPattern(window=4)


class PatternIgnorer(lcplug.AttentionPlugin):
    """Broken on purpose: its layers' `pattern` says one thing, their forward does another."""

    name = "conformance-pattern-ignorer"

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        return PatternIgnoringLayer(native_fn, native_impl)


class LocalOnlyIntervals(SlidingWindowPattern):
    """Accepts the sink keys but names only the local window among the keys a query block needs."""

    def key_intervals(self, q_lo, q_hi, head_group=0):
        return [(q_lo - self.window + 1, q_hi + 1)]


class SinkDropper(lcplug.AttentionPlugin):
    """Broken on purpose: block executors would silently drop the sinks its predicate accepts."""

    name = "conformance-sink-dropper"

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        pattern = LocalOnlyIntervals(window=4, sinks=2)
        return PatternAttention(native_fn, native_impl, pattern, num_heads=adapter.num_heads(attn_module))


@dataclass(frozen=True)
class UndocumentedParams(lcplug.Params):
    window: int = lcplug.param(0, check=lambda v: v >= 1, valid="an integer >= 1")


class Undocumented(lcplug.AttentionPlugin):
    """Broken on purpose: a parameter without help text whose default fails its own check."""

    name = "conformance-undocumented"
    Params = UndocumentedParams

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        return PatternAttention(
            native_fn, native_impl, SlidingWindowPattern(self.params.window), num_heads=adapter.num_heads(attn_module)
        )


class SlotWindowLayer(LayerAttention):
    """A window over cache slots computed inside the layer: no `pattern` for the kit to read."""

    def __init__(self, native_fn, native_impl, window: int):
        super().__init__(native_fn, native_impl)
        self.window = window

    def forward(self, module, query, key, value, mask, *, scaling=None, **kwargs: Any):
        slots = torch.arange(key.shape[-2])
        near = (slots[:, None] - slots[None, :]) < self.window
        allowed = dense_allowed(mask, query, key, module) & near
        return reference_attention(query, key, value, allowed, scaling or query.shape[-1] ** -0.5)


@dataclass(frozen=True)
class OpaqueParams(lcplug.Params):
    window: int = lcplug.param(4, "keys each query sees", check=lambda v: v >= 1, valid="an integer >= 1")
    executor: Literal["auto", "reference"] = lcplug.param("auto", "which executor runs the layer")


class OpaqueWindow(lcplug.AttentionPlugin):
    """A correct plugin whose layers expose no pattern: the kit compares it with executor="reference"."""

    name = "conformance-opaque-window"
    Params = OpaqueParams

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        return SlotWindowLayer(native_fn, native_impl, self.params.window)


@dataclass(frozen=True)
class WindowOnlyParams(lcplug.Params):
    window: int = lcplug.param(4, "keys each query sees", check=lambda v: v >= 1, valid="an integer >= 1")


class OpaqueWithoutExecutor(OpaqueWindow):
    """No pattern and no executor parameter: the kit has no reference for it and says so."""

    name = "conformance-opaque-no-executor"
    Params = WindowOnlyParams


TEST_PLUGINS = (WeightWriter, PatternIgnorer, SinkDropper, Undocumented, OpaqueWindow, OpaqueWithoutExecutor)


@pytest.fixture(scope="module", autouse=True)
def test_plugins():
    """Register the plugins above by hand, as a notebook would, and remove them afterwards."""
    holder = types.ModuleType("lcplug_conformance_test_plugins")

    @lcplug.hookimpl
    def lcplug_register(register):
        for cls in TEST_PLUGINS:
            register(cls)

    holder.lcplug_register = lcplug_register
    registry = lcplug.get_registry()
    registry.register_module(holder, distribution="conformance-tests")
    yield
    for cls in TEST_PLUGINS:
        registry.unregister(cls.kind, cls.name)
    registry.pm.unregister(holder)  # Registry.unregister forgets classes only; free the module's pluggy name too


def statuses(report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def test_a_plugin_that_writes_weights_fails_the_round_trip():
    report = check_plugin("attention", WeightWriter.name, raise_on_failure=False)
    assert statuses(report)["round_trip"] == "fail"
    assert "a forward pass of the patched model wrote to the model's weights" in report["round_trip"].detail
    assert statuses(report)["params"] == "pass"


def test_a_layer_that_ignores_its_pattern_fails_the_reference():
    report = check_plugin("attention", PatternIgnorer.name, "qwen3", raise_on_failure=False)
    assert statuses(report) == {"params": "pass", "round_trip": "pass", "manifest": "pass", "reference": "fail"}
    assert "eval mode: patched logits differ from the dense reference" in report["reference"].detail
    with pytest.raises(AssertionError, match=r"conformance check\(s\) failed: reference"):
        report.raise_for_failures()


def test_key_intervals_that_miss_accepted_keys_fail_the_reference():
    report = check_plugin("attention", SinkDropper.name, raise_on_failure=False)
    assert statuses(report)["reference"] == "fail"
    assert "misses key position 0" in report["reference"].detail
    with pytest.raises(AssertionError, match="block executors would drop it"):
        check_pattern_coverage(LocalOnlyIntervals(window=4, sinks=2))
    check_pattern_coverage(SlidingWindowPattern(window=4, sinks=2))


def test_undocumented_params_and_a_bad_default_fail_the_param_check():
    report = check_plugin("attention", f"{Undocumented.name}:window=4", raise_on_failure=False)
    assert statuses(report)["params"] == "fail"
    detail = report["params"].detail
    assert "parameter 'window' has no help text" in detail
    assert "the default window=0 fails the parameter's own check" in detail
    assert statuses(report)["round_trip"] == "pass"


def test_check_plugin_raises_naming_every_failed_check():
    with pytest.raises(AssertionError) as info:
        check_plugin("attention", WeightWriter.name, checks=("params", "round_trip"))
    assert "failed: round_trip" in str(info.value) and "PASS params" in str(info.value)


def test_layers_without_a_pattern_are_compared_with_the_reference_executor():
    report = check_plugin("attention", OpaqueWindow.name, checks=("reference",))
    assert 'matches executor="reference"' in report["reference"].detail
    skipped = check_plugin("attention", OpaqueWithoutExecutor.name, checks=("reference",))
    assert skipped["reference"].status == "skip" and "no `executor` parameter" in skipped["reference"].detail


def test_unknown_check_names_are_refused():
    with pytest.raises(ValueError, match="unknown conformance check 'parity'"):
        check_plugin("attention", "full", checks=("parity",))
