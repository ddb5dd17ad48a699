"""The retrofit recipe: what to load, how to patch it, and how each stage trains, as one YAML file.

```yaml
name: demo-retrofit                # optional label (default: the file stem)
seed: 0
base: {model: path/or/hub-id, config: null, revision: null, dtype: float32}
tokenizer: null                    # default: base.model's; "bytes"; or a tokenizer directory
patch: {rope: "yarn:factor=4", attention: "dsa:stage=warmup", layers: "0-3"}   # what lcplug.patch takes
data: {...}                        # lcplug.data's section; its seq_len/batch_size are the stages' defaults
stages:
  - name: warmup
    patch: {attention: "dsa:stage=sparse"}    # merged over the spec in force when the stage starts
    train: all                     # all | lora | lora+ | gates | indexer | sinks | latent | memory | compress | shared
    lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    losses: {lm: 1.0}              # lm plus the auxiliary losses the model's plugins offer
    steps: 100                     # exactly one of steps | tokens
    seq_len: 1024
    batch_size: 4                  # per data-parallel rank
    grad_accum: 1
    lr: 1.0e-3
    schedule: {warmup: 10, decay: cosine, min_lr_ratio: 0.1}
    weight_decay: 0.0
    grad_clip: 1.0
    finalize: false
precision: fp32                    # fp32 | bf16 | fp16
gradient_checkpointing: false
cp: {degree: 1, strategy: ring}
eval: {probes: [passkey, ppl], lengths: [1024, 4096], samples: 2, every: 0}
output: {dir: out/demo, checkpoint_every: 50, keep: 2, lora: merge, log: [jsonl, tensorboard]}
publish: {repo_id: null, private: true}
```

Everything that can be checked without a model is checked here, and every error is one `RecipeError` line
naming the field path and what is valid (`stages[1].train: got 'loraa'; valid: ... (did you mean 'lora'?)`),
so a typo fails in a second instead of after the model has loaded. The schema is declared once, as
dataclasses whose fields carry their check; `_parse` walks them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..data.recipe import DataConfig
from ..errors import LcplugError, did_you_mean
from ..params import _coerce, _type_name

T = TypeVar("T")

TrainMode = Literal["all", "lora", "lora+", "gates", "indexer", "sinks", "latent", "memory", "compress", "shared"]
LORA_MODES = ("lora", "lora+")


class RecipeError(LcplugError, ValueError):
    """A recipe that cannot run: one line naming the field path and what is valid."""


def _field(default: Any = MISSING, *, check: Callable[[Any], bool] | None = None, valid: str = "") -> Any:
    """A schema field: its default (lists and dicts copied per instance), a value check and, in words, what is valid."""
    meta = {"check": check, "valid": valid}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls: type) -> Any:
    """A nested section that defaults to its own defaults."""
    return field(default_factory=cls, metadata={"check": None, "valid": ""})


_INT1 = {"check": lambda v: v >= 1, "valid": "an integer >= 1"}
_INT0 = {"check": lambda v: v >= 0, "valid": "an integer >= 0"}


@dataclass
class BaseModel:
    """The checkpoint a retrofit starts from."""

    model: str = _field()
    config: str | None = _field(None)
    revision: str | None = _field(None)
    dtype: Literal["float32", "bfloat16", "float16"] = _field("float32")


@dataclass
class LoraConfig:
    """LoRA adapters of a `train: lora` / `lora+` stage."""

    r: int = _field(8, **_INT1)
    alpha: float = _field(16.0, check=lambda v: v > 0, valid="a number > 0")
    dropout: float = _field(0.0, check=lambda v: 0 <= v < 1, valid="0 <= dropout < 1")
    target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], check=bool, valid="a non-empty list of module names"
    )


@dataclass
class Schedule:
    """Linear warm-up over `warmup` steps, then `decay` to `min_lr_ratio` x lr at the stage's last step."""

    warmup: int = _field(0, **_INT0)
    decay: Literal["cosine", "linear", "constant"] = _field("cosine")
    min_lr_ratio: float = _field(0.1, check=lambda v: 0 <= v <= 1, valid="0 <= min_lr_ratio <= 1")


