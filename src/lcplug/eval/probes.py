"""Long-context probes: passkey, needle grid, multi-key retrieval, perplexity by length and by position.

A retrofit is only worth what it retrieves at long range, so each retrieval probe hides a number in
filler at a depth (0 = the start of the context, 1 = just before the question), asks for it at the end,
greedy-decodes the answer and compares digits exactly (also per digit, so partial recall shows). Every
(length, depth) cell is one point of the lost-in-the-middle grid. Prompts are built token by token,
so a length is the exact prompt size; within a (length, sample) the filler and the key stay the same
across depths, so a row of the grid differs only in where the needle sits.

Probes only call `model.generate(input_ids=..., attention_mask=..., max_new_tokens=..., do_sample=False)`
and `model(input_ids=...).logits`: a model patched by lcplug routes both through its attention plugins
and KV tiers, and a test double with the same two methods runs the very same scoring code. A length
beyond `max_position_embeddings` is run as asked and flagged `beyond_max_positions`, never clipped.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..errors import LcplugError, did_you_mean
from .haystack import Haystack
from .tokens import Tokenizer

DIGITS = re.compile(r"\d+")


class ProbeError(LcplugError, ValueError):
    """A probe's settings cannot work: bad lengths or depths, or a length too short for the prompt."""


# ---- talking to the model ---------------------------------------------------------------------------


def config_value(model: Any, name: str) -> Any:
    """`name` from the model's text config (multimodal configs nest it), or None for a model without one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, name, None)


def max_positions(model: Any) -> int | None:
    """The positions the model's config says it supports (`max_position_embeddings`), or None if unknown."""
    value = config_value(model, "max_position_embeddings")
    return int(value) if value else None


def model_device(model: Any) -> torch.device:
    """Where the model's weights live (inputs go there); CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def greedy_answer(model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """The ids `model.generate` appends to `prompt` under greedy decoding (at most `max_new_tokens`)."""
    ids = torch.tensor([list(prompt)], device=model_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    config = getattr(model, "generation_config", None)
    if config is not None and config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos  # what generate would pick, unwarned
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    out = getattr(out, "sequences", out)
    return out[0, ids.shape[1] :].tolist()


def token_nll(model: Any, ids: Sequence[int], last: int | None = None) -> torch.Tensor:
    """Next-token negative log-likelihoods (nats) of the last `last` tokens of `ids` (default: all but the first).

    Only the logits needed are kept where the model's forward takes `logits_to_keep`, so scoring the end
    of a long window does not hold a (length x vocabulary) tensor.
    """
    x = torch.tensor([list(ids)], device=model_device(model))
    span = len(ids) - 1 if last is None else last
    kwargs = {}
    forward = getattr(model, "forward", model)
    if last is not None and "logits_to_keep" in inspect.signature(forward).parameters:
        kwargs["logits_to_keep"] = span + 1
    logits = model(input_ids=x, **kwargs).logits[0, -(span + 1) : -1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, -span:], reduction="none")


# ---- prompts -------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One prompt (exactly the cell's length in tokens) and the digits a correct answer starts with."""

    prompt: list[int]
    key: str


SNAP_REACH = 64
"""At most this many tokens (and 1/16 of the filler) a needle moves back to start after a line or sentence."""


def build_prompt(
    tokenizer: Tokenizer,
    intro: list[int],
    filler: list[int],
    needles: list[tuple[float, list[int]]],
    question: list[int],
) -> list[int]:
    """prefix + intro + filler with each needle at its depth + question.

    A needle goes in after the nearest line or sentence end at or before its depth (as in Kamradt's
    needle test), so it does not split a word; depth 0 and 1 stay the very start and end of the filler.
    """
    cuts = sorted((_snap(tokenizer, filler, round(depth * len(filler))), i) for i, (depth, _) in enumerate(needles))
    body: list[int] = []
    start = 0
    for cut, i in cuts:
        body += filler[start:cut] + needles[i][1]
        start = cut
    return tokenizer.prefix + intro + body + filler[start:] + question


