"""Run probes on a model: the Python API behind `lcplug eval` and the training callback.

`evaluate` takes any model the probes can call (a transformers causal LM, patched or not, or a test
double with `generate` and a forward returning `.logits`), puts an `nn.Module` in eval mode for the
run and restores its training mode after, and returns one JSON-ready result per model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import LcplugError
from .haystack import Haystack
from .probes import Probe, build_probes, config_value, max_positions
from .tokens import ByteTokenizer, Tokenizer, as_tokenizer, check_byte_vocab, load_tokenizer


class EvalLoadError(LcplugError, ValueError):
    """A model to evaluate is not a loadable causal LM checkpoint."""


def evaluate(
    model: Any,
    probes: str | Sequence[Probe] = "passkey,needle,multikey,ppl",
    *,
    tokenizer: Any = None,
    haystack: Haystack | str | os.PathLike | None = None,
    label: str = "model",
    progress: bool = False,
) -> dict[str, Any]:
    """Run `probes` (objects, or names with default settings) on `model`; return its result.

    `tokenizer` is a transformers tokenizer, a `lcplug.eval.Tokenizer`, or None for bytes; `haystack`
    a `Haystack` or a source path (default: the standard library's source), read only if a probe needs it.
    """
    tok = as_tokenizer(tokenizer)
    if isinstance(tok, ByteTokenizer):
        check_byte_vocab(config_value(model, "vocab_size"), label)
    probes = build_probes(probes) if isinstance(probes, str) else list(probes)
    for probe in probes:
        probe.check(tok)
    hay = haystack if isinstance(haystack, Haystack) else Haystack(haystack)
    training = isinstance(model, nn.Module) and model.training
    if training:
        model.eval()
    try:
        with torch.no_grad():
            results = {p.name: p.run(model, tok, hay, progress=progress, label=label) for p in probes}
    finally:
        if training:
            model.train()
    return {
        "model": label,
        "max_position_embeddings": max_positions(model),
        "manifest": _manifest(model),
        "tokenizer": repr(tok),
        "haystack": str(hay.source) if any(p.needs_haystack for p in probes) else None,
        "probes": results,
    }


def report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The document `results.json` holds: the lcplug version and each model's result, side by side."""
    return {"lcplug_version": __version__, "models": list(results)}


def metrics(result: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Headline numbers of one model's result as flat scalars for a metrics log.

    Retrieval probes give `<probe>/accuracy`, `<probe>/digit_accuracy` and `<probe>/accuracy@<length>`;
    perplexity gives `ppl@<length>`. Cells that could not run are left out rather than logged as zero.
    """
    out: dict[str, float] = {}
    for name, probe in result["probes"].items():
        if name == "ppl":
            for row in probe["by_length"]:
                if row["ppl"] is not None:
                    out[f"{prefix}ppl@{row['length']}"] = row["ppl"]
            continue
        for key in ("accuracy", "digit_accuracy"):
            if probe[key] is not None:
                out[f"{prefix}{name}/{key}"] = probe[key]
        for row in probe["by_length"]:
            if row["accuracy"] is not None:
                out[f"{prefix}{name}/accuracy@{row['length']}"] = row["accuracy"]
    return out


def load_for_eval(ref: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer]:
    """A checkpoint (local directory or Hub repo) loaded with `lcplug.from_pretrained` in fp32, and its tokenizer.

    The manifest, if any, is re-applied, so the probes run through the same attention plugins and KV
    tiers the model was published with. A checkpoint without a tokenizer is read as bytes.
    """
    from transformers.utils import logging as hf_logging

    from ..checkpoint import from_pretrained, resolve_checkpoint

    path = Path(ref)
    looks_local = str(ref).startswith((".", "~", "/", os.sep)) or str(ref).count("/") > 1  # not "org/name"
    if not path.is_dir() and (path.exists() or looks_local):
        raise EvalLoadError(f"{str(ref)!r} is not a checkpoint directory (nor a Hub repo id)")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        directory = resolve_checkpoint(ref)
        model = from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        if isinstance(exc, LcplugError):
            raise
        raise EvalLoadError(f"cannot load a causal LM from {str(ref)!r}: {str(exc).splitlines()[0]}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model = model.to(device).eval()
    return model, load_tokenizer(Path(directory), config_value(model, "vocab_size"))


def _manifest(model: Any) -> dict[str, Any] | None:
    """The lcplug manifest of a patched model (which plugins the probes ran through), else None."""
    if not isinstance(model, nn.Module):
        return None
    from .. import manifest_of

    return manifest_of(model)
