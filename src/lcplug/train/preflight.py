"""Everything a run checks before any weight loads or any step runs, so bad input fails in seconds.

- the base model: its config loads (a missing directory or unknown Hub id names `base.model`);
- the tokenizer: it loads, and bytes fit the vocabulary;
- the stages: rehearsed on a meta-device copy of the model (no memory, no compute) through the very
  functions the run uses: the patch, each stage's patch change, its trainables (LoRA targets, plugin
  groups) and its losses. A finalize changes the patch by what was learnt, so stages after the first
  finalize are checked when they start;
- the data: every stage's loader builds (documents longer than the stage's seq_len fail here), and
  with `data.repeat: false` the stream is read through once to prove it holds enough batches.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.base import DataError
from ..data.pipeline import PackedLoader
from ..errors import LcplugError
from .recipe import Recipe, RecipeError
from .stages import apply_spec, configure, enter
from .trainables import Trainee

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(recipe: Recipe) -> Any:
    """The base model's transformers config (or `base.config`'s JSON), as a recipe error if it cannot load."""
    from transformers import AutoConfig

    base = recipe.base
    if base.config is not None:
        path = Path(base.config)
        if not path.is_file():
            raise RecipeError(f"base.config: {base.config!r} is not a file (a config.json)")
        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise RecipeError(f"base.config: {base.config!r} has no model_type")
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    if _looks_local(base.model) and not Path(base.model).is_dir():
        raise RecipeError(f"base.model: {base.model!r} is not a directory (nor a Hub repo id 'owner/name')")
    try:
        return AutoConfig.from_pretrained(base.model, revision=base.revision)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"base.model: cannot load {base.model!r}: {str(exc).splitlines()[0]}") from None


def _looks_local(ref: str) -> bool:
    """A path rather than a Hub id (`owner/name`): it exists, or starts like a path, or has more than one '/'."""
    return Path(ref).exists() or ref.startswith((".", "~", "/", os.sep)) or ref.count("/") > 1


def load_tokenizer(recipe: Recipe, config: Any) -> Any:
    """The tokenizer data and eval share: a transformers tokenizer, or None for bytes."""
    from ..eval.tokens import TokenizerError, check_byte_vocab

    if recipe.tokenizer == "bytes":
        try:
            check_byte_vocab(config.get_text_config().vocab_size, "base.model")
        except TokenizerError as exc:
            raise RecipeError(f"tokenizer: {exc}") from None
        return None
    from transformers import AutoTokenizer

    source = recipe.tokenizer or recipe.base.model
    try:
        return AutoTokenizer.from_pretrained(source, revision=None if recipe.tokenizer else recipe.base.revision)
    except (OSError, ValueError, TypeError) as exc:
        hint = "" if recipe.tokenizer else "; set tokenizer: bytes (byte-level models) or a tokenizer directory"
        raise RecipeError(f"tokenizer: cannot load one from {source!r}: {str(exc).splitlines()[0]}{hint}") from None


def skeleton(config: Any, dtype: str) -> torch.nn.Module:
    """The base architecture from its config, no checkpoint weights read; build it under `torch.device("meta")`
    for shapes without storage. The config is copied, as patching writes to the model's config."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=DTYPES[dtype])


def rehearse(recipe: Recipe, config: Any, spec: dict[str, Any]) -> None:
    """Run the stage set-up on a meta-device model: every error it would raise, raised now.

    Patching runs under the meta device too, so parameters plugins add (DSA indexers, gates) cost nothing.
    """
    with torch.device("meta"):
        model = skeleton(config, recipe.base.dtype)
        apply_spec(model, spec, "patch")
        trainee = Trainee(model)
        for i, stage in enumerate(recipe.stages):
            where = f"stages[{i}]"
            enter(model, stage, where)
            configure(trainee, stage, where)
            if stage.finalize:
                break


def stage_loader(recipe: Recipe, index: int, tokenizer: Any, dp_rank: int, dp_world: int) -> PackedLoader:
    """This rank's loader for stage `index` (its seq_len and batch size); a recipe error naming the stage if the
    data cannot fill it."""
    try:
        return PackedLoader(
            recipe.data_config(recipe.stages[index]),
            tokenizer=tokenizer if tokenizer is not None else "bytes",
            dp_rank=dp_rank,
            dp_world=dp_world,
        )
    except LcplugError as exc:
        raise RecipeError(f"stages[{index}].seq_len: {exc}") from None


def check_data(recipe: Recipe, tokenizer: Any, dp_rank: int, dp_world: int) -> None:
    """Build every stage's loader; with `repeat: false`, read the stream through the whole run (stages share it)."""
    loaders = [stage_loader(recipe, i, tokenizer, dp_rank, dp_world) for i in range(len(recipe.stages))]
    if recipe.data.repeat:
        return
    state = None
    for i, (stage, loader) in enumerate(zip(recipe.stages, loaders)):
        if state is not None:
            loader.load_state_dict(state)
        per_step = stage.seq_len * stage.batch_size * stage.grad_accum * dp_world
        need = stage.total_steps(per_step) * stage.grad_accum
        for got in range(need):
            try:
                next(loader)
            except StopIteration:
                raise RecipeError(
                    f"stages[{i}]: the data runs out after {got} of the {need} batches this stage needs "
                    "(data.repeat is false); add data, set data.repeat: true, or train fewer steps/tokens"
                ) from None
            except DataError as exc:
                raise RecipeError(f"stages[{i}]: {exc}") from None
        state = loader.state_dict()
