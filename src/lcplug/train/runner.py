"""The retrofit loop: recipe -> pre-flight -> load -> patch -> stages under Accelerate -> checkpoints -> final save.

One process per rank runs `train` (`lcplug train RECIPE.yaml`, or `accelerate launch -m lcplug train ...`
for several). Each stage: apply its patch change, select what it trains, build AdamW and the LR schedule,
`accelerator.prepare` the model and optimizer, then step through packed batches from this rank's data
shard. One optimizer step is `grad_accum` micro-batches; what is logged is the mean over micro-batches
and ranks. Stages share one data stream: a stage's loader continues where the previous one stopped.

Every `output.checkpoint_every` steps the run saves a checkpoint it can resume from exactly
(`resume="auto"`); eval probes run before training, every `eval.every` steps and after training; the
final model is saved with its manifest (`lcplug.from_pretrained` reloads it patched).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..card import write_model_card
from ..checkpoint import save_pretrained
from ..cp import check_seq_len, cp_loss, cp_runtime, shard_batch, suspended
from ..data.base import DataError
from ..data.packing import model_inputs
from ..data.pipeline import PackedLoader, dp_coordinates
from ..errors import LcplugError
from ..patching import patch_state
from .losses import combine
from .metrics import MetricsLog
from .preflight import DTYPES, check_data, load_config, load_tokenizer, rehearse, stage_loader
from .recipe import CPConfig, LoraConfig, Recipe, RecipeError, StageConfig, check_cp_strategy
from .schedule import build_scheduler
from .stages import StagePlan, apply_spec, configure, current_spec, enter, finalize
from .state import Checkpoint, checkpoint_root, clean_partial, find_resume, rng_state, save_checkpoint, set_rng_state
from .trainables import Trainee, attach_lora, named_weights

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def context_parallel(cp: CPConfig) -> dict[str, Any]:
    """The patch entry context parallelism adds to the recipe's spec: the one seam the CP plugins plug into.

    With `cp.degree > 1` the model is patched with the `cp` plugin `cp.strategy` (its presence is checked
    here, when a run starts: a plan of the recipe needs none installed); ranks r with the same r // degree
    then read the same data (`dp_coordinates`).
    """
    if cp.degree == 1:
        return {}
    check_cp_strategy(cp.strategy)
    return {"cp": {"name": cp.strategy, "degree": cp.degree}}


def cp_inputs(model: nn.Module, batch: dict[str, Any], device: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(this rank's batch, the model call, shifted labels) for one micro-batch.

    Without active cp: the whole batch and the model's own loss (shifted labels None). With cp: the rank's
    shard (zigzag for ring, as the plugin says), called without labels; the caller computes `cp_loss`,
    the loss reduced by token count over the cp group and scaled so that DDP's gradient average over
    all dp x cp ranks is the single-process gradient (see `lcplug.cp.loss`).
    """
    if cp_runtime(model) is None:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        return batch, inputs, None
    part = shard_batch(model, batch)
    inputs = {"input_ids": part["input_ids"].to(device), "position_ids": part["position_ids"].to(device)}
    return part, {**inputs, "use_cache": False}, part["shift_labels"].to(device)


def train(
    recipe_or_path: Recipe | str | Path, *, resume: str | None = None, max_steps: int | None = None
) -> dict[str, Any]:
    """Run a recipe end to end and return its summary (also written to `<output.dir>/train_summary.json`).

    `resume`: None starts fresh, "auto" continues from the newest complete checkpoint in output.dir (fresh
    if there is none), a path continues from that checkpoint. `max_steps` stops after that many steps in
    all (with a checkpoint to resume from) instead of finishing the recipe.
    """
    recipe = recipe_or_path if isinstance(recipe_or_path, Recipe) else Recipe.from_yaml(recipe_or_path)
    return Run(recipe, resume=resume, max_steps=max_steps).run()


