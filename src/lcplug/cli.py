"""`lcplug ...`: the command line.

Every subcommand is one `add_<name>(subparsers)` function that builds its parser and sets its handler;
`COMMANDS` lists them, so a new subcommand (train, eval, publish, ...) is one function plus one entry.
User errors (any `LcplugError`, argparse's own included) print one line, `lcplug: error: <message>`, and
exit with 2; `--debug` adds the traceback. `main` returns the exit code so tests can call it in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import torch
from torch import nn

from . import manifest_of, patch, unpatch
from ._version import __version__
from .errors import LcplugError, did_you_mean
from .plugin import KINDS
from .registry import get_registry, plugin_rows
from .spec import PatchSpec

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
LISTED_KINDS = (*KINDS, "placement", "adapter")
"""Kinds `lcplug plugins` shows, in this order: the kinds a spec names, then model-family adapters."""


class CLIError(LcplugError):
    """A user error the CLI finds itself (a bad option, a missing directory): reported like any LcplugError."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are LcplugErrors, so they print as one line like every other."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ---- lcplug plugins --------------------------------------------------------------------------------


def _kind(value: str) -> str:
    """argparse type of `--kind`: a kind `lcplug plugins` lists, or an error suggesting the closest."""
    if value not in LISTED_KINDS:
        raise argparse.ArgumentTypeError(f"unknown plugin kind {value!r}; {did_you_mean(value, LISTED_KINDS)}")
    return value


def add_plugins(subparsers: Subparsers) -> None:
    """`lcplug plugins`: what is installed, so users can write specs without reading source."""
    p = subparsers.add_parser(
        "plugins",
        help="list installed plugins with their origin, version and parameters",
        description="List every registered plugin: name, kind, origin distribution, version, parameters.",
    )
    p.add_argument("--kind", type=_kind, help=f"only plugins of this kind ({', '.join(LISTED_KINDS)})")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(handler=run_plugins)


def run_plugins(args: argparse.Namespace) -> int:
    """Print the listing; `--json` gives exactly `lcplug.list_plugins()` for scripts."""
    rows = plugin_rows(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_plugins(rows, get_registry().skipped) if rows else f"no {args.kind} plugins installed")
    return 0


def format_plugins(rows: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> str:
    """The human listing: plugins grouped by kind, each with its summary and one aligned line per parameter."""
    lines: list[str] = []
    for kind in LISTED_KINDS:
        group = [row for row in rows if row["kind"] == kind]
        if not group:
            continue
        lines.append(f"{kind}:")
        for row in group:
            lines.append(f"  {row['name']}  ({row['origin']} {row['version']})")
            if row["summary"]:
                lines.append(f"      {row['summary']}")
            heads = [_param_head(p) for p in row["params"]]
            width = max((len(h) for h in heads), default=0)
            for head, p in zip(heads, row["params"]):
                note = p["help"] + (f" [{p['valid']}]" if p["valid"] else "")
                lines.append(f"      {head:<{width}}  {note}".rstrip())
    if skipped:
        lines.append("skipped entry points: " + ", ".join(f"{name} ({why})" for name, why in skipped))
    return "\n".join(lines)


def _param_head(p: dict[str, Any]) -> str:
    value = "(required)" if p["required"] else f"= {_spec_value(p['default'])}"
    return f"{p['name']}: {p['type']} {value}"


def _spec_value(value: Any) -> str:
    """A default as a user writes it in a compact spec (`none`, `true`, lists space-separated)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(_spec_value(v) for v in value)
    return str(value)


# ---- lcplug check ----------------------------------------------------------------------------------


def _at_least(minimum: int) -> Callable[[str], int]:
    """argparse type of an integer >= `minimum`, with a one-line error naming the bad value."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {n}")
        return n

    return parse


_seq_len = _at_least(4)  # `--seq-len`: long enough that the padded probe row keeps real tokens
_positive = _at_least(1)