def _snap(tokenizer: Tokenizer, filler: list[int], cut: int) -> int:
    """The last boundary at or before `cut` whose previous token ends a line or a sentence; `cut` if none is near."""
    if cut in (0, len(filler)):
        return cut
    for k in range(cut, max(cut - min(SNAP_REACH, len(filler) // 16), 0), -1):
        if tokenizer.decode(filler[k - 1 : k]).rstrip(" ").endswith((".", "\n")):
            return k
    return cut


def filler_room(probe: str, length: int, fixed: int) -> int:
    """Tokens left for filler once the fixed pieces are in; an error naming the minimum if none are."""
    room = length - fixed
    if room < 0:
        raise ProbeError(
            f"{probe}: length {length} is too short: the needle, question and any intro take {fixed} tokens; "
            f"valid: lengths >= {fixed}"
        )
    return room


def random_key(rng: random.Random, digits: int) -> str:
    """A number of exactly `digits` digits (no leading zero, so the answer's length is the key's)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def score(answer: str, key: str) -> tuple[bool, float]:
    """Exact match of the first run of digits in the answer, and the fraction of the key's digits it gets right."""
    found = DIGITS.search(answer)
    got = found.group() if found else ""
    return got == key, sum(a == b for a, b in zip(got, key)) / len(key)


# ---- retrieval probes ------------------------------------------------------------------------------


def _lengths(value: Sequence[int], probe: str) -> tuple[int, ...]:
    lengths = tuple(sorted({int(n) for n in value}))
    if not lengths or lengths[0] < 1:
        raise ProbeError(f"{probe}: lengths {list(value)}; valid: one or more integers >= 1")
    return lengths


def _depths(value: Sequence[float], probe: str) -> tuple[float, ...]:
    depths = tuple(sorted({float(d) for d in value}))
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise ProbeError(f"{probe}: depths {list(value)}; valid: one or more numbers in [0, 1]")
    return depths


def _at_least(value: int, low: int, what: str) -> None:
    if value < low:
        raise ProbeError(f"{what}={value}; valid: an integer >= {low}")


def _cell(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    """Mean exact and per-digit accuracy over the trials that ran; None where none did."""
    done = [r for r in rows if r.get("error") is None]
    return {
        **where,
        "samples": len(done),
        "accuracy": sum(r["exact"] for r in done) / len(done) if done else None,
        "digit_accuracy": sum(r["digit_accuracy"] for r in done) / len(done) if done else None,
    }


@dataclass
class Pieces:
    """A retrieval prompt but its filler: the asked key, the needles (the asked one first), the text around."""

    key: str
    needles: list[list[int]]
    question: list[int]
    intro: list[int] = field(default_factory=list)
    distractor_depths: list[float] = field(default_factory=list)

    def size(self, tokenizer: Tokenizer) -> int:
        """Tokens the prompt takes besides the filler (the tokenizer's prefix included)."""
        return len(tokenizer.prefix) + len(self.intro) + sum(map(len, self.needles)) + len(self.question)


@dataclass
class RetrievalProbe(ABC):
    """A number hidden at each depth of a context of each length; score the greedy answer's digits.

    Subclasses say what a prompt holds (`pieces`, and `filler` if not haystack text); building,
    running, scoring and the result layout are shared, so every retrieval probe fills the same
    depth x length grid.
    """

    name: ClassVar[str]
    needs_haystack: ClassVar[bool] = True

    lengths: Sequence[int] = (1024, 2048, 4096)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    digits: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = _lengths(self.lengths, self.name)
        self.depths = _depths(self.depths, self.name)
        _at_least(self.samples, 1, f"{self.name}: samples")
        _at_least(self.digits, 1, f"{self.name}: digits")

    @abstractmethod
    def pieces(self, tokenizer: Tokenizer, rng: random.Random) -> Pieces:
        """The key, needles and question of one trial, drawn from `rng`."""

    def filler(self, tokenizer: Tokenizer, haystack: Haystack, room: int, rng: random.Random) -> list[int]:
        """`room` tokens of text to hide the needles in: a seeded haystack window."""
        return haystack.window(tokenizer, room, rng)

    def _rng(self, length: int, sample: int) -> random.Random:
        """Seeded by (seed, probe, length, sample) but not depth: a row of the grid moves only the needle."""
        return random.Random(f"{self.seed}:{self.name}:{length}:{sample}")

    def check(self, tokenizer: Tokenizer) -> None:
        """Fail now, before any model runs, if some length cannot hold its needles and question."""
        for length in self.lengths:
            for sample in range(self.samples):
                filler_room(self.name, length, self.pieces(tokenizer, self._rng(length, sample)).size(tokenizer))

    def make_trial(self, tokenizer: Tokenizer, haystack: Haystack, length: int, depth: float, sample: int) -> Trial:
        """The prompt (exactly `length` tokens) of one trial with the asked needle at `depth`."""
        rng = self._rng(length, sample)
        pieces = self.pieces(tokenizer, rng)
        filler = self.filler(tokenizer, haystack, filler_room(self.name, length, pieces.size(tokenizer)), rng)
        needles = [(depth, pieces.needles[0]), *zip(pieces.distractor_depths, pieces.needles[1:])]
        return Trial(build_prompt(tokenizer, pieces.intro, filler, needles, pieces.question), pieces.key)

    def run(
        self,
        model: Any,
        tokenizer: Tokenizer,
        haystack: Haystack,
        *,
        progress: bool = False,
        label: str = "model",
    ) -> dict[str, Any]:
        """Every trial of the grid: cells (length x depth), per-length means, overall means, and each trial."""
        limit = max_positions(model)
        answer_tokens = self.digits + 3  # at most one token per digit, plus a space and a period
        trials: list[dict[str, Any]] = []
        start = time.perf_counter()
        with tqdm(
            total=len(self.lengths) * len(self.depths) * self.samples,
            desc=f"{label} {self.name}",
            disable=not progress,
            leave=False,
        ) as bar:
            for length in self.lengths:
                beyond = limit is not None and length + answer_tokens > limit
                for depth in self.depths:
                    for sample in range(self.samples):
                        trial = self.make_trial(tokenizer, haystack, length, depth, sample)
                        row: dict[str, Any] = {"length": length, "depth": depth, "sample": sample, "key": trial.key}
                        try:
                            answer = tokenizer.decode(greedy_answer(model, trial.prompt, answer_tokens))
                        except (IndexError, RuntimeError) as exc:
                            if not beyond:
                                raise
                            row["error"] = _first_line(exc)
                        else:
                            exact, digit_accuracy = score(answer, trial.key)
                            row.update(answer=answer, exact=exact, digit_accuracy=digit_accuracy)
                        trials.append(row)
                        bar.update()
        cells = []
        by_length = []
        for length in self.lengths:
            beyond = limit is not None and length + answer_tokens > limit
            for depth in self.depths:
                rows = [t for t in trials if t["length"] == length and t["depth"] == depth]
                errors = [r["error"] for r in rows if "error" in r]
                cells.append(
                    {
                        **_cell(rows, length=length, depth=depth),
                        "beyond_max_positions": beyond,
                        **({"error": errors[0]} if errors else {}),
                    }
                )
            rows = [t for t in trials if t["length"] == length]
            by_length.append({**_cell(rows, length=length), "beyond_max_positions": beyond})
        overall = _cell(trials)
        return {
            "probe": self.name,
            "settings": _settings(self),
            "max_position_embeddings": limit,
            "accuracy": overall["accuracy"],
            "digit_accuracy": overall["digit_accuracy"],
            "cells": cells,
            "by_length": by_length,
            "trials": trials,
            "seconds": round(time.perf_counter() - start, 3),
        }


def _settings(probe: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(probe).items()}


def _first_line(exc: BaseException) -> str:
    """An exception as one line for a result row (its type when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class PasskeyProbe(RetrievalProbe):
    """Passkey retrieval (Mohtashami & Jaggi 2023): a pass key in repetitive filler, asked for at the end.

    The filler carries no information, so this isolates whether attention reaches the needle at all.
    """

    name: ClassVar[str] = "passkey"
    needs_haystack: ClassVar[bool] = False

    intro: str = "A pass key is hidden in the text below. Find it and remember it.\n"
    filler_text: str = PASSKEY_FILLER
    needle: str = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    question: str = "\nWhat is the pass key? The pass key is"

    def pieces(self, tokenizer: Tokenizer, rng: random.Random) -> Pieces:
        key = random_key(rng, self.digits)
        needle = tokenizer.encode(self.needle.format(key=key))
        return Pieces(key, [needle], tokenizer.encode(self.question), intro=tokenizer.encode(self.intro))

    def filler(self, tokenizer: Tokenizer, haystack: Haystack, room: int, rng: random.Random) -> list[int]:
        """The filler sentences repeated to `room` tokens (no haystack: nothing in them is worth attending to)."""
        unit = tokenizer.encode(self.filler_text)
        return (unit * (room // len(unit) + 1))[:room]


@dataclass
class NeedleProbe(RetrievalProbe):
    """Needle in a haystack (Kamradt 2023): one fact in real text, over the depth x length grid."""

    name: ClassVar[str] = "needle"

    needle: str = "\nThe special magic number is {key}.\n"
    question: str = "\nWhat is the special magic number mentioned in the text above? The special magic number is"

    def pieces(self, tokenizer: Tokenizer, rng: random.Random) -> Pieces:
        key = random_key(rng, self.digits)
        return Pieces(key, [tokenizer.encode(self.needle.format(key=key))], tokenizer.encode(self.question))


KEY_NAMES = (
    "amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
    "umber", "violet", "willow", "xenon", "yarrow", "zephyr",
)  # fmt: skip
"""Names of the keys in the multi-key probe: distinct words, so no name is a prefix of another."""


@dataclass
class MultiKeyProbe(RetrievalProbe):
    """Multi-key retrieval (RULER's MK-NIAH): `keys` key-value needles in real text, one of them asked for.

    The asked needle sits at the cell's depth; the distractors at seeded random depths. A model must
    bind the value to the right name, not just copy the only number that looks like an answer.
    """

    name: ClassVar[str] = "multikey"

    keys: int = 4
    needle: str = "\nThe value of key {name} is {key}.\n"
    question: str = "\nWhat is the value of key {name}? The value of key {name} is"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.keys <= len(KEY_NAMES):
            raise ProbeError(f"multikey: keys={self.keys}; valid: an integer in [1, {len(KEY_NAMES)}]")

    def pieces(self, tokenizer: Tokenizer, rng: random.Random) -> Pieces:
        names = rng.sample(KEY_NAMES, self.keys)
        values: list[str] = []
        while len(values) < self.keys:
            value = random_key(rng, self.digits)
            if value not in values:
                values.append(value)
        return Pieces(
            values[0],
            [tokenizer.encode(self.needle.format(name=n, key=v)) for n, v in zip(names, values)],
            tokenizer.encode(self.question.format(name=names[0])),
            distractor_depths=[rng.random() for _ in names[1:]],
        )


# ---- perplexity ----------------------------------------------------------------------------------


@dataclass
class PerplexityProbe:
    """Perplexity versus context length and versus token position, on haystack text.

    By length: each sample is one window of the longest length; at every length the model reads the
    window's last `length` tokens and is scored on the same final `chunk` tokens, so only the context
    in front of them grows (a model that uses long context gets better, one past its positions worse).
    By position: the per-token NLL of the longest windows, averaged over samples in `buckets` equal
    spans of positions.
    """

    name: ClassVar[str] = "ppl"
    needs_haystack: ClassVar[bool] = True

    lengths: Sequence[int] = (1024, 2048, 4096)
    samples: int = 4
    chunk: int = 64
    buckets: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = _lengths(self.lengths, self.name)
        _at_least(self.samples, 1, "ppl: samples")
        _at_least(self.chunk, 1, "ppl: chunk")
        _at_least(self.buckets, 1, "ppl: buckets")

    def scored_tokens(self, tokenizer: Tokenizer) -> int:
        """Tokens scored at each length: `chunk`, or fewer if the shortest length has no room for it."""
        chunk = min(self.chunk, self.lengths[0] - len(tokenizer.prefix) - 1)
        if chunk < 1:
            raise ProbeError(f"ppl: length {self.lengths[0]} is too short to score any token after the prefix")
        return chunk

    def check(self, tokenizer: Tokenizer) -> None:
        """Fail now, before any model runs, if the shortest length leaves no token to score."""
        self.scored_tokens(tokenizer)

    def run(
        self,
        model: Any,
        tokenizer: Tokenizer,
        haystack: Haystack,
        *,
        progress: bool = False,
        label: str = "model",
    ) -> dict[str, Any]:
        """Mean NLL and perplexity per length (on the shared last chunk) and per position bucket."""
        limit = max_positions(model)
        longest = self.lengths[-1]
        prefix = tokenizer.prefix
        chunk = self.scored_tokens(tokenizer)
        start = time.perf_counter()
        by_length: dict[int, list[float]] = {n: [] for n in self.lengths}
        errors: dict[int, str] = {}
        positions = torch.zeros(longest - 1, dtype=torch.float64)
        with tqdm(
            total=len(self.lengths) * self.samples, desc=f"{label} {self.name}", disable=not progress, leave=False
        ) as bar:
            for sample in range(self.samples):
                rng = random.Random(f"{self.seed}:{self.name}:{sample}")
                body = haystack.window(tokenizer, longest - len(prefix), rng)
                for length in self.lengths:
                    bar.update()
                    if length in errors:
                        continue
                    ids = prefix + body[len(body) - (length - len(prefix)) :]
                    try:
                        nll = token_nll(model, ids, last=None if length == longest else chunk)
                    except (IndexError, RuntimeError) as exc:
                        if limit is None or length <= limit:
                            raise
                        errors[length] = _first_line(exc)
                        continue
                    if length == longest:
                        positions += nll.double().cpu()
                    by_length[length] += nll[-chunk:].tolist()
        rows = []
        for length in self.lengths:
            values = by_length[length]
            mean = sum(values) / len(values) if values else None
            rows.append(
                {
                    "length": length,
                    "nll": mean,
                    "ppl": _exp(mean),
                    "tokens": len(values),
                    "beyond_max_positions": limit is not None and length > limit,
                    **({"error": errors[length]} if length in errors else {}),
                }
            )
        return {
            "probe": self.name,
            "settings": {**_settings(self), "chunk": chunk},
            "max_position_embeddings": limit,
            "by_length": rows,
            "by_position": [] if longest in errors else self._buckets(positions / self.samples, limit),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _buckets(self, nll: torch.Tensor, limit: int | None) -> list[dict[str, Any]]:
        """Mean NLL over equal spans of predicted-token positions 1..longest-1 (position p predicts token p)."""
        count = min(self.buckets, nll.shape[0])
        edges = [1 + nll.shape[0] * i // count for i in range(count + 1)]
        rows = []
        for lo, hi in itertools.pairwise(edges):
            mean = float(nll[lo - 1 : hi - 1].mean())
            beyond = limit is not None and hi > limit  # the span [lo, hi) reaches past the supported positions
            rows.append({"start": lo, "end": hi, "nll": mean, "ppl": _exp(mean), "beyond_max_positions": beyond})
        return rows


def _exp(nll: float | None) -> float | None:
    """Perplexity of a mean NLL; inf (not an overflow error) for a hopeless model, None for no tokens."""
    if nll is None:
        return None
    return math.exp(nll) if nll < 700 else math.inf


Probe = RetrievalProbe | PerplexityProbe

PROBES: dict[str, type] = {p.name: p for p in (PasskeyProbe, NeedleProbe, MultiKeyProbe, PerplexityProbe)}
"""Probe classes by the names `lcplug eval --probes` takes."""


def build_probes(
    names: str | Sequence[str],
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 4,
    seed: int = 0,
    keys: int = 4,
) -> list[Probe]:
    """Probes by name (`"passkey,needle"` or a list) sharing lengths, samples and seed; an unknown name errors."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ProbeError(f"no probes given; valid: {', '.join(PROBES)}")
    probes: list[Probe] = []
    for name in dict.fromkeys(names):
        if name not in PROBES:
            raise ProbeError(f"unknown probe {name!r}; {did_you_mean(name, PROBES)}")
        kwargs: dict[str, Any] = {"lengths": lengths, "samples": samples, "seed": seed}
        if name != "ppl":
            kwargs["depths"] = depths
        if name == "multikey":
            kwargs["keys"] = keys
        probes.append(PROBES[name](**kwargs))
    return probes
