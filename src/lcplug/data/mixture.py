"""Mixtures: weighted domains over the recipe's sources, and the mixer that interleaves their documents.

Weights are shares of **tokens** (as ProLong reports its mixtures), written `code@0.3,books@0.7`, as a
mapping `{code: 0.3, books: 0.7}`, or as a list of mappings with per-domain options (`max_doc_tokens`,
`long_share`, `long_threshold`). Weights that do not sum to one are normalised with a warning (so
percentages work as they are); a negative weight, or no positive one, is an error.

The mixer is deterministic and needs no random state: it always takes the next document from the
domain furthest below its share (the smallest tokens-taken / weight), so the realised token shares track
the weights at every point of the stream, not just on average, and a resume continues the same order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .base import DataError, Domain, unknown
from .tokenize import TokenDoc, TokenStream

DOMAIN_KEYS = ("source", "weight", "max_doc_tokens", "long_share", "long_threshold")


def parse_domains(raw: Any) -> list[Domain]:
    """Domains from `"a@0.3,b@0.7"`, `{a: 0.3, b: 0.7}` or `[{source: a, weight: 0.3, ...}, ...]` (not normalised)."""
    if isinstance(raw, str):
        out = []
        for item in (s.strip() for s in raw.split(",")):
            if not item:
                continue
            source, sep, weight = item.partition("@")
            if not sep or not source.strip():
                raise DataError(f"mixture entry {item!r}: expected 'source@weight', e.g. 'code@0.3'")
            out.append(Domain(source.strip(), _number(weight, item)))
        return out
    if isinstance(raw, Mapping):
        return [Domain(str(source), _number(weight, f"{source}@{weight}")) for source, weight in raw.items()]
    if isinstance(raw, Sequence):
        out = []
        for entry in raw:
            if not isinstance(entry, Mapping) or "source" not in entry or "weight" not in entry:
                raise DataError(f"mixture entry {entry!r}: expected a mapping with 'source' and 'weight'")
            extra = set(entry) - set(DOMAIN_KEYS)
            if extra:
                raise DataError(
                    f"mixture entry {dict(entry)!r}: unknown key {sorted(extra)[0]!r}; valid: {DOMAIN_KEYS}"
                )
            opts = {k: entry[k] for k in DOMAIN_KEYS[2:] if entry.get(k) is not None}
            out.append(Domain(str(entry["source"]), _number(entry["weight"], str(dict(entry))), **opts))
        return out
    raise DataError(f"mixture must be 'a@0.3,b@0.7', a mapping or a list of mappings, got {type(raw).__name__}")


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"mixture entry {where!r}: weight {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise DataError(f"mixture entry {where!r}: weight {value!r}; valid: a finite number >= 0")
    return number


def normalise(domains: Sequence[Domain], sources: Sequence[str]) -> list[Domain]:
    """Validated domains whose weights sum to one: unknown sources and duplicates are errors, zero weights dropped.

    A sum other than one is normalised with a `UserWarning` naming the sum, the decision lcplug makes so
    that `code@30,books@70` and ProLong-style sub-mixtures whose parts are left out both work.
    """
    if not domains:
        raise DataError("the mixture names no domain; give at least one 'source@weight'")
    labels = set()
    for d in domains:
        if d.source not in sources:
            raise unknown("data source", d.source, sources)
        if d.label in labels:
            raise DataError(f"mixture names domain {d.label!r} twice; give each source (and cut length) once")
        labels.add(d.label)
        if d.max_doc_tokens is not None and d.max_doc_tokens < 1:
            raise DataError(f"mixture domain {d.label!r}: max_doc_tokens={d.max_doc_tokens}; valid: an integer >= 1")
    kept = [d for d in domains if d.weight > 0]
    total = sum(d.weight for d in kept)
    if not kept:
        raise DataError("every mixture weight is 0; give at least one positive weight")
    if abs(total - 1) > 1e-6:
        shares = ", ".join(f"{d.label}@{d.weight / total:.4g}" for d in kept)
        warnings.warn(f"lcplug: mixture weights sum to {total:.6g}, not 1; normalised to {shares}", stacklevel=2)
    return [Domain(d.source, d.weight / total, d.max_doc_tokens, d.long_share, d.long_threshold) for d in kept]


class Mixer:
    """Interleaves the domains' token documents so that each domain's share of tokens follows its weight."""

    def __init__(self, domains: Sequence[Domain], streams: Sequence[TokenStream]):
        if len(domains) != len(streams):
            raise ValueError("one stream per domain")
        self.domains = list(domains)
        self.streams = list(streams)
        self.taken = [0] * len(domains)
        self.done = [False] * len(domains)

    def next_doc(self) -> TokenDoc | None:
        """The next document of the domain furthest below its share; None once every domain is exhausted."""
        while True:
            active = [i for i, done in enumerate(self.done) if not done]
            if not active:
                return None
            i = min(active, key=lambda j: (self.taken[j] / self.domains[j].weight, j))
            doc = self.streams[i].next_doc()
            if doc is None:
                self.done[i] = True
                continue
            doc.domain = i
            self.taken[i] += len(doc)
            return doc

    def state_dict(self) -> dict[str, Any]:
        return {"taken": list(self.taken), "done": list(self.done), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["streams"]) != len(self.streams):
            raise DataError(
                f"data state has {len(state['streams'])} domains, this mixture {len(self.streams)}: "
                "resume with the recipe the state was saved with"
            )
        self.taken = [int(t) for t in state["taken"]]
        self.done = [bool(d) for d in state["done"]]
        for stream, sub in zip(self.streams, state["streams"]):
            stream.load_state_dict(sub)