def add_check(subparsers: Subparsers) -> None:
    """`lcplug check`: does a spec apply to this checkpoint, what does it change, and does unpatch undo it?"""
    p = subparsers.add_parser(
        "check",
        help="apply a spec to a local checkpoint and probe parity and the unpatch round trip",
        description=(
            "Load MODEL_DIR (fp32, CPU), run a seeded token batch (one row left-padded) through the unpatched "
            "model, each plugin alone, and the whole spec; report the max |logit diff| over real tokens, whether "
            "unpatch restores bit-identical logits, and the manifest. Exit 1 if a round trip is not "
            "bit-identical, logits are not finite, or `full` attention alone changes logits."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="a local checkpoint directory")
    p.add_argument("--attention", metavar="SPEC", help="attention plugin spec, e.g. 'sliding-window:window=4096'")
    p.add_argument("--rope", metavar="SPEC", help="RoPE plugin spec, e.g. 'yarn:factor=8'")
    p.add_argument("--kv", metavar="SPEC", help="KV-cache plugin spec")
    p.add_argument("--layers", metavar="SEL", help="layers the attention plugin patches, e.g. '0-3,8' or '5:1'")
    p.add_argument("--seq-len", type=_seq_len, default=64, help="tokens per probe row (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe tokens (default: 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_check)


@dataclass
class ProbeResult:
    """One patch of the model: whether it applied, how far it moved the logits, whether unpatch undid it."""

    label: str
    applied: bool
    parity_expected: bool = False
    max_abs_diff: float | None = None
    round_trip: bool | None = None
    manifest: dict[str, Any] | None = None
    error: str | None = None

    def failures(self) -> list[str]:
        """Why this probe fails, one line each; a plugin that cannot apply alone is reported, not failed."""
        if not self.applied:
            return []
        out = []
        if not self.round_trip:
            out.append(f"{self.label}: unpatch did not restore bit-identical logits")
        if not math.isfinite(self.max_abs_diff):
            out.append(f"{self.label}: patched logits are not finite")
        elif self.parity_expected and self.max_abs_diff != 0:
            out.append(f"{self.label}: full attention changed the logits (max |diff| {self.max_abs_diff:.3e})")
        return out


def run_check(args: argparse.Namespace) -> int:
    """Probe the spec on the checkpoint; exit 1 (not 2) on a failed probe, since the input itself was valid."""
    if not args.model_dir.is_dir():
        raise CLIError(f"MODEL_DIR {str(args.model_dir)!r} is not a directory")
    spec = _validated_spec(args)
    model = _load_model(args.model_dir)
    batch = probe_batch(model.config.get_text_config().vocab_size, args.seq_len, args.seed)
    baseline = _logits(model, batch)
    results = []
    for label, pspec in _probes(spec):
        try:
            results.append(_probe(label, model, pspec, batch, baseline))
        except LcplugError as exc:
            if pspec is spec:  # the spec as given must apply; a plugin alone may need its partners
                raise
            results.append(ProbeResult(label, applied=False, error=str(exc)))
    failures = [f for r in results for f in r.failures()]
    report = {
        "model_dir": str(args.model_dir),
        "model_class": type(model).__name__,
        "batch": list(batch["input_ids"].shape),
        "left_padding": int((batch["attention_mask"][1] == 0).sum()),
        "seed": args.seed,
        "probes": [{k: v for k, v in asdict(r).items() if k != "manifest"} for r in results],
        "manifest": results[-1].manifest,
        "passed": not failures,
        "failures": failures,
    }
    print(json.dumps(report, indent=2) if args.json else format_check(report))
    return 0 if not failures else 1


def _validated_spec(args: argparse.Namespace) -> PatchSpec:
    """The spec from the options, with plugin names and params checked before the (slow) model load."""
    spec = PatchSpec.build(attention=args.attention, rope=args.rope, kv=args.kv, layers=args.layers)
    if not spec:
        raise CLIError("nothing to check: give at least one of --attention, --rope, --kv")
    registry = get_registry()
    for kind, plugin_spec in spec.plugins.items():
        registry.get(kind, plugin_spec.name).build(plugin_spec.params)
    return spec


def _load_model(model_dir: Path) -> nn.Module:
    """AutoModelForCausalLM in fp32 on CPU, without progress bars; a directory it cannot load is a user error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load a causal LM from {str(model_dir)!r}: {str(exc).splitlines()[0]}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def probe_batch(vocab_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Two seeded rows, the second left-padded by a quarter; position ids count real tokens, as `generate` does."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (2, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, : seq_len // 4] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward pass without autograd: the probe only compares outputs."""
    with torch.no_grad():
        return model(**batch).logits


def _probes(spec: PatchSpec) -> list[tuple[str, PatchSpec]]:
    """Each plugin alone (so a diff can be traced to one plugin), then the whole spec; just the spec if one."""
    solos = [(f"{kind} {ps}", PatchSpec({kind: ps}, spec.layers)) for kind, ps in spec.plugins.items()]
    if len(solos) == 1:
        return [(solos[0][0], spec)]
    return [*solos, ("combined", spec)]


def _probe(
    label: str, model: nn.Module, spec: PatchSpec, batch: dict[str, torch.Tensor], baseline: torch.Tensor
) -> ProbeResult:
    patch(model, spec)
    try:
        patched = _logits(model, batch)
        record = manifest_of(model)
    finally:
        unpatch(model)
    restored = _logits(model, batch)
    real = batch["attention_mask"].bool()  # padded queries' logits are never used, so they are not compared
    only = {kind: ps.name for kind, ps in spec.plugins.items()}
    return ProbeResult(
        label,
        applied=True,
        parity_expected=only == {"attention": "full"},
        max_abs_diff=(patched[real] - baseline[real]).abs().max().item(),
        round_trip=_bit_identical(restored, baseline),
        manifest=record,
    )


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaNs in the same places and with the same payload count as equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def format_check(report: dict[str, Any]) -> str:
    """The human report: one row per probe, the manifest, then PASS or the failures."""
    batch, pad = report["batch"], report["left_padding"]
    lines = [
        f"{report['model_dir']}: {report['model_class']}, probe batch {batch[0]}x{batch[1]} "
        f"(row 1 left-padded by {pad}), seed {report['seed']}"
    ]
    table = [("probe", "applied", "max |logit diff|", "unpatch")]
    for probe in report["probes"]:
        if probe["applied"]:
            diff = probe["max_abs_diff"]
            shown = "0" if diff == 0 else f"{diff:.3e}"
            table.append(
                (probe["label"], "yes", shown, "bit-identical" if probe["round_trip"] else "NOT bit-identical")
            )
        else:
            table.append((probe["label"], "no", "-", f"cannot apply alone: {probe['error']}"))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in table]
    lines.append("manifest:")
    lines.append(json.dumps(report["manifest"], indent=2))
    lines += ["PASS"] if report["passed"] else [f"FAIL: {failure}" for failure in report["failures"]]
    return "\n".join(lines)


# ---- lcplug rope-search ----------------------------------------------------------------------------


def add_rope_search(subparsers: Subparsers) -> None:
    """`lcplug rope-search`: LongRoPE's evolutionary search of per-dimension rope factors for a checkpoint."""
    from .rope_search import SearchSettings

    defaults = SearchSettings()
    p = subparsers.add_parser(
        "rope-search",
        help="search LongRoPE per-dimension rescale factors for a target length (evolutionary, by perplexity)",
        description=(
            "Load MODEL_DIR, cut calibration samples of --target-length tokens from --data (a text file or a "
            "directory; default: the Python standard library's source), and evolve per-dimension rope rescale "
            "factors (population, mutation, crossover; non-decreasing from high to low frequency) that minimise "
            "the perplexity of the model patched with `longrope`. Prints the perplexities (no extension, PI, "
            "found) and the longrope spec; --output writes the spec as JSON for lcplug.patch(model, rope=...)."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="a local checkpoint directory")
    p.add_argument("--target-length", type=_positive, required=True, help="tokens per calibration sample")
    p.add_argument("--data", type=Path, help="text file or directory of calibration text (default: stdlib source)")
    p.add_argument("--samples", type=_positive, default=4, help="calibration samples (default: 4)")
    p.add_argument("--original-length", type=_positive, help="trained length L (default: max_position_embeddings)")
    p.add_argument("--population", type=_positive, default=defaults.population, help="candidates kept per generation")
    p.add_argument("--generations", type=int, default=defaults.generations, help="generations of evolution")
    p.add_argument("--mutations", type=int, default=defaults.mutations, help="mutated children per generation")
    p.add_argument("--crossovers", type=int, default=defaults.crossovers, help="crossed children per generation")
    p.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help="samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the search (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--output", type=Path, help="write the found longrope spec to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_rope_search)


def run_rope_search(args: argparse.Namespace) -> int:
    """Run the search and report; the spec goes to stdout (and --output), the progress bar to stderr."""
    from .rope_search import SearchSettings, load_samples, load_tokenizer, search_longrope

    if not args.model_dir.is_dir():
        raise CLIError(f"MODEL_DIR {str(args.model_dir)!r} is not a directory")
    settings = SearchSettings(
        population=args.population,
        generations=args.generations,
        mutations=args.mutations,
        crossovers=args.crossovers,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    settings.validate()
    tokenizer = load_tokenizer(args.model_dir)
    model = _load_model(args.model_dir).to(args.device)
    vocab = model.config.get_text_config().vocab_size
    if tokenizer is None and vocab < 256:
        raise CLIError(f"MODEL_DIR has no tokenizer and a vocabulary of {vocab} < 256, so bytes cannot be its tokens")
    samples = load_samples(args.data, args.target_length, args.samples, tokenizer=tokenizer, seed=args.seed)
    result = search_longrope(
        model, samples, original_length=args.original_length, settings=settings, progress=not args.no_progress
    )
    if args.output is not None:
        args.output.write_text(json.dumps(result.spec, indent=2) + "\n")
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    ppl = result.baselines
    print(
        f"perplexity at {args.target_length} tokens ({args.samples} samples): no extension {ppl['none']:.4f}, "
        f"PI (linear factor {result.spec['factor']:g}) {ppl['linear']:.4f}, longrope found {result.perplexity:.4f} "
        f"({result.evaluations} candidates, {result.seconds:.1f} s)"
    )
    print(json.dumps(result.spec))
    return 0


# ---- lcplug eval -----------------------------------------------------------------------------------


def _number_list(kind: type) -> Callable[[str], list]:
    """argparse type of comma-separated numbers (`256,512,1024`); the probes check the values themselves."""

    def parse(value: str) -> list:
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {value!r}") from None

    return parse


def add_eval(subparsers: Subparsers) -> None:
    """`lcplug eval`: long-context retrieval and perplexity of one or more checkpoints, side by side."""
    p = subparsers.add_parser(
        "eval",
        help="long-context probes (passkey, needle grid, multi-key, perplexity) with a table, JSON and plots",
        description=(
            "Load each MODEL with lcplug.from_pretrained (fp32; a manifest's patches are re-applied, so long "
            "contexts run through its sparse attention and KV tiers), run the probes over every length (and "
            "needle depth), print a table with the models side by side, and with --out write results.json, "
            "heatmap_<probe>.png (accuracy over depth x length) and ppl.png. Lengths beyond a model's "
            "max_position_embeddings are run and marked, not clipped. See docs/eval.md."
        ),
    )
    p.add_argument("models", metavar="MODEL", nargs="+", help="a checkpoint directory or Hub repo id")
    p.add_argument(
        "--probes",
        default="passkey,needle,multikey,ppl",
        metavar="LIST",
        help="comma-separated probes (default: all four)",
    )
    p.add_argument(
        "--lengths",
        type=_number_list(int),
        default=[1024, 2048, 4096],
        metavar="LIST",
        help="prompt lengths in tokens (default: 1024,2048,4096)",
    )
    p.add_argument(
        "--depths",
        type=_number_list(float),
        default=[0, 0.25, 0.5, 0.75, 1],
        metavar="LIST",
        help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--samples", type=int, default=4, help="trials per (length, depth) cell (default: 4)")
    p.add_argument("--keys", type=int, default=4, help="needles in the multi-key probe (default: 4)")
    p.add_argument(
        "--haystack", type=Path, metavar="PATH", help="text file or directory of filler text (default: stdlib source)"
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write results.json and the PNG plots into this directory")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, depths and text windows (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Validate the probes and the haystack first (before any model loads), then evaluate each model in turn."""
    from .eval import Haystack, build_probes, evaluate, format_table, load_for_eval, report, write_report
    from .eval.report import PlotError

    probes = build_probes(
        args.probes, lengths=args.lengths, depths=args.depths, samples=args.samples, seed=args.seed, keys=args.keys
    )
    haystack = Haystack(args.haystack)
    if any(probe.needs_haystack for probe in probes):
        _ = haystack.text  # an empty source fails now, not after the first model has run
    results = []
    for ref in args.models:
        model, tokenizer = load_for_eval(ref, args.device)
        results.append(
            evaluate(model, probes, tokenizer=tokenizer, haystack=haystack, label=ref, progress=not args.no_progress)
        )
        del model
    print(json.dumps(report(results), indent=2) if args.json else format_table(results))
    if args.out is not None:
        try:
            files = write_report(results, args.out)
        except PlotError as exc:
            print(f"lcplug: warning: {exc}; wrote results.json only", file=sys.stderr)
            files = {"results": args.out / "results.json"}
        print("wrote " + ", ".join(str(path) for path in files.values()), file=sys.stderr)
    return 0


# ---- lcplug data ------------------------------------------------------------------------------------


def add_data(subparsers: Subparsers) -> None:
    """`lcplug data preview`: what mixture a recipe's data pipeline really produces."""
    p = subparsers.add_parser("data", help="training data: preview a recipe's realised mixture")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = actions.add_parser(
        "preview",
        help="run a recipe's data pipeline and print the realised mixture with a length histogram (and a PNG)",
        description=(
            "Build the pipeline of RECIPE's data: section (sources, mixture, lengths, seed), draw batches until "
            "--tokens tokens, and print tokens per source against the target weights, documents, skipped files, "
            "padding and a document-length histogram per source; write the histogram as a PNG. See docs/data.md."
        ),
    )
    preview.add_argument("recipe", metavar="RECIPE", type=Path, help="a YAML recipe with a data: section")
    preview.add_argument(
        "--tokens", type=_positive, default=1 << 20, help="tokens to draw, padding included (default: 1048576)"
    )
    preview.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or 'bytes' (default: the recipe's)")
    preview.add_argument(
        "--png", type=Path, metavar="PATH", help="where to write the histogram (default: ./<recipe>-lengths.png)"
    )
    preview.add_argument("--json", action="store_true", help="print the report as JSON")
    preview.set_defaults(handler=run_data_preview)


def run_data_preview(args: argparse.Namespace) -> int:
    """Preview the mixture; a missing matplotlib only skips the PNG, with a warning."""
    from .data import PackedLoader
    from .data.preview import format_preview, preview, write_histogram
    from .eval.report import PlotError

    report = preview(PackedLoader(args.recipe, tokenizer=args.tokenizer), args.tokens)
    print(json.dumps(report, indent=2) if args.json else format_preview(report))
    png = args.png if args.png is not None else Path(f"{args.recipe.stem}-lengths.png")
    try:
        print(f"wrote {write_histogram(report, png)}", file=sys.stderr)
    except PlotError as exc:
        print(f"lcplug: warning: {exc}; no PNG written", file=sys.stderr)
    return 0


# ---- lcplug train -----------------------------------------------------------------------------------


def _resume(value: str) -> str:
    """argparse type of `--resume`: 'auto' or an existing checkpoint directory."""
    if value != "auto" and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a checkpoint directory, got {value!r}")
    return value


def add_train(subparsers: Subparsers) -> None:
    """`lcplug train`: run a retrofit recipe (also under `accelerate launch -m lcplug train ...`)."""
    p = subparsers.add_parser(
        "train",
        help="run a retrofit recipe: patch a base model, train its stages, save it with its manifest",
        description=(
            "Validate RECIPE fully (schema, plugins, the model's config, each stage rehearsed on a meta-device "
            "copy, the data) before any compute, then load the base model, patch it and train the stages under "
            "Accelerate, writing metrics.jsonl, TensorBoard logs, resumable checkpoints and final/ (reload with "
            "lcplug.from_pretrained) into output.dir. Several processes: accelerate launch -m lcplug train RECIPE. "
            "See docs/train.md."
        ),
    )
    p.add_argument("recipe", metavar="RECIPE", type=Path, help="a YAML retrofit recipe")
    p.add_argument(
        "--resume",
        type=_resume,
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint in output.dir (auto) or from PATH",
    )
    p.add_argument("--max-steps", type=_positive, metavar="N", help="stop after N steps in all, with a checkpoint")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train; rank 0 prints the summary's headline to stderr, where the progress bars go too."""
    from accelerate import PartialState

    from .train import train

    summary = train(args.recipe, resume=args.resume, max_steps=args.max_steps)
    if PartialState().is_main_process:
        done = summary["final"] or f"stopped early, resume with --resume auto; output in {summary['output']}"
        print(f"lcplug train: {summary['steps']} steps, {summary['tokens']} tokens; {done}", file=sys.stderr)
    return 0


# ---- lcplug plan ------------------------------------------------------------------------------------


def add_plan(subparsers: Subparsers) -> None:
    """`lcplug plan`: what a recipe's run takes, stage by stage, before any weight or GPU; with --gpus, how
    to shard one long sequence over them (the context-parallel planner)."""
    p = subparsers.add_parser(
        "plan",
        help="a recipe's run on the meta device (stages, memory per device), or a context-parallel plan (--gpus)",
        description=(
            "Build RECIPE's model on the meta device (no weights; base.config or a local base.model gives the "
            "config), apply its patch and walk its stages as a run would: the patch each stage trains with, the "
            "trainable parameters by group, steps and tokens, the lr schedule, the attention each layer runs, and "
            "the memory per device (weights, gradients, AdamW states, gathered FSDP weights, activations, "
            "attention, logits), with a warning where a stage exceeds an 80 GiB device. See docs/recipes.md. "
            "With --gpus (and --model CONFIG, or RECIPE for its model, patch and last seq_len): per context-parallel "
            "strategy (ring, ulysses, allgather, hybrid) the bytes each GPU moves, their time on the topology, how "
            "much hides behind attention, memory per GPU, and a recommendation. See docs/plan.md."
        ),
    )
    p.add_argument("recipe", metavar="RECIPE", type=Path, nargs="?", help="a YAML recipe")
    p.add_argument(
        "--world-size", type=_positive, help="devices of the run (default: the recipe's cp.degree, the fewest it needs)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    cp = p.add_argument_group("context-parallel planner (with --gpus)")
    cp.add_argument("--model", metavar="CONFIG", help="a shipped config name (e.g. Llama-3.1-8B), config.json or dir")
    cp.add_argument("--seq-len", type=_positive, help="tokens per sequence (default with RECIPE: its last stage's)")
    cp.add_argument("--gpus", type=_positive, help="GPUs each sequence is sharded over (the cp degree)")
    cp.add_argument("--gpus-per-node", type=_positive, default=8, help="GPUs sharing NVLink (default 8)")
    cp.add_argument("--intra-bw", type=float, default=450.0, help="GB/s per GPU inside a node (default 450, H100)")
    cp.add_argument("--inter-bw", type=float, default=50.0, help="GB/s per GPU across nodes (default 50: 400 Gb/s)")
    cp.add_argument("--memory-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    cp.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOP/s per GPU (default 400: ~40%% MFU)")
    cp.add_argument("--attention", metavar="SPEC", help="attention plugin spec, e.g. 'sliding-window:window=4096'")
    cp.add_argument("--batch", type=_positive, default=1, help="sequences per GPU group per step (default 1)")
    cp.add_argument("--forward-only", action="store_true", help="plan a forward pass (scoring), not a training step")
    cp.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations for backward")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; a stage over the device's memory is a warning in it, not a failure."""
    if args.gpus is not None or args.model is not None:
        return run_cp_plan(args)
    if args.recipe is None:
        raise CLIError("lcplug plan needs RECIPE, or --model CONFIG --seq-len N --gpus G (see 'lcplug plan --help')")
    from .train.plan import plan

    result = plan(args.recipe, world_size=args.world_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def run_cp_plan(args: argparse.Namespace) -> int:
    """The context-parallel plan of `--model` (or RECIPE's model, patch and last sequence length)."""
    from .cp.planner import Job, Topology, plan_cp, recipe_shape, skeleton_shape

    if (args.recipe is None) == (args.model is None):
        raise CLIError("the context-parallel plan takes RECIPE or --model CONFIG (one of them)")
    if args.gpus is None:
        raise CLIError("the context-parallel plan needs --gpus G (the GPUs one sequence is sharded over)")
    if args.model is not None:
        if args.seq_len is None:
            raise CLIError("the context-parallel plan of --model needs --seq-len N (tokens per sequence)")
        shape, seq_len = skeleton_shape(args.model, args.attention), args.seq_len
    else:
        if args.attention is not None:
            raise CLIError("--attention goes with --model; a RECIPE's patch gives its attention")
        shape, last = recipe_shape(args.recipe)
        seq_len = args.seq_len or last
    topology = Topology(args.gpus, args.gpus_per_node, args.intra_bw, args.inter_bw, args.memory_gib, args.tflops)
    job = Job(seq_len, args.batch, train=not args.forward_only, checkpointing=not args.no_checkpointing)
    result = plan_cp(shape, topology, job)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


# ---- lcplug publish ---------------------------------------------------------------------------------


def add_publish(subparsers: Subparsers) -> None:
    """`lcplug publish`: push a saved checkpoint (or a training run's final/) to the Hub with a model card."""
    p = subparsers.add_parser(
        "publish",
        help="upload a checkpoint with its manifest, tokenizer and a model card to a Hub repo",
        description=(
            "Upload DIR (saved with lcplug.save_pretrained, or a training run's final/) to the Hub repo REPO_ID: "
            "safetensors weights and/or a PEFT adapter, config.json with the manifest, generation config, tokenizer, "
            "and a model card (plugin stack, recipe, data mixture, evaluation table and plots, how to load it). "
            "The token comes from --token, HF_TOKEN or `hf auth login`. See docs/hub.md."
        ),
    )
    p.add_argument("directory", metavar="DIR", type=Path, help="the checkpoint directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, 'owner/name' (created if missing)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_true", default=True, help="create the repo private (default)"
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--message", metavar="TEXT", help="commit message (default: names the plugin stack)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    p.add_argument("--license", help="license id for the card metadata, e.g. apache-2.0")
    p.add_argument("--base-model", metavar="REPO_ID", help="base model for the card (default: the run recipe's)")
    p.add_argument("--recipe", type=Path, metavar="PATH", help="recipe for the card (default: a run's recipe.yaml)")
    p.add_argument(
        "--eval-dir", type=Path, metavar="DIR", help="results.json and plots for the card (default: a run's eval/)"
    )
    p.add_argument("--dry-run", action="store_true", help="list the files with sizes and upload nothing")
    p.set_defaults(handler=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    """Publish; the dry run's listing goes to stdout, the published repo's URL to stderr."""
    from .hub import publish

    result = publish(
        args.directory,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
        token=args.token,
        license=args.license,
        base_model=args.base_model,
        recipe=args.recipe,
        eval_dir=args.eval_dir,
        dry_run=args.dry_run,
    )
    if not result.dry_run:
        print(f"published {len(result.files)} files to {result.commit_url} ({result.revision})", file=sys.stderr)
    return 0


# ---- entry point -----------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_plugins,
    add_check,
    add_rope_search,
    add_eval,
    add_data,
    add_train,
    add_plan,
    add_publish,
)
"""One `add_<name>` per subcommand; each builds its parser and sets `handler` (Namespace -> exit code)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with global flags and every subcommand in `COMMANDS`."""
    parser = _Parser(prog="lcplug", description="Give any Hugging Face causal LM a long context with plugins.")
    parser.add_argument("--version", action="version", version=f"lcplug {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback with errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lcplug` with `argv` (default: sys.argv[1:]) and return the exit code: 0 ok, 1 check failed, 2 error."""
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exc:  # --help and --version print, then exit through argparse
        return int(exc.code or 0)
    except LcplugError as exc:
        if args is not None and args.debug:
            traceback.print_exc()
        print(f"lcplug: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