def _weights(value: dict) -> bool:
    numbers = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(value) and len(numbers) == len(value) and all(math.isfinite(v) and v >= 0 for v in numbers)


@dataclass
class StageConfig:
    """One training stage: what changes in the patch, what trains, on which losses, for how long."""

    name: str = _field(check=bool, valid="a non-empty name")
    patch: dict[str, Any] | None = _field(None)
    train: TrainMode = _field("all")
    lora: LoraConfig | None = _field(None)
    losses: dict[str, float] = _field(
        {"lm": 1.0}, check=lambda v: _weights(v) and any(v.values()), valid="a mapping of loss name -> weight >= 0"
    )
    steps: int | None = _field(None, **_INT1)
    tokens: int | None = _field(None, **_INT1)
    seq_len: int | None = _field(None, check=lambda v: v >= 2, valid="an integer >= 2")
    batch_size: int | None = _field(None, **_INT1)
    grad_accum: int = _field(1, **_INT1)
    lr: float = _field(1e-4, check=lambda v: v > 0, valid="a number > 0")
    schedule: Schedule = _section(Schedule)
    weight_decay: float = _field(0.0, check=lambda v: v >= 0, valid="a number >= 0")
    grad_clip: float = _field(1.0, check=lambda v: v >= 0, valid="a number >= 0 (0: no clipping)")
    finalize: bool = _field(False)

    def total_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps of this stage: `steps`, or `tokens` over the tokens one step trains on (rounded up)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / tokens_per_step))


@dataclass
class CPConfig:
    """Context parallelism: each sequence sharded over `degree` ranks by the `cp` plugin `strategy`."""

    degree: int = _field(1, **_INT1)
    strategy: str = _field("ring", check=bool, valid="a cp plugin name")


@dataclass
class EvalConfig:
    """`lcplug.eval` probes before and after training, and every `every` steps (0: only before and after)."""

    probes: list[str] = _field([])
    lengths: list[int] = _field([1024, 4096], check=lambda v: bool(v) and min(v) >= 1, valid="integers >= 1")
    samples: int = _field(2, **_INT1)
    every: int = _field(0, **_INT0)


@dataclass
class OutputConfig:
    """Where the run writes: checkpoints, metrics, the final model."""

    dir: str = _field("", check=bool, valid="a directory")
    checkpoint_every: int = _field(0, **_INT0)
    keep: int = _field(2, **_INT1)
    lora: Literal["merge", "adapter", "both"] = _field("merge")
    log: list[Literal["jsonl", "tensorboard"]] = _field(["jsonl", "tensorboard"])


@dataclass
class PublishConfig:
    """Where `lcplug publish` pushes the final model (validated here, performed by the Hub commands)."""

    repo_id: str | None = _field(None, check=lambda v: v.count("/") == 1, valid="'owner/name'")
    private: bool = _field(True)