class Run:
    """One process's part of a training run: its accelerator, model, data shard and progress counters."""

    def __init__(self, recipe: Recipe, *, resume: str | None, max_steps: int | None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        if recipe.precision == "fp16" and not torch.cuda.is_available():
            raise RecipeError("precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.recipe = recipe
        self.max_steps = max_steps
        self.out = Path(recipe.output.dir)
        # a stage may train parameters one of its losses does not reach (e.g. `train: all` beside an indexer)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[recipe.precision], cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp]
        )
        check_sharding(self.accelerator.distributed_type)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        try:
            self.dp_rank, self.dp_world = dp_coordinates(self.rank, self.world, recipe.cp.degree)
        except DataError as exc:
            raise RecipeError(f"cp.degree: {exc}") from None
        self.checkpoint = find_resume(resume, self.out)
        if self.checkpoint is not None:
            check_resumable(self.checkpoint, recipe, self.world)
        self.step = 0 if self.checkpoint is None else self.checkpoint.step
        self.tokens = 0 if self.checkpoint is None else int(self.checkpoint.meta["tokens"])
        self.trained: set[str] = set() if self.checkpoint is None else set(self.checkpoint.meta["trained"])
        self.data_state: dict[str, Any] | None = None
        self.stage_rows: list[dict[str, Any]] = []
        self.eval_results: dict[str, dict[str, float]] = {}
        self.eval_reports: list[dict[str, Any]] = []  # whole probe results, for the before/after report

    # ---- the run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        recipe = self.recipe
        config = load_config(recipe)
        self.tokenizer = load_tokenizer(recipe, config)
        spec = {**recipe.patch, **context_parallel(recipe.cp)}
        rehearse(recipe, config, spec)
        check_data(recipe, self.tokenizer, self.dp_rank, self.dp_world)

        from accelerate.utils import set_seed

        set_seed(recipe.seed)
        self.trainee = Trainee(self.load_model(config))
        if self.main:
            clean_partial(checkpoint_root(self.out))
            self.out.mkdir(parents=True, exist_ok=True)
            self.write_recipe()
        resume_step = None if self.checkpoint is None else self.checkpoint.step
        self.metrics = MetricsLog(self.out, recipe.output.log, enabled=self.main, resume_step=resume_step)
        self.probes = self.build_probes()
        self.evaluator = self.build_evaluator()
        try:
            if self.checkpoint is not None:
                self.restore_model(self.checkpoint)
                self.check_cp()
            else:
                # "base": the checkpoint as it came; "before": patched, not yet trained (training-free effect)
                self.evaluate("base")
                if spec:
                    apply_spec(self.trainee.model, spec, "patch")
                    self.check_cp()
                    self.evaluate("before")
            if recipe.gradient_checkpointing:
                self.trainee.model.activation_checkpointing_enable({"use_reentrant": False})
            first = 0 if self.checkpoint is None else int(self.checkpoint.meta["stage"])
            for index in range(first, len(recipe.stages)):
                if not self.run_stage(index):
                    return self.finish(started, complete=False)
            self.evaluate("after")
            self.write_eval_report()
            self.save_final()
            return self.finish(started, complete=True)
        finally:
            self.metrics.close()

    def check_cp(self) -> None:
        """Every stage's rows must split over the cp group in the layout its strategy shards with."""
        runtime = cp_runtime(self.trainee.model)
        if runtime is None:
            return
        for index, stage in enumerate(self.recipe.stages):
            try:
                check_seq_len(stage.seq_len, runtime.mesh.degree, runtime.layout)
            except LcplugError as exc:
                raise RecipeError(f"stages[{index}].seq_len: {exc}") from None

    def load_model(self, config: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        base = self.recipe.base
        return AutoModelForCausalLM.from_pretrained(
            base.model, config=config, revision=base.revision, dtype=DTYPES[base.dtype]
        )

    def restore_model(self, checkpoint: Checkpoint) -> None:
        """The patch, LoRA adapter and trained weights in force at the checkpoint."""
        meta, model = checkpoint.meta, self.trainee.model
        if meta["spec"]:
            apply_spec(model, meta["spec"], "patch")
        if meta["lora"] is not None:
            attach_lora(self.trainee, LoraConfig(**meta["lora"]), f"stages[{meta['stage']}]")
        params, saved = named_weights(model), checkpoint.model_state()
        missing = sorted(set(saved) - set(params))
        if missing:
            raise RecipeError(f"checkpoint {str(checkpoint.path)!r} holds weights this model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    # ---- one stage ----------------------------------------------------------------------------------

    def run_stage(self, index: int) -> bool:
        """Train stage `index` to its end (True), or until `max_steps` (False)."""
        recipe, stage, where = self.recipe, self.recipe.stages[index], f"stages[{index}]"
        model = self.trainee.model
        resuming = self.checkpoint is not None and int(self.checkpoint.meta["stage"]) == index
        if not resuming:
            enter(model, stage, where)
        plan = configure(self.trainee, stage, where)
        self.trained |= set(plan.params)
        per_step = stage.seq_len * stage.batch_size * stage.grad_accum * self.dp_world
        total = stage.total_steps(per_step)
        optimizer = build_optimizer(plan, stage)
        scheduler = build_scheduler(optimizer, stage.schedule, total)
        loader = stage_loader(recipe, index, self.tokenizer, self.dp_rank, self.dp_world)
        first = 0
        if resuming:
            first = int(self.checkpoint.meta["stage_step"])
            saved = self.checkpoint.train_state()
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            rank_state = self.checkpoint.rank_state(self.rank)
            loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
        elif self.data_state is not None:
            loader.load_state_dict(self.data_state)
        self.accelerator.gradient_accumulation_steps = stage.grad_accum
        module, optimizer = self.accelerator.prepare(self.trainee.module, optimizer)
        bar = tqdm(total=total, initial=first, desc=stage.name, disable=not self.main, dynamic_ncols=True)
        losses: dict[str, float] = {}
        try:
            for stage_step in range(first, total):
                losses = self.train_step(module, optimizer, scheduler, loader, plan, stage, index, stage_step)
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                at_end = stage_step + 1 == total
                stop = (
                    self.max_steps is not None
                    and self.step >= self.max_steps
                    and not (at_end and index == len(recipe.stages) - 1)
                )
                every = recipe.output.checkpoint_every
                if (every and self.step % every == 0) or stop:
                    self.save(index, stage_step + 1, optimizer, scheduler, loader)
                if stop:
                    return False
        finally:
            bar.close()
            del module
            self.accelerator.free_memory()
        self.data_state = loader.state_dict()
        self.stage_rows.append(
            {
                "name": stage.name,
                "train": stage.train,
                "steps": total,
                "trainable_parameters": sum(p.numel() for p in plan.params.values()),
                "last_loss": losses.get("loss"),
            }
        )
        if stage.finalize:
            finalize(model)
        return True

    def train_step(
        self,
        module: nn.Module,
        optimizer: Any,
        scheduler: Any,
        loader: PackedLoader,
        plan: StagePlan,
        stage: StageConfig,
        index: int,
        stage_step: int,
    ) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; logs and returns the step's metrics."""
        accelerator, model = self.accelerator, self.trainee.model
        started = time.perf_counter()
        module.train()
        names = ["loss", *(f"loss/{name}" for name in stage.losses)]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        for _ in range(stage.grad_accum):
            try:
                batch = next(loader)
            except StopIteration:
                raise RecipeError(f"stages[{index}]: the data ran out at step {stage_step}") from None
            batch, inputs, shift_labels = cp_inputs(model, batch, accelerator.device)
            with accelerator.accumulate(module):
                outputs = module(**inputs)
                if shift_labels is not None:
                    outputs["loss"] = cp_loss(outputs.logits, shift_labels, cp_runtime(model).mesh.cp)
                total, terms = combine(outputs, model, stage.losses, plan.aux)
                accelerator.backward(total)
            values = [total, *(terms[name] for name in stage.losses)]
            sums[:-1] += torch.stack([v.detach().double().cpu() for v in values])
            sums[-1] += batch["input_ids"].numel()
        clip = stage.grad_clip or math.inf
        grad_norm = accelerator.clip_grad_norm_(list(plan.params.values()), clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        step_tokens = int(sums[-1])
        self.step += 1
        self.tokens += step_tokens
        seconds = time.perf_counter() - started
        row = {name: float(v) / (stage.grad_accum * self.world) for name, v in zip(names, sums[:-1])}
        row.update(
            {
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": self.tokens,
                "tokens_per_s": step_tokens / seconds,
            }
        )
        self.metrics.log(row, self.step, stage=stage.name)
        if self.evaluator is not None and self.main:
            with suspended(model):
                self.evaluator.on_step(self.step, model, lambda m, s: self.metrics.log(m, s, stage=stage.name))
        return row

    # ---- checkpoints, eval, outputs -----------------------------------------------------------------

    def save(self, index: int, stage_step: int, optimizer: Any, scheduler: Any, loader: PackedLoader) -> None:
        model = self.trainee.model
        meta = {
            "step": self.step,
            "stage": index,
            "stage_name": self.recipe.stages[index].name,
            "stage_step": stage_step,
            "tokens": self.tokens,
            "world_size": self.world,
            "spec": current_spec(model),
            "lora": None if self.trainee.lora is None else asdict(self.trainee.lora),
            "trained": sorted(self.trained),
        }
        save_checkpoint(
            checkpoint_root(self.out),
            meta,
            model_state=lambda: {n: p.detach().cpu() for n, p in named_weights(model).items() if n in self.trained},
            train_state=lambda: {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            rank_state={"rng": rng_state(), "data": loader.state_dict()},
            rank=self.rank,
            barrier=self.accelerator.wait_for_everyone,
            keep=self.recipe.output.keep,
        )

    def build_probes(self) -> list[Any]:
        """The recipe's `lcplug.eval` probes (empty: no evaluation), and the haystack they share (read once)."""
        from ..eval import Haystack, build_probes

        cfg = self.recipe.eval
        self.haystack = Haystack()
        if not cfg.probes:
            return []
        return build_probes(cfg.probes, lengths=cfg.lengths, samples=cfg.samples, seed=self.recipe.seed)

    def build_evaluator(self) -> Any:
        """The `lcplug.eval` callback that runs the probes every `eval.every` steps (None: only before and after)."""
        if not self.probes or not self.recipe.eval.every:
            return None
        from ..eval import EvalCallback

        return EvalCallback(self.probes, self.recipe.eval.every, tokenizer=self.tokenizer, haystack=self.haystack)

    def evaluate(self, when: str) -> None:
        """The probes before or after training (rank 0), logged at the current step."""
        if not self.probes or not self.main:
            return
        from ..eval import evaluate, metrics

        with suspended(self.trainee.model):  # rank 0 evaluates alone: no cp collectives
            result = evaluate(
                self.trainee.model, self.probes, tokenizer=self.tokenizer, haystack=self.haystack, label=when
            )
        self.eval_results[when] = metrics(result)
        self.eval_reports.append(result)
        self.metrics.log(self.eval_results[when], self.step, stage=when)

    def write_eval_report(self) -> None:
        """`eval/`: the before/after results side by side (results.json, table.txt, heatmap and perplexity PNGs)."""
        if not self.eval_reports or not self.main:
            return
        from ..eval import format_table, write_report

        write_report(self.eval_reports, self.out / "eval")
        (self.out / "eval" / "table.txt").write_text(format_table(self.eval_reports) + "\n")

    def save_final(self) -> None:
        """`final/`, Hub-ready (weights, config with the manifest, model card; LoRA merged or removed, as
        output.lora says), and `adapter/` if kept."""
        trainee, mode = self.trainee, self.recipe.output.lora
        if trainee.peft is not None:
            if mode in ("adapter", "both") and self.main:
                trainee.peft.save_pretrained(self.out / "adapter")
            trainee.model = trainee.peft.merge_and_unload() if mode in ("merge", "both") else trainee.peft.unload()
            trainee.peft = None
        if self.main:
            save_pretrained(trainee.model, self.out / "final")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.out / "final")
            state = patch_state(trainee.model)
            write_model_card(
                self.out / "final",
                None if state is None else state.manifest,
                title=self.recipe.name,
                base_model=self.recipe.base.model,
                recipe=self.recipe.to_dict(),
                eval_results=self.eval_reports,
                eval_dir=self.out / "eval",
            )
        self.accelerator.wait_for_everyone()

    def write_recipe(self) -> None:
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def finish(self, started: float, *, complete: bool) -> dict[str, Any]:
        state = patch_state(self.trainee.model)
        summary = {
            "name": self.recipe.name,
            "status": "complete" if complete else "stopped",
            "steps": self.step,
            "tokens": self.tokens,
            "seconds": round(time.perf_counter() - started, 3),
            "world_size": self.world,
            "resumed_from": None if self.checkpoint is None else str(self.checkpoint.path),
            "output": str(self.out),
            "stages": self.stage_rows,
            "final": str(self.out / "final") if complete else None,
            "adapter": str(self.out / "adapter") if (self.out / "adapter").is_dir() else None,
            "eval": self.eval_results,
            "manifest": None if state is None else state.manifest,
        }
        if self.main:
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary


def check_sharding(distributed_type: Any) -> None:
    """Refuse sharded-weight launches (FSDP, DeepSpeed): checkpoints and the final save gather unsharded
    parameters on rank 0, which would write a shard as if it were the model."""
    if str(distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise RecipeError(
            f"launch: {distributed_type} shards the weights, and lcplug's runner saves unsharded checkpoints only "
            "(sharded saving is not built yet); launch with data parallelism (DDP), e.g. accelerate launch "
            "--multi_gpu, or plan the run with `lcplug plan`"
        )


def check_resumable(checkpoint: Checkpoint, recipe: Recipe, world: int) -> None:
    """A checkpoint resumes only the recipe (its stages) and world size that wrote it."""
    meta, where = checkpoint.meta, f"checkpoint {str(checkpoint.path)!r}"
    index = int(meta["stage"])
    if index >= len(recipe.stages) or recipe.stages[index].name != meta["stage_name"]:
        raise RecipeError(f"{where} is in stage {meta['stage_name']!r}, which is not stages[{index}] of this recipe")
    if int(meta["world_size"]) != world:
        raise RecipeError(f"{where} was written by {meta['world_size']} processes; resume it with as many, not {world}")


def build_optimizer(plan: StagePlan, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the stage's parameters; weight decay only on matrices (not norms, biases, gates, sink logits)."""
    decay = [p for p in plan.params.values() if p.ndim >= 2]
    flat = [p for p in plan.params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": flat, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr)
