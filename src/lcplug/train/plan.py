"""`lcplug plan`: a recipe's whole run built on the meta device, so its shape and memory are known before any GPU.

The plan loads the config (`base.config`, or the config of a local `base.model`), builds the model on
the meta device (parameters with shapes and no storage), applies the recipe's patch, then walks the
stages through the functions the runner uses (`stages.enter`, `stages.configure`, `stages.finalize`):
per stage the patch in force, the trainable parameters by group, steps and tokens, the learning rate
schedule, the attention each layer runs, and a per-device memory estimate (`memory.py`). A stage
estimated over an 80 GiB device is a warning, not an error: the plan is for deciding what to change.

A finalize reads what a calibration learnt (LoZA's and DuoAttention's gates), which a meta model does
not have: the plan gives the gates their initial value (1, full attention), so the finalize takes its
tie-break (the lowest layer indices), and says so. The real run's choice depends on the calibration;
the shapes, counts and memory that follow do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LcplugError
from ..patching import patch_state
from ..plugin import Plugin
from ..spec import parse_plugin_spec
from . import memory
from .preflight import load_config, skeleton
from .recipe import Recipe, StageConfig
from .stages import apply_spec, configure, current_spec, enter, finalize
from .trainables import Trainee, plugin_groups

DETACHED_GROUPS = ("indexer",)
"""Plugin groups trained on detached inputs (DSA's indexer): training only them keeps no model activations."""


class PlanError(LcplugError, ValueError):
    """A recipe the plan cannot build: one line naming the field and what would work."""


@dataclass
class PlannedStage:
    """One stage as the plan sees it: patch, trainables, schedule, attention and memory per device."""

    name: str
    change: dict[str, Any]  # the stage's `patch:` as written (merged over the spec in force)
    spec: dict[str, Any]  # the spec the stage trains with
    rope: dict[str, Any]  # the text config's rope_parameters during the stage
    positions: int  # its max_position_embeddings
    train: str
    trainable: dict[str, int]  # parameters by group ("model", "lora", or a plugin group)
    losses: dict[str, float]
    seq_len: int
    batch_size: int
    grad_accum: int
    tokens_per_step: int
    steps: int
    lr: float
    schedule: dict[str, Any]
    attention: list[tuple[str, int, int]]  # (what runs, keys per query, layers running it)
    memory: memory.MemoryEstimate
    finalized: dict[str, Any] | None = None  # the spec the stage's finalize left

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k not in ("memory", "attention")}
        out["tokens"] = self.tokens
        out["attention"] = [{"runs": label, "keys_per_query": keys, "layers": n} for label, keys, n in self.attention]
        out["memory_gib"] = self.memory.to_dict()
        return out


@dataclass
class Plan:
    """A recipe's run on `world_size` devices, stage by stage; `table()` renders it, `to_dict()` for JSON."""

    recipe: str
    model: str
    config: str
    model_class: str
    dims: memory.Dims
    parameters: int  # after the recipe's patch (plugin parameters included)
    base_parameters: int  # before it
    world_size: int
    cp_degree: int
    cp_strategy: str
    precision: str
    dtype: str
    gradient_checkpointing: bool
    patch: dict[str, Any]  # the recipe's patch as written (applied before the first stage)
    mixture: dict[str, float]
    manifest: dict[str, Any]  # `config.lcplug` after the last stage
    stages: list[PlannedStage]
    model_instance: nn.Module = field(repr=False)  # the patched model after the last stage (meta: no storage)
    device: str = "meta"
    device_gib: float = memory.DEVICE_GIB
    warnings: list[str] = field(default_factory=list)

    @property
    def dp_degree(self) -> int:
        return self.world_size // self.cp_degree

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k not in ("stages", "dims", "model_instance")}
        out["dims"] = vars(self.dims)
        out["dp_degree"] = self.dp_degree
        out["stages"] = [stage.to_dict() for stage in self.stages]
        return out

    def table(self) -> str:
        return format_plan(self)


