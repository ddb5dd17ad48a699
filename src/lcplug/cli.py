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
LISTED_KINDS = (*KINDS, "adapter")
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


def _seq_len(value: str) -> int:
    """argparse type of `--seq-len`: long enough that the padded row keeps real tokens."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 4, got {value!r}") from None
    if n < 4:
        raise argparse.ArgumentTypeError(f"expected an integer >= 4, got {n}")
    return n


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


# ---- entry point -----------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (add_plugins, add_check)
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
