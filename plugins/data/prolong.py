"""`prolong-64k` / `prolong-512k`: ProLong's long-context mixtures as presets mapped onto the recipe's sources."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lcplug.data.base import DataError, Domain, MixturePlugin
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param

SHORT = (
    ("fineweb-edu", 0.10),
    ("fineweb", 0.10),
    ("stackexchange", 0.04),
    ("wikipedia", 0.04),
    ("tulu", 0.03),
    ("arxiv", 0.03),
    ("openwebmath", 0.03),
    ("textbooks", 0.03),
)
"""ProLong's 40% of short data, by domain."""

K64 = 65536

PROLONG_64K: tuple[tuple[str, str, float, int | None], ...] = (
    ("code-repos", "long", 0.30, None),
    ("books", "long", 0.30, None),
    *((name, "short", w, None) for name, w in SHORT),
)
"""(domain, group, weight, cut length) of ProLong's 64K stage (Gao et al. 2024): long 60%, short 40%."""

PROLONG_512K: tuple[tuple[str, str, float, int | None], ...] = (
    ("code-repos", "long", 0.15, None),
    ("code-repos", "long", 0.15, K64),
    ("books", "long", 0.05, None),
    ("books", "long", 0.25, K64),
    *((name, "short", w, None) for name, w in SHORT),
)
"""ProLong's 512K stage: part of the code and books cut at 64K, the rest at the full training length."""


@dataclass(frozen=True)
class ProLongParams(Params):
    map: dict[str, Any] = param(
        {},
        "preset domain or group (long, short) -> a recipe source name or a list of them; "
        "unmapped domains use a source of the same name, or are left out",
    )


class ProLong(MixturePlugin):
    """ProLong's 64K mixture (Gao et al. 2024): code repositories 30%, books 30%, short data 40%.

    The short 40% is FineWeb-Edu 10, FineWeb 10, StackExchange 4, Wikipedia 4, Tulu 3, arXiv 3,
    OpenWebMath 3, textbooks 3. Its domains map onto whatever sources the recipe has: `map` names a
    source (or several, sharing the weight) per domain or per group (`long`, `short`); a domain with no
    mapping uses a source of its own name. Domains left without a source are dropped with a warning and
    the rest renormalised; two domains on one source add up. Train beyond the evaluation length
    (`data.eval_length`), as ProLong does.
    """

    name = "prolong-64k"
    Params = ProLongParams
    preset: ClassVar[tuple[tuple[str, str, float, int | None], ...]] = PROLONG_64K

    def domains(self, sources: Sequence[str]) -> list[Domain]:
        mapping = self.params.map
        valid = {d for d, *_ in self.preset} | {g for _, g, *_ in self.preset}
        for key in mapping:
            if key not in valid:
                raise DataError(f"{self.name}: map key {key!r} is neither a domain nor a group; valid: {sorted(valid)}")
        weights: dict[tuple[str, int | None], float] = {}
        dropped = []
        for domain, group, weight, cut in self.preset:
            target = mapping.get(domain, mapping.get(group, domain if domain in sources else None))
            names = [target] if isinstance(target, str) else list(target or [])
            if not names:
                dropped.append(domain)
                continue
            for name in names:
                key = (str(name), cut)
                weights[key] = weights.get(key, 0.0) + weight / len(names)
        if not weights:
            raise DataError(f"{self.name}: no domain maps onto a source ({', '.join(sources)}); give map: {{...}}")
        total = sum(weights.values())
        if dropped:
            warnings.warn(
                f"lcplug: {self.name}: domains {', '.join(sorted(set(dropped)))} have no source (map them with "
                f"map:); the other {total:.0%} of the mixture is renormalised",
                stacklevel=2,
            )
        return [Domain(source, w / total, cut) for (source, cut), w in weights.items()]


class ProLong512K(ProLong):
    """ProLong's 512K mixture: code 15%@512K + 15%@64K, books 5%@512K + 25%@64K, short data 40%.

    The `@64K` halves are the same sources cut into documents of at most 65,536 tokens, packed into the
    long rows beside the full-length ones (short + long mixing). Mapped onto sources like `prolong-64k`.
    """

    name = "prolong-512k"
    preset = PROLONG_512K


@hookimpl
def lcplug_register(register):
    register(ProLong)
    register(ProLong512K)
