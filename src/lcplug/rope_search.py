"""LongRoPE's evolutionary search for per-dimension rescale factors (Ding et al. 2024, arXiv:2402.13753).

LongRoPE divides rotary frequency i by its own factor lambda_i instead of one factor for all (PI) or
a fixed curve (NTK, YaRN). The factors are found by search: a population of candidate factor vectors,
seeded with PI, NTK-aware and YaRN-shaped ones, evolves by mutation and crossover; each candidate is
scored by the perplexity of the model, patched with it through the `longrope` plugin, on calibration
samples of the target length. As in the paper, the factors are kept non-decreasing from high to low
frequency and within [1, 1.25 s]; the paper's extra n-hat (leading positions left uninterpolated) is
not something transformers' "longrope" type can express, so it is not searched.

The result is a `longrope` spec (a dict) that `lcplug.patch(model, rope=spec)` and recipes take as is.
`lcplug rope-search` is the command-line face of `search_longrope`.
"""

from __future__ import annotations

import math
import random
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LcplugError
from .patching import choose_adapter, patch, patch_state, unpatch
from .rope import per_layer_type, rope_parameters_of, rotary_dim


class RopeSearchError(LcplugError, ValueError):
    """The search cannot run: bad settings, no usable calibration data, or a model it cannot extend."""


