"""Conformance checks every lcplug plugin must pass, whoever wrote it.

`check_plugin(kind, spec, family)` runs each check on a fresh seeded tiny model of `family` (fp32, two
rows of tokens, one left-padded) and returns a `ConformanceReport`; it raises AssertionError naming every
failed check unless told not to. Each check is also a function of its own, which returns a
`CheckResult` or raises AssertionError:

- `check_params`: the plugin and each parameter have help text (what `lcplug plugins` shows), defaults
  pass their own checks, an unknown parameter name raises `lcplug.ParamError`, and validated params
  survive the manifest (JSON, and back to the same params).
- `check_round_trip`: patching again with the same spec (or with the manifest's spec) changes nothing,
  and `unpatch` restores bit-identical logits, weights, buffers and config.
- `check_manifest_round_trip`: `lcplug.save_pretrained` then `lcplug.from_pretrained` gives the same
  manifest spec and the same logits (atol 1e-6).
- `check_reference_parity`, where the kind defines an oracle. Attention: the patched logits equal those
  of the same model with every layer's attention replaced by a dense evaluation of the model's own mask
  AND the layer's `pattern` through `lcplug.attention.reference_attention` (`dense_reference_logits`), in
  eval and in train mode, and each pattern's `key_intervals` cover what its `allows` accepts;
  a layer without a `pattern` is compared against the plugin's `executor="reference"` instead. RoPE:
  `config.rope_parameters` is written with a type transformers computes, and a model transformers
  builds from the patched config with the same weights gives the same logits (atol 1e-6).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..checkpoint import PLUGIN_PARAM_MARKER, from_pretrained, save_pretrained
from ..errors import ParamError
from ..patching import patch, patch_state, unpatch
from ..registry import get_registry
from ..spec import parse_plugin_spec
from .models import logits, padded_batch, tiny_model

if TYPE_CHECKING:
    from ..attention.pattern import Pattern

# lcplug.attention and lcplug.rope import transformers: they are imported where used, so that the pytest
# plugin, which imports this package in every session, stays cheap.

CHECKS = ("params", "round_trip", "manifest", "reference")
"""Every check, in the order `check_plugin` runs them (cheapest first)."""

UNKNOWN_PARAM = "lcplug_conformance_no_such_param"
LENGTH, PADDING = 80, 5
"""Longer than one 64-token block, so block executors run several query and key blocks and a partial one."""
PARITY_ATOL = 1e-5
"""fp32 dense reference vs an executor or backend that sums in another order (seen: < 5e-7 on these logits)."""
RELOAD_ATOL = 1e-6
COVERAGE_LENGTH = 128
"""Query positions at which `check_pattern_coverage` compares a pattern's intervals with its predicate."""
MODES = ("eval", "train")
"""Attention parity runs in both: a layer may run differently while training (tiny models have no dropout)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: `status` is pass, fail or skip, `detail` says what was compared or why."""

    name: str
    status: Literal["pass", "fail", "skip"]
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status.upper():4} {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass
class ConformanceReport:
    """Every check run for one plugin spec on one family."""

    plugin: str
    spec: str
    family: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check {name!r} in this report; ran: {', '.join(r.name for r in self.results)}")

    def __str__(self) -> str:
        head = f"{self.plugin} ({self.spec}) on {self.family}: {'conforms' if self.passed else 'FAILS'}"
        return "\n".join([head, *(f"  {r}" for r in self.results)])

    def raise_for_failures(self) -> None:
        """Raise AssertionError listing every failed check (with the passing ones, for context)."""
        if self.failures:
            names = ", ".join(r.name for r in self.failures)
            raise AssertionError(f"conformance check(s) failed: {names}\n{self}")


# ---- the checks ---------------------------------------------------------------------------------------


def check_plugin(
    kind: str,
    spec: str | Mapping[str, Any],
    family: str = "llama",
    *,
    checks: Sequence[str] = CHECKS,
    seed: int = 0,
    layers: Any = None,
    workdir: str | Path | None = None,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Run `checks` for the `kind` plugin `spec` (e.g. "sliding-window:window=4") on a tiny `family` model.

    Every check runs even after one fails, so the report shows all problems at once. `layers` is passed to
    `lcplug.patch`; `workdir` keeps the saved checkpoint of the manifest check (default: a temporary one).
    """
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance check {unknown[0]!r}; valid: {', '.join(CHECKS)}")
    pspec = parse_plugin_spec(kind, spec)
    runs: dict[str, Callable[[], CheckResult]] = {
        "params": lambda: check_params(kind, spec),
        "round_trip": lambda: check_round_trip(kind, spec, family, seed=seed, layers=layers),
        "manifest": lambda: check_manifest_round_trip(kind, spec, family, seed=seed, layers=layers, workdir=workdir),
        "reference": lambda: check_reference_parity(kind, spec, family, seed=seed, layers=layers),
    }
    report = ConformanceReport(plugin=f"{kind}:{pspec.name}", spec=str(pspec), family=family)
    for name in CHECKS:
        if name in checks:
            report.results.append(_run(name, runs[name]))
    if raise_on_failure:
        report.raise_for_failures()
    return report


def check_params(kind: str, spec: str | Mapping[str, Any]) -> CheckResult:
    """Help texts, defaults, unknown names, and the manifest's JSON round trip of the params."""
    pspec = parse_plugin_spec(kind, spec)
    cls = get_registry().get(kind, pspec.name)
    problems = []
    if not cls.summary():
        problems.append(f"{cls.__name__} has no docstring (its help text in `lcplug plugins`)")
    rows = cls.Params.describe()
    problems += [f"parameter {r['name']!r} has no help text" for r in rows if not str(r["help"]).strip()]
    required = []
    for f in cls.Params.fields():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        check = f.metadata.get("check")
        if default is not None and check is not None and not check(default):
            problems.append(f"the default {f.name}={default!r} fails the parameter's own check")
    try:
        json.dumps(rows)
    except TypeError as exc:
        problems.append(f"Params.describe() is not JSON-ready ({exc}); `lcplug plugins --json` needs it")
    try:
        cls.build({k: pspec.params[k] for k in required if k in pspec.params})
    except ParamError as exc:
        problems.append(f"the defaults (plus the spec's required {required}) do not validate: {exc}")
    try:
        cls.build({**pspec.params, UNKNOWN_PARAM: "1"})
    except ParamError:
        rejected = True
    except Exception as exc:
        rejected = True
        problems.append(f"an unknown parameter raised {type(exc).__name__}, not lcplug.ParamError: {exc}")
    else:
        rejected = False
    if not rejected:
        problems.append(f"an unknown parameter {UNKNOWN_PARAM!r} was accepted; it must raise lcplug.ParamError")
    params = cls.build(pspec.params).params
    recorded = json.loads(json.dumps(params.to_dict()))
    if cls.build(recorded).params != params:
        problems.append(f"params {params} do not survive the manifest: to_dict() gives {recorded}")
    _require(not problems, "; ".join(problems))
    return CheckResult("params", "pass", f"{len(rows)} parameter(s) documented and validated")


def check_round_trip(
    kind: str, spec: str | Mapping[str, Any], family: str = "llama", *, seed: int = 0, layers: Any = None
) -> CheckResult:
    """Re-patching is a no-op; `unpatch` restores logits, weights, buffers and config bit for bit."""
    from ..attention import SUBMODULE

    model = tiny_model(family, seed=seed)
    ids, mask = sample_batch(model, seed)
    before_logits, before_tensors, before_config = logits(model, ids, mask), _tensors(model), _config(model)
    patch(model, **{kind: spec}, layers=layers)
    state = patch_state(model)
    _require(state is not None, "lcplug.patch recorded no patch state on the model")
    installed = _tensors(model)
    patched = logits(model, ids, mask)
    # transformers' own length-dependent rope types (dynamic, longrope) swap `inv_freq` during a forward
    written = [n for n in _changed_tensors(installed, _tensors(model)) if not _rope_swaps_it(model, n)]
    _require(not written, f"a forward pass of the patched model wrote to the model's weights/buffers: {written[:5]}")
    modules = {name: m for name, m in model.named_modules() if name}
    for again in ({kind: spec, "layers": layers}, dict(state.manifest["spec"])):
        _require(patch(model, again) is model, "lcplug.patch returned another object than the model")
        _require(
            patch_state(model) is state and {n: m for n, m in model.named_modules() if n} == modules,
            f"patching again with {again} re-applied the patch; the same spec must be a no-op",
        )
        _require(torch.equal(logits(model, ids, mask), patched), f"logits changed after patching again with {again}")
    unpatch(model)
    left = [name for name, _ in model.named_modules() if name.endswith(SUBMODULE) or ".lcplug_" in name]
    _require(not left, f"unpatch left modules behind: {left[:3]}")
    changed = _changed_tensors(before_tensors, _tensors(model))
    _require(not changed, f"unpatch did not restore weights/buffers bit for bit: {changed[:5]}")
    after_config = _config(model)
    diff = sorted(k for k in before_config.keys() | after_config.keys() if before_config.get(k) != after_config.get(k))
    _require(not diff, f"unpatch did not restore the config: {diff}")
    after = logits(model, ids, mask)
    _require(
        torch.equal(after, before_logits),
        f"logits after unpatch differ from before patching (max abs diff {_maxdiff(after, before_logits):.3g})",
    )
    return CheckResult("round_trip", "pass", "re-patch is a no-op; unpatch is bit-identical")


def check_manifest_round_trip(
    kind: str,
    spec: str | Mapping[str, Any],
    family: str = "llama",
    *,
    seed: int = 0,
    layers: Any = None,
    workdir: str | Path | None = None,
    atol: float = RELOAD_ATOL,
) -> CheckResult:
    """`lcplug.save_pretrained` + `lcplug.from_pretrained` reload the same manifest spec and logits."""
    model = tiny_model(family, seed=seed)
    native_impl = model.config._attn_implementation
    ids, mask = sample_batch(model, seed)
    patch(model, **{kind: spec}, layers=layers)
    patched, manifest = logits(model, ids, mask), patch_state(model).manifest
    with _directory(workdir, f"{kind}-{parse_plugin_spec(kind, spec).name}-{family}-") as directory:
        save_pretrained(model, directory)
        reloaded = from_pretrained(directory, attn_implementation=native_impl)
    reloaded_state = patch_state(reloaded)
    _require(reloaded_state is not None, "lcplug.from_pretrained returned an unpatched model")
    reloaded_manifest = reloaded_state.manifest
    _require(
        reloaded_manifest["spec"] == manifest["spec"],
        f"reloaded manifest spec {reloaded_manifest['spec']} differs from the saved {manifest['spec']}",
    )
    _require(
        reloaded_manifest["plugins"] == manifest["plugins"],
        f"reloaded manifest plugins {reloaded_manifest['plugins']} differ from the saved {manifest['plugins']}",
    )
    _require_close(logits(reloaded, ids, mask), patched, mask, atol, "reloaded logits differ from the patched model")
    return CheckResult("manifest", "pass", f"same spec and logits after save/reload (atol {atol:g})")


def check_reference_parity(
    kind: str,
    spec: str | Mapping[str, Any],
    family: str = "llama",
    *,
    seed: int = 0,
    layers: Any = None,
    atol: float | None = None,
) -> CheckResult:
    """The patched model against the kind's oracle (attention: dense masked reference; rope: transformers)."""
    if kind == "attention":
        return _attention_parity(spec, family, seed, layers, PARITY_ATOL if atol is None else atol)
    if kind == "rope":
        return _rope_parity(spec, family, seed, layers, RELOAD_ATOL if atol is None else atol)
    return CheckResult("reference", "skip", f"lcplug defines no reference for {kind} plugins")


def _attention_parity(spec: Any, family: str, seed: int, layers: Any, atol: float) -> CheckResult:
    """Eval and train mode both: sparse attention is trained with (LongLoRA, DSA warm-up) and served with."""
    model = tiny_model(family, seed=seed)
    ids, mask = sample_batch(model, seed)
    patch(model, attention=spec, layers=layers)
    for mode in MODES:
        model.train(mode == "train")
        patched = logits(model, ids, mask)
        try:
            reference = dense_reference_logits(model, ids, mask)
        except NoPatternError as exc:
            return _executor_parity(spec, family, seed, layers, atol, reason=str(exc))
        _require_close(patched, reference, mask, atol, f"{mode} mode: patched logits differ from the dense reference")
    patterns = {p.key(): p for p in _layer_patterns(model)}
    for pattern in patterns.values():
        check_pattern_coverage(pattern)
    return CheckResult(
        "reference",
        "pass",
        f"matches the dense reference of each layer's pattern in {' and '.join(MODES)} mode (atol {atol:g}); "
        f"key_intervals cover allows() for {len(patterns)} pattern(s)",
    )


def check_pattern_coverage(
    pattern: Pattern, length: int = COVERAGE_LENGTH, spans: Sequence[int] = (0, 5, 16, 63)
) -> None:
    """A pattern's two views agree: `key_intervals` covers every causal key `allows` accepts.

    Block executors read only the key blocks the intervals name, so a key the predicate accepts outside
    them would be dropped silently. Checked for query ranges [q, q + span] at positions 0..`length`-1,
    per head group. Over-covering is allowed (the predicate trims it).
    """
    q_lo = torch.arange(length)
    n = length + max(spans) + 1
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]
    for group in range(pattern.head_groups):
        head_group = None if pattern.head_groups == 1 else torch.tensor(group)
        accepts = pattern.allows(pos[:, None], pos[None, :], head_group) & causal  # (query, key)
        for span in spans:
            q_hi = q_lo + span
            covered = torch.zeros(length, n, dtype=torch.bool)
            for lo, hi in pattern.key_intervals(q_lo, q_hi, group):
                covered |= (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
            window = (pos[None, :] >= q_lo[:, None]) & (pos[None, :] <= q_hi[:, None])  # (range, query)
            needed = (window.float() @ accepts.float()) > 0  # (range, key)
            missed = (needed & ~covered).nonzero()
            if len(missed):
                i, k = (int(v) for v in missed[0])
                raise AssertionError(
                    f"{pattern.describe()}: key_intervals({i}, {i + span}) misses key position {k}, which allows() "
                    f"accepts for a query in [{i}, {i + span}] (head group {group}); block executors would drop it"
                )


def _executor_parity(spec: Any, family: str, seed: int, layers: Any, atol: float, reason: str) -> CheckResult:
    """For layers without a static `pattern` (e.g. content-dependent ones): the plugin's own reference executor."""
    pspec = parse_plugin_spec("attention", spec)
    if "executor" not in {f.name for f in get_registry().get("attention", pspec.name).Params.fields()}:
        return CheckResult("reference", "skip", f"{reason}, and the plugin has no `executor` parameter")
    reference_spec = {"name": pspec.name, **pspec.params, "executor": "reference"}
    models = [patch(tiny_model(family, seed=seed), attention=s, layers=layers) for s in (spec, reference_spec)]
    ids, mask = sample_batch(models[0], seed)
    for mode in MODES:
        chosen, reference = (logits(m.train(mode == "train"), ids, mask) for m in models)
        _require_close(chosen, reference, mask, atol, f'{mode} mode: logits differ from executor="reference"')
    return CheckResult("reference", "pass", f'{reason}; matches executor="reference" in both modes (atol {atol:g})')


def _rope_swaps_it(model: nn.Module, name: str) -> bool:
    """True for a rotary `inv_freq` buffer that transformers itself updates per length (dynamic, longrope)."""
    params = model.config.get_text_config().rope_parameters or {}
    slots = params.values() if "rope_type" not in params else [params]
    dynamic = any(isinstance(p, dict) and p.get("rope_type") in ("dynamic", "longrope") for p in slots)
    return dynamic and name.endswith("inv_freq")


def _rope_parity(spec: Any, family: str, seed: int, layers: Any, atol: float) -> CheckResult:
    from transformers import AutoModelForCausalLM

    from ..rope import STANDARD_TYPES, per_layer_type

    model = tiny_model(family, seed=seed)
    native_impl = model.config._attn_implementation
    base = copy.deepcopy(model.config.get_text_config().rope_parameters)
    ids, mask = sample_batch(model, seed)
    patch(model, rope=spec, layers=layers)
    if any(hasattr(m, "lcplug_attention") for m in model.modules()):
        return CheckResult(
            "reference",
            "skip",
            "the plugin remaps positions inside attention (e.g. SelfExtend), which no transformers rope type "
            "expresses; compare it with an independent reference in its own tests",
        )
    written = model.config.get_text_config().rope_parameters
    _require(written != base, f"config.rope_parameters was not written (still {base})")
    slots = written.values() if per_layer_type(written) else [written]
    types = {p.get("rope_type", "default") for p in slots if p is not None}
    _require(
        types <= set(STANDARD_TYPES),
        f"config.rope_parameters has rope_type(s) {sorted(types - set(STANDARD_TYPES))} that transformers does not "
        f"compute; valid: {', '.join(STANDARD_TYPES)}",
    )
    # what a plain transformers install (or a serving engine) reads back from config.json, validation included
    saved = {k: v for k, v in model.config.to_dict().items() if k != "lcplug"}
    config = type(model.config).from_dict(saved)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation=native_impl, dtype=torch.float32).eval()
    weights = {k: v for k, v in model.state_dict().items() if PLUGIN_PARAM_MARKER not in k}
    plain.load_state_dict(weights, strict=True)
    _require_close(
        logits(model, ids, mask),
        logits(plain, ids, mask),
        mask,
        atol,
        "patched logits differ from transformers' own model built from the patched config",
    )
    return CheckResult("reference", "pass", f"rope_type {sorted(types)} matches transformers' model (atol {atol:g})")


# ---- the dense attention reference ---------------------------------------------------------------------


class NoPatternError(LookupError):
    """A patched layer has no static `pattern` (and is not the model's own attention), so no dense reference."""


class DenseReferenceAttention(nn.Module):
    """Stands in for one layer's `lcplug_attention`: the model's own mask AND `pattern`, evaluated densely."""

    def __init__(self, pattern: Pattern, positions: torch.Tensor, sink_logit: torch.Tensor | None = None):
        super().__init__()
        self.pattern = pattern
        self.positions = positions
        self.sink_logit = sink_logit

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling: float | None = None, **kwargs: Any):
        from ..attention import reference_attention
        from ..attention.layer import dense_allowed

        if query.shape[-2] != self.positions.shape[-1] or key.shape[-2] != self.positions.shape[-1]:
            raise ValueError("the dense reference runs a whole sequence at once (no cache, no decode steps)")
        pos = self.positions.to(query.device)
        groups, heads = self.pattern.head_groups, query.shape[1]
        head_group = None if groups == 1 else (torch.arange(heads, device=query.device) // (heads // groups))
        rule = self.pattern.allows(
            pos[:, None, :, None], pos[:, None, None], None if head_group is None else head_group.view(1, -1, 1, 1)
        )
        allowed = dense_allowed(mask, query, key, module) & rule
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return reference_attention(
            query, key, value, allowed, scaling, softcap=kwargs.get("softcap"), sink_logit=self.sink_logit
        )


def dense_reference_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of an attention-patched `model` with each layer's attention evaluated densely.

    Each layer's `lcplug_attention` is swapped, for this one forward, for `DenseReferenceAttention` on the
    layer's own `pattern` (the model's own attention, `NativeAttention`, counts as the all-keys pattern)
    and its `sink_logit`, if any. Pattern positions count from each row's first real token (left padding),
    as lcplug's executors count them. Raises NoPatternError if a layer exposes no pattern. The pattern is
    read as the layer exposes it now: a layer that computes differently in train and eval mode must expose
    the pattern of its current mode (the model's own `Pattern()` where it defers to native attention).
    """
    from ..attention import SUBMODULE, NativeAttention, Pattern

    state = patch_state(model)
    modules = state.adapter.attention_modules(model) if state is not None else {}
    if not any(SUBMODULE in m._modules for m in modules.values()):
        raise ValueError("the model has no lcplug attention layers; patch it with an attention plugin first")
    positions = _positions(input_ids, attention_mask)
    references = {}
    for idx, module in modules.items():
        layer = module._modules[SUBMODULE]
        pattern = getattr(layer, "pattern", None)
        if pattern is None and isinstance(layer, NativeAttention):
            pattern = Pattern()
        if not isinstance(pattern, Pattern):
            raise NoPatternError(f"layer {idx}'s {type(layer).__name__} exposes no lcplug.attention.Pattern `pattern`")
        references[idx] = DenseReferenceAttention(pattern, positions, getattr(layer, "sink_logit", None))
    with _swapped(modules, SUBMODULE, references):
        return logits(model, input_ids, attention_mask)


def _layer_patterns(model: nn.Module) -> list[Pattern]:
    """The patterns of an attention-patched model's layers (those that expose one)."""
    from ..attention import SUBMODULE, Pattern

    state = patch_state(model)
    layers = [m._modules.get(SUBMODULE) for m in state.adapter.attention_modules(model).values()]
    return [p for layer in layers if isinstance(p := getattr(layer, "pattern", None), Pattern)]


@contextlib.contextmanager
def _swapped(modules: dict[int, nn.Module], name: str, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Put `replacements` in place of each module's submodule `name` for the block, then put the originals back."""
    originals = {idx: modules[idx]._modules[name] for idx in replacements}
    try:
        for idx, replacement in replacements.items():
            modules[idx]._modules[name] = replacement
        yield
    finally:
        for idx, original in originals.items():
            modules[idx]._modules[name] = original


# ---- helpers -------------------------------------------------------------------------------------------


def sample_batch(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (2, 80) and their attention mask; row 1 is left-padded by 5, so padding is always covered."""
    config = model.config.get_text_config()
    return padded_batch(LENGTH, seed, vocab=config.vocab_size, pad=PADDING, pad_row=1, pad_id=config.pad_token_id or 0)


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    slots = torch.arange(input_ids.shape[-1])[None].expand(input_ids.shape[0], -1)
    if attention_mask is None:
        return slots
    first = attention_mask.bool().float().argmax(-1)
    return slots - first[:, None].long()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t.detach().clone() for name, t in named}


def _changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    out = [f"{n} (added)" for n in after.keys() - before.keys()]
    out += [f"{n} (removed)" for n in before.keys() - after.keys()]
    out += [n for n in before.keys() & after.keys() if not _same(before[n], after[n])]
    return sorted(out)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _config(model: nn.Module) -> dict[str, Any]:
    return {**model.config.to_dict(), "_attn_implementation": model.config._attn_implementation}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _require_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float, what: str) -> None:
    """Compare logits at real tokens only: what a padded slot computes is backend-defined."""
    _require(actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}")
    real = mask.bool()
    diff = _maxdiff(actual[real], expected[real])
    _require(diff <= atol, f"{what}: max abs diff {diff:.3g} > atol {atol:g}")


def _run(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; an AssertionError is its verdict, any other exception (the plugin crashed) fails it too."""
    try:
        return check()
    except AssertionError as exc:
        return CheckResult(name, "fail", str(exc))
    except Exception as exc:
        return CheckResult(name, "fail", f"raised {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _directory(workdir: str | Path | None, prefix: str) -> Iterator[Path]:
    """A fresh directory under `workdir` (kept, for inspection), or a temporary one (removed)."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


@dataclass
class Checker:
    """`check_plugin` with a work directory bound: what the pytest plugin's `conformance` fixture returns.

    `conformance("attention", "chunked-local:chunk=8", "qwen3")` runs every check and returns the report,
    raising AssertionError on any failure; keyword arguments go to `check_plugin`.
    """

    workdir: Path | None = None

    def __call__(
        self, kind: str, spec: str | Mapping[str, Any], family: str = "llama", **kwargs: Any
    ) -> ConformanceReport:
        return check_plugin(kind, spec, family, workdir=self.workdir, **kwargs)
