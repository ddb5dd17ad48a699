"""The registry: entry-point loading, origins, duplicates, listing."""

from __future__ import annotations

import pytest

import lcplug
from lcplug.errors import DuplicatePluginError, LcplugError
from lcplug.hookspecs import hookimpl
from lcplug.registry import Registry


def test_first_party_plugins_come_through_entry_points():
    rows = {(r["kind"], r["name"]): r for r in lcplug.list_plugins()}
    for key in [
        ("attention", "full"),
        ("attention", "sliding-window"),
        ("rope", "linear"),
        ("rope", "yarn"),
        ("adapter", "generic"),
    ]:
        assert key in rows
        assert rows[key]["origin"] == "lcplug" and rows[key]["version"] == lcplug.__version__
    window = {p["name"]: p for p in rows[("attention", "sliding-window")]["params"]}["window"]
    assert window["default"] == 1024 and window["type"] == "int" and window["help"]


def test_kind_filter_and_unknown_kind():
    assert {r["kind"] for r in lcplug.list_plugins("rope")} == {"rope"}
    with pytest.raises(LcplugError, match="unknown plugin kind 'attn'; did you mean 'attention'"):
        lcplug.get_registry().get("attn", "full")


def make_module(cls):
    class Module:
        @hookimpl
        def lcplug_register(self, register):
            register(cls)

    return Module()


def test_duplicate_name_names_both_distributions():
    class Clash(lcplug.AttentionPlugin):
        """A second 'full'."""

        name = "full"

    registry = Registry()
    with pytest.raises(DuplicatePluginError, match=r"lcplug 0\.1\.0 and clash-dist 9\.9"):
        registry.register_module(make_module(Clash), distribution="clash-dist", version="9.9")


def test_register_rejects_non_plugins():
    class NotAPlugin:
        pass

    class NoName(lcplug.AttentionPlugin):
        pass

    registry = Registry()
    with pytest.raises(LcplugError, match="takes a Plugin or Adapter subclass"):
        registry.register_module(make_module(NotAPlugin), distribution="x")
    with pytest.raises(LcplugError, match="has no name"):
        registry.register_module(make_module(NoName), distribution="y")


def test_hand_registered_plugin_records_origin():
    class Local(lcplug.AttentionPlugin):
        """Local test plugin."""

        name = "local-test"

    registry = lcplug.get_registry()
    module = make_module(Local)
    registry.register_module(module, distribution="my-notebook", version="0.0.1")
    try:
        cls = registry.get("attention", "local-test")
        assert str(cls.origin) == "my-notebook 0.0.1"
        assert cls.summary() == "Local test plugin."
    finally:
        registry.unregister("attention", "local-test")
        registry.pm.unregister(module)