def default_data() -> Path:
    """The Python standard library's source: long, varied text that every installation has."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The checkpoint's tokenizer if it ships one, else None (the search then reads bytes as token ids)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(model_dir) / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def encode(text: str, tokenizer: Any | None) -> list[int]:
    """Token ids of `text`: the tokenizer's (no special tokens), or its UTF-8 bytes when there is none."""
    if tokenizer is None:
        return list(text.encode("utf-8"))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_samples(
    data: str | Path | None, length: int, count: int, *, tokenizer: Any | None = None, seed: int = 0
) -> torch.Tensor:
    """`count` windows of `length` tokens (count, length), each from a different document of `data`.

    `data` is a text file or a directory searched recursively (files that are not UTF-8 text are
    skipped); None means the standard library's source. Documents are visited in a seeded order and a
    window is cut at a seeded offset, so a seed gives the same samples every time. Each window comes
    from one document, so the samples really are long-context text, not stitched fragments.
    """
    root = Path(data) if data is not None else default_data()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise RopeSearchError(f"calibration data {str(root)!r} is neither a file nor a directory")
    rng = random.Random(seed)
    rng.shuffle(files)
    samples: list[list[int]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = encode(text, tokenizer)
        if len(ids) < length:
            continue
        start = rng.randrange(len(ids) - length + 1)
        samples.append(ids[start : start + length])
        if len(samples) == count:
            return torch.tensor(samples, dtype=torch.long)
    raise RopeSearchError(
        f"found {len(samples)} document(s) of at least {length} tokens under {str(root)!r}, need {count}; "
        "give more or longer text, or fewer samples"
    )


@torch.no_grad()
def perplexity(model: nn.Module, samples: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of `samples`."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in samples.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)


@dataclass(frozen=True)
class SearchSettings:
    """The search budget and operators (defaults small enough for a laptop; the paper used 64 x 40)."""

    population: int = 16
    generations: int = 8
    mutations: int = 8
    crossovers: int = 8
    mutation_rate: float = 0.3
    mutation_scale: float = 0.25
    max_factor_ratio: float = 1.25
    batch_size: int = 4
    seed: int = 0

    def validate(self) -> None:
        for name in ("population", "batch_size"):
            if getattr(self, name) < 1:
                raise RopeSearchError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("generations", "mutations", "crossovers"):
            if getattr(self, name) < 0:
                raise RopeSearchError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 < self.mutation_rate <= 1 or self.mutation_scale <= 0 or self.max_factor_ratio < 1:
            raise RopeSearchError(
                "need 0 < mutation_rate <= 1, mutation_scale > 0 and max_factor_ratio >= 1, got "
                f"{self.mutation_rate}, {self.mutation_scale}, {self.max_factor_ratio}"
            )


@dataclass
class SearchResult:
    """The best factors as a `longrope` spec, its perplexity, and the baselines on the same samples."""

    spec: dict[str, Any]
    perplexity: float
    baselines: dict[str, float]
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)
    """Best perplexity after the seeds and after each generation (non-increasing)."""


def longrope_spec(factors: list[float], scale: float, original_length: int) -> dict[str, Any]:
    """A `longrope` spec: the searched long factors, all-ones short factors (trained behaviour up to L)."""
    return {
        "name": "longrope",
        "factor": scale,
        "original_max_position_embeddings": original_length,
        "long_factor": [float(f) for f in factors],
        "short_factor": [1.0] * len(factors),
    }


def seed_candidates(inv_freq: torch.Tensor, scale: float, original_length: int) -> dict[str, torch.Tensor]:
    """The classic curves as starting points: PI (all s), NTK-aware (s^(2i/(d-2))), YaRN's ramp."""
    pairs = inv_freq.shape[0]
    d = 2 * pairs
    i = torch.arange(pairs, dtype=torch.float64)
    rotations = original_length * inv_freq.double() / (2 * math.pi)  # turns over the trained context
    keep = ((rotations - 1.0) / (32.0 - 1.0)).clamp(0, 1)  # YaRN: beta_slow 1, beta_fast 32
    return {
        "pi": torch.full((pairs,), float(scale), dtype=torch.float64),
        "ntk": scale ** (2 * i / max(d - 2, 1)),
        "yarn": 1.0 / (keep + (1 - keep) / scale),
    }


class _Evolution:
    """Mutation and crossover on factor vectors under LongRoPE's constraints."""

    def __init__(self, settings: SearchSettings, scale: float):
        self.settings = settings
        self.low, self.high = 1.0, settings.max_factor_ratio * scale
        self.rng = torch.Generator().manual_seed(settings.seed)

    def legal(self, factors: torch.Tensor) -> tuple[float, ...]:
        """Clip to [1, 1.25 s], make non-decreasing from high to low frequency, quantise to 0.01."""
        factors = factors.clamp(self.low, self.high).cummax(0).values
        return tuple(round(float(f), 2) for f in factors)

    def mutate(self, parent: tuple[float, ...]) -> tuple[float, ...]:
        x = torch.tensor(parent, dtype=torch.float64)
        hit = torch.rand(x.shape, generator=self.rng, dtype=torch.float64) < self.settings.mutation_rate
        if not hit.any():
            hit[torch.randint(x.shape[0], (1,), generator=self.rng)] = True
        noise = torch.randn(x.shape, generator=self.rng, dtype=torch.float64) * self.settings.mutation_scale
        return self.legal(torch.where(hit, x * noise.exp(), x))

    def crossover(self, a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        pick = torch.rand(len(a), generator=self.rng) < 0.5
        return self.legal(torch.where(pick, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))

    def choice(self, pool: list[tuple[float, ...]]) -> tuple[float, ...]:
        return pool[int(torch.randint(len(pool), (1,), generator=self.rng))]


def _base_frequencies(model: nn.Module) -> tuple[torch.Tensor, int]:
    """inv_freq of the model's (first) rope slot, computed from its parameters, and the current length."""
    config = choose_adapter(model).text_config(model)
    params = rope_parameters_of(config)
    if per_layer_type(params):
        params = next(p for p in params.values() if p is not None)
    d = rotary_dim(params, config)
    inv_freq = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return inv_freq, int(config.max_position_embeddings)


def search_longrope(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    original_length: int | None = None,
    settings: SearchSettings | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search LongRoPE factors that minimise the perplexity of `model` on `samples` (count, target_length).

    The model is patched with each candidate through the `longrope` plugin and unpatched again, so it
    must come unpatched and leaves unpatched. The target length is the samples' length; the original
    length is the model's max_position_embeddings unless given.
    """
    settings = settings or SearchSettings()
    settings.validate()
    if patch_state(model) is not None:
        raise RopeSearchError("rope-search needs an unpatched model: its candidates are patched one at a time")
    inv_freq, current = _base_frequencies(model)
    original = original_length or current
    target = samples.shape[-1]
    if target <= original:
        raise RopeSearchError(f"target length {target} must be above the original length {original}")
    scale = target / original
    evolution = _Evolution(settings, scale)
    started = time.perf_counter()
    was_training = model.training
    model.eval()

    def score(spec: Any) -> float:
        patch(model, rope=spec)
        try:
            return perplexity(model, samples, settings.batch_size)
        finally:
            unpatch(model)

    seeds = [evolution.legal(c) for c in seed_candidates(inv_freq, scale, original).values()]
    while len(seeds) < settings.population:
        seeds.append(evolution.mutate(evolution.choice(seeds[:3])))
    budget = len(seeds) + settings.generations * (settings.mutations + settings.crossovers)
    scores: dict[tuple[float, ...], float] = {}
    with tqdm(total=budget, desc="rope-search", unit="eval", disable=not progress) as bar:

        def evaluate(candidates: list[tuple[float, ...]]) -> None:
            for candidate in candidates:
                if candidate not in scores:
                    scores[candidate] = score(longrope_spec(list(candidate), scale, original))
                bar.update(1)
                bar.set_postfix(best_ppl=f"{min(scores.values()):.4f}")

        evaluate(seeds)
        population = sorted(set(seeds), key=scores.__getitem__)[: settings.population]
        history = [scores[population[0]]]
        for _ in range(settings.generations):
            parents = population[: max(2, settings.population // 2)]
            children = [evolution.mutate(evolution.choice(parents)) for _ in range(settings.mutations)]
            children += [
                evolution.crossover(evolution.choice(parents), evolution.choice(parents))
                for _ in range(settings.crossovers)
            ]
            evaluate(children)
            population = sorted(set(population) | set(children), key=scores.__getitem__)[: settings.population]
            history.append(scores[population[0]])
    best = population[0]
    baselines = {"none": perplexity(model, samples, settings.batch_size), "linear": score(f"linear:factor={scale}")}
    model.train(was_training)
    return SearchResult(
        spec=longrope_spec(list(best), scale, original),
        perplexity=scores[best],
        baselines=baselines,
        evaluations=len(scores),
        seconds=time.perf_counter() - started,
        history=history,
    )
