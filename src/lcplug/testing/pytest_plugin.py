"""pytest plugin for plugin authors (entry point `pytest11: lcplug`): fixtures and a family marker.

It loads in every pytest session of an environment where lcplug is installed, so it imports neither
torch nor transformers itself; fixtures import what they need when a test asks for them.

Fixtures:
- `tiny_model_factory`: `lcplug.testing.tiny_model` (family, seed, ...) -> a seeded fp32 tiny causal LM;
- `lcplug_family`: the model family (a model_type of `lcplug.testing.FAMILIES`) a test instance runs on;
- `conformance`: a `lcplug.testing.Checker` writing its checkpoints under the test's `tmp_path`.

A test that uses `lcplug_family` runs over the families its `@pytest.mark.lcplug_families(...)` marker
names (the marker without arguments means every family), else over those `--lcplug-families` names
(comma-separated, or `all`), else on `llama` only:

    @pytest.mark.lcplug_families("llama", "qwen3", "gemma3_text")
    def test_conforms(conformance, lcplug_family):
        conformance("attention", "my-variant:window=8", lcplug_family)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .conformance import Checker

MARKER = "lcplug_families"
DEFAULT_FAMILY = "llama"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("lcplug").addoption(
        "--lcplug-families",
        default=None,
        help="model families (comma-separated model_types, or 'all') that tests using the lcplug_family fixture "
        f"run over when they carry no {MARKER} marker; default: {DEFAULT_FAMILY}",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*families): run a test that uses the lcplug_family fixture over these model families "
        "(no arguments: every family in lcplug.testing.FAMILIES)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lcplug_family" not in metafunc.fixturenames or _parametrized_by_hand(metafunc):
        return
    families = _families(metafunc)
    metafunc.parametrize("lcplug_family", families, ids=families, indirect=True)


def _parametrized_by_hand(metafunc: pytest.Metafunc) -> bool:
    """A test may parametrize `lcplug_family` itself; pytest rejects parametrizing one name twice."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "lcplug_family" in names:
            return True
    return False


def _families(metafunc: pytest.Metafunc) -> list[str]:
    from .models import FAMILIES

    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is not None:
        families = list(marker.args) or list(FAMILIES)
        where = f"@pytest.mark.{MARKER} of {metafunc.definition.nodeid}"
    else:
        option = metafunc.config.getoption("--lcplug-families") or DEFAULT_FAMILY
        families = list(FAMILIES) if option.strip() == "all" else [f.strip() for f in option.split(",") if f.strip()]
        where = "--lcplug-families"
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise pytest.UsageError(f"{where}: unknown family {unknown[0]!r}; valid: all, {', '.join(FAMILIES)}")
    return families


@pytest.fixture
def lcplug_family(request: pytest.FixtureRequest) -> str:
    """The model family (a model_type of `lcplug.testing.FAMILIES`) this test instance runs on."""
    return getattr(request, "param", DEFAULT_FAMILY)


@pytest.fixture
def tiny_model_factory() -> Callable[..., Any]:
    """`lcplug.testing.tiny_model(family="llama", seed=0, attn_implementation=None, **config_overrides)`."""
    from .models import tiny_model

    return tiny_model


@pytest.fixture
def conformance(tmp_path: Path) -> Checker:
    """The conformance checker: `conformance(kind, spec, family)` runs every check and returns the report."""
    from .conformance import Checker

    return Checker(workdir=tmp_path)