@dataclass
class Recipe:
    """A validated retrofit recipe; build it with `from_yaml` or `from_dict`."""

    base: BaseModel = _field()
    stages: list[StageConfig] = _field(check=bool, valid="a list of at least one stage")
    data: DataConfig = _field()
    name: str = _field("retrofit", check=bool, valid="a non-empty name")
    seed: int = _field(0, **_INT0)
    tokenizer: str | None = _field(None)
    patch: dict[str, Any] = _field({})
    precision: Literal["fp32", "bf16", "fp16"] = _field("fp32")
    gradient_checkpointing: bool = _field(False)
    cp: CPConfig = _section(CPConfig)
    eval: EvalConfig = _section(EvalConfig)
    output: OutputConfig = _section(OutputConfig)
    publish: PublishConfig = _section(PublishConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe file; its `name` defaults to the file's stem."""
        from ..yamlfile import read_yaml

        path = Path(path)
        raw = read_yaml(path, what="recipe", error=RecipeError)
        if not isinstance(raw, Mapping):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections (base, stages, data, ...)")
        return cls.from_dict({"name": path.stem, **raw})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Recipe:
        """Validate a recipe mapping; the first problem raises a `RecipeError` naming its field path."""
        recipe = _parse(cls, raw, "")
        data_tokenizer = (raw.get("data") or {}).get("tokenizer")
        if data_tokenizer is not None:
            if recipe.tokenizer not in (None, data_tokenizer):
                raise RecipeError(
                    f"data.tokenizer: {data_tokenizer!r} differs from tokenizer {recipe.tokenizer!r}; one tokenizer "
                    "serves data and eval, give it once as the top-level tokenizer"
                )
            recipe.tokenizer = data_tokenizer
        recipe._resolve()
        return recipe

    def _resolve(self) -> None:
        """Cross-field rules and defaults that depend on other sections (run once, after parsing)."""
        from .losses import check_loss_names

        if not self.output.dir:
            self.output.dir = str(Path("out") / self.name)
        if self.eval.every and not self.eval.probes:
            raise RecipeError("eval.every: evaluating every N steps needs eval.probes")
        if self.eval.probes:
            _check_probes(self.eval)
        if "cp" in self.patch:
            raise RecipeError("patch.cp: give context parallelism as cp: {degree: N, strategy: NAME}")
        spec = check_spec(self.patch, "patch")
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.name in seen:
                raise RecipeError(
                    f"{where}.name: {stage.name!r} already names stages[{seen[stage.name]}]; stage names must be unique"
                )
            seen[stage.name] = i
            if (stage.steps is None) == (stage.tokens is None):
                raise RecipeError(f"{where}: give exactly one of steps or tokens")
            if stage.train in LORA_MODES:
                stage.lora = stage.lora or LoraConfig()
            elif stage.lora is not None:
                raise RecipeError(
                    f"{where}.lora: only used with train: lora or lora+ (this stage trains {stage.train})"
                )
            stage.seq_len = stage.seq_len or self.data.seq_len
            stage.batch_size = stage.batch_size or self.data.batch_size
            if stage.patch is not None:
                try:
                    merged = merge_spec(spec, stage.patch)
                except LcplugError as exc:
                    raise RecipeError(f"{where}.patch: {exc}") from None
                spec = check_spec(merged, f"{where}.patch")
            check_loss_names(stage.losses, spec, f"{where}.losses")
        loras = [(i, s.lora) for i, s in enumerate(self.stages) if s.lora is not None]
        for i, lora in loras[1:]:
            if lora != loras[0][1]:
                raise RecipeError(
                    f"stages[{i}].lora: differs from stages[{loras[0][0]}].lora; a run trains one LoRA adapter"
                )

    def data_config(self, stage: StageConfig) -> DataConfig:
        """The data section with this stage's sequence length and per-rank batch size."""
        return dataclasses.replace(self.data, seq_len=stage.seq_len, batch_size=stage.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), as YAML would hold it; `from_dict` reads it back."""
        out = _plain(self)
        # the top-level tokenizer is the one the run uses; data's own default ("bytes") would contradict it
        out["data"] = {f.name: _plain(getattr(self.data, f.name)) for f in fields(DataConfig) if f.name != "tokenizer"}
        return out


# ---- parsing ----------------------------------------------------------------------------------------


def _parse(cls: type[T], raw: Any, path: str) -> T:
    """One section: unknown keys (did you mean), required fields, each value coerced to its type and checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise RecipeError(f"{_join(path, key)}: unknown key; {did_you_mean(str(key), known)}")
    values = {}
    for name, f in known.items():
        where = _join(path, name)
        if raw.get(name) is None and f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(f"{where}: required")
        if name in raw:
            values[name] = _value(raw[name], hints[name], f, where)
    return cls(**values)


def _value(value: Any, tp: Any, f: dataclasses.Field, where: str) -> Any:
    """One field's value: a nested section, a list of sections, the data section, or a coerced scalar."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if value is None and optional:
        return None
    if tp is DataConfig:
        return _data(value)
    section = args[0] if optional and len(args) == 1 else tp
    if dataclasses.is_dataclass(section):
        return _parse(section, value, where)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        items = [_parse(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
        return _checked(items, value, f, where)
    if typing.get_origin(tp) is list and isinstance(value, str):
        value = value.replace(",", " ")  # `probes: passkey,ppl`
    try:
        coerced = _coerce(value, tp)
    except (ValueError, TypeError):
        raise RecipeError(f"{where}: got {value!r}; {_valid(tp, f, value)}") from None
    return _checked(coerced, value, f, where)


def _checked(coerced: Any, raw: Any, f: dataclasses.Field, where: str) -> Any:
    check = f.metadata.get("check")
    if check is not None and coerced is not None and not check(coerced):
        raise RecipeError(f"{where}: got {raw!r}; valid: {f.metadata['valid']}")
    return coerced


def _valid(tp: Any, f: dataclasses.Field, value: Any) -> str:
    """What is valid for a field, in words; choices come with the closest one to what was given."""
    choices = _choices(tp)
    if choices:
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        close = f" ({hint})" if hint.startswith("did you mean") else ""
        return f"valid: {', '.join(choices)}{close}"
    if f.metadata.get("valid"):
        return f"valid: {f.metadata['valid']}"
    return f"expected {_type_name(tp)}"


def _choices(tp: Any) -> list[str]:
    if typing.get_origin(tp) is Literal:
        return [str(c) for c in typing.get_args(tp)]
    return [c for arg in typing.get_args(tp) for c in _choices(arg)]


def _data(raw: Any) -> DataConfig:
    """The data section through lcplug.data's own validation, its error made a recipe error."""
    from ..data.base import DataError

    try:
        return DataConfig.from_dict(raw)
    except DataError as exc:
        message = str(exc)
        raise RecipeError(message if message.startswith("data") else f"data: {message}") from None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts as plain YAML-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, DataConfig):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# ---- plugin specs -----------------------------------------------------------------------------------


