"""Conformance kit for plugin authors: tiny models of every family and checks any plugin must pass.

    from lcplug.testing import check_plugin
    check_plugin("attention", "my-variant:window=8", family="qwen3")   # raises AssertionError on failure

The pytest plugin (`lcplug.testing.pytest_plugin`, loaded automatically) adds the fixtures
`tiny_model_factory`, `lcplug_family` and `conformance`, and the `lcplug_families` marker.
"""

from .conformance import (
    CHECKS,
    Checker,
    CheckResult,
    ConformanceReport,
    DenseReferenceAttention,
    NoPatternError,
    check_manifest_round_trip,
    check_params,
    check_pattern_coverage,
    check_plugin,
    check_reference_parity,
    check_round_trip,
    dense_reference_logits,
    sample_batch,
)
from .models import (
    FAMILIES,
    decode_prefill_gap,
    descend,
    logits,
    padded_batch,
    perturb_added,
    tiny_config,
    tiny_model,
)

__all__ = [
    "CHECKS",
    "FAMILIES",
    "CheckResult",
    "Checker",
    "ConformanceReport",
    "DenseReferenceAttention",
    "NoPatternError",
    "check_manifest_round_trip",
    "check_params",
    "check_pattern_coverage",
    "check_plugin",
    "check_reference_parity",
    "check_round_trip",
    "decode_prefill_gap",
    "dense_reference_logits",
    "descend",
    "logits",
    "padded_batch",
    "perturb_added",
    "sample_batch",
    "tiny_config",
    "tiny_model",
]