def plan(recipe: Recipe | str | Path, *, world_size: int | None = None, device: str = "meta") -> Plan:
    """Build `recipe`'s run on `device` (meta: no weights) for `world_size` ranks (default: cp.degree)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    world = recipe.cp.degree if world_size is None else world_size
    if world < 1 or world % recipe.cp.degree:
        raise PlanError(
            f"world size {world} does not split into groups of cp.degree {recipe.cp.degree}; "
            f"valid: a multiple of {recipe.cp.degree}"
        )
    config = _config(recipe)
    with torch.device(device):
        model = skeleton(config, recipe.base.dtype)
        dims = memory.Dims.of(model)
        base_parameters = _count(model.parameters())
        apply_spec(model, recipe.patch, "patch")
        parameters = _count(model.parameters())
        stages = _walk(recipe, model, dims, world)
    mixture = {d.source + (f"@{d.max_doc_tokens}" if d.max_doc_tokens else ""): d.weight for d in recipe.data.domains()}
    result = Plan(
        recipe=recipe.name,
        model=recipe.base.model,
        config=recipe.base.config or recipe.base.model,
        model_class=type(model).__name__,
        dims=dims,
        parameters=parameters,
        base_parameters=base_parameters,
        world_size=world,
        cp_degree=recipe.cp.degree,
        cp_strategy=recipe.cp.strategy,
        precision=recipe.precision,
        dtype=recipe.base.dtype,
        gradient_checkpointing=recipe.gradient_checkpointing,
        patch=dict(recipe.patch),
        mixture=mixture,
        manifest=dict(getattr(model.config, "lcplug", {}) or {}),
        stages=stages,
        model_instance=model,
        device=device,
    )
    result.warnings += [
        f"stage {s.name!r}: an estimated {s.memory.total:.1f} GiB per device exceeds an {result.device_gib:g} GiB "
        "device; raise cp.degree or the world size, turn on gradient_checkpointing, or lower seq_len / batch_size"
        for s in stages
        if s.memory.total > result.device_gib
    ]
    return result


def _config(recipe: Recipe) -> Any:
    """The base config without downloading anything: `base.config`, or a local checkpoint's own."""
    if recipe.base.config is None and not Path(recipe.base.model).is_dir():
        raise PlanError(
            f"base.model {recipe.base.model!r} is not a local directory and the plan downloads nothing; give "
            "base.config: the model's config.json (recipes/configs/ holds some)"
        )
    return load_config(recipe)