def merge_spec(current: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's spec: `change` over `current`, kind by kind (both in `lcplug.patch`'s mapping form).

    A kind naming the plugin already installed changes only the params it gives (`dsa:stage=sparse`
    keeps the rest of the dsa spec); another plugin replaces the kind; `null` removes it; `layers` replaces.
    """
    from ..spec import PatchSpec

    merged = PatchSpec.build(dict(current)).to_dict()
    for kind, value in change.items():
        if value is None:
            merged.pop(kind, None)
        elif kind == "layers":
            merged[kind] = value
        else:
            new = PatchSpec.build({kind: value}).to_dict()[kind]
            old = merged.get(kind)
            merged[kind] = {**old, **new} if old is not None and old["name"] == new["name"] else new
    return merged


def check_spec(raw: Any, where: str) -> dict[str, Any]:
    """A patch mapping whose plugins exist and whose params are valid (no model needed); its normal form."""
    from ..registry import get_registry
    from ..spec import PatchSpec

    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: expected a mapping of kind -> plugin spec, got {raw!r}")
    try:
        spec = PatchSpec.build(dict(raw))
        for kind, plugin in spec.plugins.items():
            get_registry().get(kind, plugin.name).build(plugin.params)
    except LcplugError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return spec.to_dict()


def check_cp_strategy(strategy: str) -> None:
    """A cp plugin of that name must be installed before a run asks for context parallelism."""
    from ..registry import get_registry

    names = get_registry().names("cp")
    if strategy not in names:
        installed = (
            f"installed cp plugins: {', '.join(names)}; {did_you_mean(strategy, names)}"
            if names
            else "install a cp plugin (lcplug ships ring, ulysses, allgather, hybrid) or set cp.degree: 1"
        )
        raise RecipeError(f"cp.strategy {strategy!r}: no cp plugin installed by that name; {installed}")


def _check_probes(cfg: EvalConfig) -> None:
    from ..eval.probes import ProbeError, build_probes

    try:
        build_probes(cfg.probes, lengths=cfg.lengths, samples=cfg.samples)
    except ProbeError as exc:
        raise RecipeError(f"eval.probes: {exc}") from None
