"""Spec parsing, typed params and layer selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from lcplug.errors import ParamError, SpecError
from lcplug.layers import select_layers
from lcplug.params import Params, param
from lcplug.spec import PatchSpec, parse_plugin_spec


@pytest.mark.parametrize(
    ("raw", "name", "params"),
    [
        ("full", "full", {}),
        (
            "yarn:factor=8,original_max_position_embeddings=4096",
            "yarn",
            {"factor": "8", "original_max_position_embeddings": "4096"},
        ),
        (
            "longrope:short_factor=1 1.5 2,long_factor=2 3 4",
            "longrope",
            {"short_factor": "1 1.5 2", "long_factor": "2 3 4"},
        ),
        (" disk : path=/tmp/a,b , hot-tokens = 512", "disk", {"path": "/tmp/a,b", "hot_tokens": "512"}),
        ({"name": "yarn", "factor": 8}, "yarn", {"factor": 8}),
        ({"yarn": {"factor": 8}}, "yarn", {"factor": 8}),
        ({"name": "yarn", "params": {"factor": 8}}, "yarn", {"factor": 8}),
    ],
)
def test_parse_plugin_spec(raw, name, params):
    spec = parse_plugin_spec("x", raw)
    assert (spec.name, spec.params) == (name, params)


@pytest.mark.parametrize("raw", ["", ":a=1", "yarn:=3", "yarn:factor=1,factor=2", 42, {"factor": 8, "beta": 1}])
def test_parse_plugin_spec_errors(raw):
    with pytest.raises(SpecError):
        parse_plugin_spec("rope", raw)


def test_patch_spec_merges_kwargs_over_mapping():
    spec = PatchSpec.build({"rope": "linear:factor=2", "layers": "0-1"}, attention="full")
    assert set(spec.plugins) == {"rope", "attention"} and spec.layers == "0-1"
    assert spec.to_dict() == {"attention": {"name": "full"}, "rope": {"name": "linear", "factor": "2"}, "layers": "0-1"}


@dataclass(frozen=True)
class DemoParams(Params):
    n: int = param(3, "a count", check=lambda v: v > 0, valid="an integer > 0")
    x: float = param(1.0, "a scale")
    flag: bool = param(False, "a switch")
    mode: Literal["a", "b"] = param("a", "a choice")
    maybe: int | None = param(None, "optional")
    values: list[float] = param([1.0], "a list")


def test_params_coercion_and_defaults():
    p = DemoParams.from_dict({"n": "7", "x": "2.5", "flag": "yes", "mode": "b", "maybe": "none", "values": "1 2 3"})
    assert (p.n, p.x, p.flag, p.mode, p.maybe, p.values) == (7, 2.5, True, "b", None, [1.0, 2.0, 3.0])
    assert DemoParams.from_dict({}).to_dict() == {
        "n": 3,
        "x": 1.0,
        "flag": False,
        "mode": "a",
        "maybe": None,
        "values": [1.0],
    }
    assert [d["name"] for d in DemoParams.describe()] == ["n", "x", "flag", "mode", "maybe", "values"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"n": 0}, "parameter 'n' got 0; valid: an integer > 0"),
        ({"n": 1.5}, "parameter 'n' got 1.5; expected int"),
        ({"n": True}, "parameter 'n' got True; expected int"),
        ({"flag": "maybe"}, "parameter 'flag' got 'maybe'; expected bool"),
        ({"mode": "c"}, "parameter 'mode' got 'c'; expected 'a' | 'b'"),
        ({"nn": 1}, "unknown parameter 'nn'; did you mean 'n'"),
    ],
)
def test_params_errors(raw, needle):
    with pytest.raises(ParamError, match=needle):
        DemoParams.from_dict(raw, owner="demo")


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        ("all", list(range(12))),
        ([0, 3, 3, -1], [0, 3, 11]),
        ("0-2,5,-2--1", [0, 1, 2, 5, 10, 11]),
        ("every:4", [0, 4, 8]),
        ("every:4+3", [3, 7, 11]),
        ("5:1", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]),
        ("3:1", [0, 1, 2, 4, 5, 6, 8, 9, 10]),
        (7, [7]),
    ],
)
def test_select_layers(selection, expected):
    assert select_layers(selection, 12) == expected


@pytest.mark.parametrize("selection", ["12", [0, 12], "every:0", "every:2+2", "3-1", "x", "0:0", True, [1.5]])
def test_select_layers_errors(selection):
    with pytest.raises(SpecError):
        select_layers(selection, 12)