def _walk(recipe: Recipe, model: nn.Module, dims: memory.Dims, world: int) -> list[PlannedStage]:
    """Enter, configure and (where asked) finalize each stage in turn, as the runner does."""
    trainee = Trainee(model)
    precision = memory.Precision.of(recipe.base.dtype, recipe.precision)
    out = []
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        enter(model, stage, where)
        params = configure(trainee, stage, where).params
        groups = _groups(model, params)
        trained = {id(p) for p in params.values()}
        costs = memory.attention_costs(
            memory.installed_attention(model), dims, stage.seq_len, precision.compute, trained
        )
        per_step = stage.seq_len * stage.batch_size * stage.grad_accum * (world // recipe.cp.degree)
        planned = PlannedStage(
            name=stage.name,
            change=dict(stage.patch or {}),
            spec=current_spec(model),
            rope=dict(model.config.get_text_config().rope_parameters or {}),
            positions=model.config.get_text_config().max_position_embeddings,
            train=stage.train,
            trainable=groups,
            losses=dict(stage.losses),
            seq_len=stage.seq_len,
            batch_size=stage.batch_size,
            grad_accum=stage.grad_accum,
            tokens_per_step=per_step,
            steps=stage.total_steps(per_step),
            lr=stage.lr,
            schedule=vars(stage.schedule).copy(),
            attention=_attention_summary(costs),
            memory=_memory(recipe, stage, model, dims, groups, costs, precision, world),
        )
        if stage.finalize:
            _untrained_gates(model)
            planned.finalized = finalize(model)
        out.append(planned)
    return out


def _groups(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, int]:
    """Trained parameter counts by group: the plugins' groups, LoRA adapters, and the model's own weights."""
    owner = {id(p): name for name, ps in plugin_groups(model).items() for p in ps}
    counts: dict[str, int] = {}
    for name, p in params.items():
        group = owner.get(id(p)) or ("lora" if ".lora_" in name else "model")
        counts[group] = counts.get(group, 0) + p.numel()
    return counts


def _memory(
    recipe: Recipe,
    stage: StageConfig,
    model: nn.Module,
    dims: memory.Dims,
    groups: dict[str, int],
    costs: list[memory.AttentionCost],
    precision: memory.Precision,
    world: int,
) -> memory.MemoryEstimate:
    """The stage's estimate: states sharded over the whole world, activations over this rank's tokens."""
    total = _count(model.parameters())
    trainable = sum(groups.values())
    outside = _count(
        {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    )
    work = memory.Workload(
        tokens=stage.seq_len * stage.batch_size // recipe.cp.degree,
        checkpointing=recipe.gradient_checkpointing,
        backprop=any(group not in DETACHED_GROUPS for group in groups),
        lm_loss=stage.losses.get("lm", 0) > 0,
    )
    return memory.estimate(
        dims,
        frozen=total - trainable,
        trainable=trainable,
        outside_layers=outside,
        precision=precision,
        shard=world,
        work=work,
        costs=costs,
    )


def _count(params: Any) -> int:
    """Elements of distinct parameters (tied weights once); a dict of id -> parameter or an iterable."""
    values = params.values() if isinstance(params, dict) else {id(p): p for p in params}.values()
    return sum(p.numel() for p in values)


def _attention_summary(costs: list[memory.AttentionCost]) -> list[tuple[str, int, int]]:
    """(what runs, keys per query, how many layers) in first-seen order."""
    seen: dict[tuple[str, int], int] = {}
    for cost in costs:
        seen[(cost.label, cost.keys)] = seen.get((cost.label, cost.keys), 0) + 1
    return [(label, keys, n) for (label, keys), n in seen.items()]


def _untrained_gates(model: nn.Module) -> None:
    """Give meta parameters of finalizing plugins' groups their initial value, 1, so finalize can read them."""
    state = patch_state(model)
    finalizing = [
        p for p in ([] if state is None else state.plugins.values()) if type(p).finalize is not Plugin.finalize
    ]
    meta = {id(t) for plugin in finalizing for ts in plugin.trainable_groups(model).values() for t in ts if t.is_meta}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in meta:
                module._parameters[name] = nn.Parameter(torch.ones(p.shape, dtype=p.dtype, device="cpu"))


# ---- the table --------------------------------------------------------------------------------------

MEMORY_TERMS = ("weights", "grads", "optimizer", "gathered", "activations", "attention", "logits")


def format_plan(p: Plan) -> str:
    """The human plan: the model and set-up, one schedule row per stage, each stage's patch and attention,
    one memory row per stage, then the warnings."""
    d = p.dims
    added = p.parameters - p.base_parameters
    lines = [
        f"plan: {p.recipe} on {p.world_size} device(s) ("
        + ("meta tensors, no weights)" if p.device == "meta" else f"{p.device} tensors)"),
        f"model:     {p.model} (config {p.config}): {p.model_class}, {_si(p.base_parameters)} parameters"
        + (f" (+{_si(added)} from the patch)" if added else "")
        + f", {d.layers} layers, hidden {d.hidden}, {d.heads} heads / {d.kv_heads} KV heads x {d.head_dim}, "
        f"vocab {d.vocab}",
        f"parallel:  world {p.world_size} = {p.dp_degree} data-parallel x {p.cp_degree} context-parallel "
        f"({p.cp_strategy}); parameters, gradients and AdamW states sharded over {p.world_size} rank(s) (FSDP)",
        f"precision: {p.precision} compute, weights loaded as {p.dtype}; gradient checkpointing "
        + ("on" if p.gradient_checkpointing else "off"),
        "data:      " + ", ".join(f"{name} {w:.0%}" for name, w in p.mixture.items()),
        "",
        _grid(
            (
                "stage",
                "train",
                "trainable",
                "seq_len",
                "batch x accum x dp",
                "tokens/step",
                "steps",
                "tokens",
                "lr",
                "schedule",
            ),
            [
                (
                    s.name,
                    s.train,
                    " + ".join(f"{_si(n)} {g}" for g, n in s.trainable.items()),
                    f"{s.seq_len:,}",
                    f"{s.batch_size} x {s.grad_accum} x {p.dp_degree}",
                    f"{s.tokens_per_step:,}",
                    f"{s.steps:,}",
                    _si(s.tokens),
                    f"{s.lr:.1e}",
                    _schedule(s.schedule),
                )
                for s in p.stages
            ],
        ),
        "",
    ]
    for i, s in enumerate(p.stages):
        change = " then ".join(filter(None, (_written(p.patch) if i == 0 else "", _written(s.change))))
        losses = ", ".join(f"{k} x {v:g}" for k, v in s.losses.items())
        lines.append(f"{s.name}: patch {change or 'unchanged'}; losses {losses}")
        lines.append(f"    positions: {_rope(s.rope)}, max_position_embeddings {s.positions:,}")
        lines += [f"    {n} layer(s): {label}, {keys:,} keys per query" for label, keys, n in s.attention]
        if s.finalized is not None:
            lines.append(
                f"    finalize -> {_changes(s.spec, s.finalized)}"
                + ("  (plan: untrained gates, so ties go to the lowest layers)" if p.device == "meta" else "")
            )
    lines.append("")
    lines.append(
        _grid(
            ("memory per device (GiB)", *MEMORY_TERMS, "total"),
            [
                (s.name, *(f"{getattr(s.memory, t):.1f}" for t in MEMORY_TERMS), f"{s.memory.total:.1f}")
                for s in p.stages
            ],
        )
    )
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def _grid(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows))


def _si(n: float) -> str:
    """8030261248 -> 8.03B, 32768000 -> 32.8M, 32 -> 32."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _schedule(s: dict[str, Any]) -> str:
    decay = "constant" if s["decay"] == "constant" else f"{s['decay']} to {s['min_lr_ratio']:g}"
    return f"warmup {s['warmup']}, {decay}"


def _rope(params: dict[str, Any]) -> str:
    """`yarn factor 16, theta 500,000` (per layer type where a config keeps one rope per type)."""
    if "rope_type" not in params:
        return "; ".join(f"{kind}: {_rope(p)}" for kind, p in params.items() if p) or "none"
    factor = f" factor {params['factor']:g}" if params.get("factor") else ""
    return f"{params['rope_type']}{factor}, theta {params.get('rope_theta', 0):,.0f}"


def _written(patch: dict[str, Any]) -> str:
    """A recipe's patch mapping as its author wrote it, one kind after the other."""
    parts = []
    for kind, value in patch.items():
        if value is None:
            parts.append(f"{kind} removed")
        elif kind == "layers":
            parts.append(f"layers {_value(value)}")
        else:
            parts.append(f"{kind} {parse_plugin_spec(kind, value)}")
    return "; ".join(parts)


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What a finalize changed: per kind, the plugin and the params that differ (specs in mapping form)."""
    parts = []
    for kind, after in new.items():
        before = old.get(kind)
        if kind == "layers" or before == after:
            continue
        same = isinstance(before, dict) and before.get("name") == after["name"]
        params = {k: v for k, v in after.items() if k != "name" and not (same and before.get(k) == v)}
        parts.append(f"{kind} {after['name']}:" + ",".join(f"{k}={_value(v)}" for k, v in params.items()))
    return "; ".join(parts)


def _value(v: Any) -> str:
    """Layer lists as ranges (0-15), mappings by size, everything else as written."""
    if isinstance(v, list) and v and all(isinstance(i, int) for i in v):
        runs, start = [], v[0]
        for a, b in zip(v, [*v[1:], None]):
            if b != a + 1:
                runs.append(f"{start}-{a}" if a != start else f"{a}")
                start = b
        return " ".join(runs)
    if isinstance(v, dict) and v:
        return f"<{len(v)} entries>"
    return str(v)
