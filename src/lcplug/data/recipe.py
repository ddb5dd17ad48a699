"""The `data:` section of a recipe: sources, mixture, lengths, curriculum, seed.

```yaml
data:
  tokenizer: bytes            # or a tokenizer / checkpoint directory
  seed: 0
  seq_len: 4096               # default: 2 x eval_length when only that is given (train beyond it)
  batch_size: 4
  eval_length: 2048           # optional; training shorter than this warns
  curriculum:                 # optional: lengths over steps; tokens per batch kept unless batch_size given
    - {step: 0, seq_len: 1024}
    - {step: 500, seq_len: 4096}
  cross_document: false       # true: attention crosses documents (no document masks)
  repeat: true                # sources start a new epoch when done (false: the stream ends)
  cache_dir: null             # a directory: tokenized text is kept there and read back (lcplug.data.cache)
  cache_verify: false         # true: files are read and hashed even when their identity is cached
  sources:                    # name -> data plugin spec (a name, 'name:k=v', or a mapping)
    code: code                # the Python standard library, one document per package, dependency order
    books: {name: text, paths: [books/]}
    needles: {name: needles, lengths: [1024, 3072]}
  mixture: code@0.4,books@0.4,needles@0.2     # or {name: prolong-64k, map: {...}}; default: equal weights
```
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from .base import DataError, Domain, MixturePlugin
from .mixture import normalise, parse_domains


@dataclass(frozen=True)
class Stage:
    """From `step` on, rows of `seq_len` tokens, `batch_size` rows per batch."""

    step: int
    seq_len: int
    batch_size: int


@dataclass
class DataConfig:
    """A validated `data:` section (see the module docstring for the YAML)."""

    sources: dict[str, Any]
    mixture: Any = None
    seq_len: int | None = None
    batch_size: int = 1
    seed: int = 0
    tokenizer: Any = "bytes"
    eos_id: int | None = None
    pad_id: int | None = None
    eval_length: int | None = None
    curriculum: list[dict[str, int]] = field(default_factory=list)
    cross_document: bool = False
    repeat: bool = True
    max_doc_tokens: int | None = None
    cache_dir: str | None = None
    cache_verify: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sources, Mapping) or not self.sources:
            raise DataError("data.sources must name at least one source, e.g. {code: code}")
        self.sources = {str(k): v for k, v in self.sources.items()}
        for name in ("batch_size", "seed"):
            _integer(getattr(self, name), f"data.{name}", 1 if name == "batch_size" else 0)
        if self.seq_len is None:
            if self.eval_length is None:
                raise DataError("data.seq_len is required (or data.eval_length, to train at twice it)")
            _integer(self.eval_length, "data.eval_length", 2)
            self.seq_len = 2 * self.eval_length
        _integer(self.seq_len, "data.seq_len", 2)
        if self.eval_length is not None and self.seq_len < self.eval_length:
            warnings.warn(
                f"lcplug: data.seq_len {self.seq_len} is shorter than data.eval_length {self.eval_length}; "
                "ProLong finds training beyond the evaluation length helps",
                stacklevel=2,
            )
        if self.max_doc_tokens is not None:
            _integer(self.max_doc_tokens, "data.max_doc_tokens", 1)
        if isinstance(self.cache_dir, Path):
            self.cache_dir = str(self.cache_dir)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise DataError(f"data.cache_dir got {self.cache_dir!r}; valid: a directory path, or null (no token cache)")
        if not isinstance(self.cache_verify, bool):
            raise DataError(f"data.cache_verify got {self.cache_verify!r}; valid: true or false")
        self.stages = self._stages()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DataConfig:
        """From a `data:` mapping; an unknown key is an error naming the closest."""
        if not isinstance(raw, Mapping):
            raise DataError(f"the data section must be a mapping, got {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise DataError(f"unknown data key {key!r}; {did_you_mean(str(key), known)}")
        return cls(**dict(raw))

    @classmethod
    def from_recipe(cls, path: str | Path) -> DataConfig:
        """From the `data:` section of a YAML recipe (or a YAML file that is the section itself)."""
        from ..yamlfile import read_yaml

        path = Path(path)
        raw = read_yaml(path, what="recipe", error=DataError)
        if not isinstance(raw, Mapping) or not isinstance(raw.get("data", raw), Mapping):
            raise DataError(f"recipe {str(path)!r} has no 'data:' mapping")
        return cls.from_dict(raw.get("data", raw))

    # ---- lengths over steps ---------------------------------------------------------------------------
    def _stages(self) -> list[Stage]:
        base = Stage(0, self.seq_len, self.batch_size)
        stages = [base]
        last = -1
        for entry in self.curriculum:
            if not isinstance(entry, Mapping) or "step" not in entry or "seq_len" not in entry:
                raise DataError(f"data.curriculum entry {entry!r}: expected {{step: N, seq_len: L[, batch_size: B]}}")
            extra = set(entry) - {"step", "seq_len", "batch_size"}
            if extra:
                raise DataError(f"data.curriculum entry {dict(entry)!r}: unknown key {sorted(extra)[0]!r}")
            step = _integer(entry["step"], "data.curriculum step", 0)
            seq_len = _integer(entry["seq_len"], "data.curriculum seq_len", 2)
            if step <= last:
                raise DataError(f"data.curriculum steps must increase, got {step} after {last}")
            last = step
            tokens = base.seq_len * base.batch_size
            size = entry.get("batch_size")
            batch = max(1, tokens // seq_len) if size is None else _integer(size, "data.curriculum batch_size", 1)
            stages = [s for s in stages if s.step != step] + [Stage(step, seq_len, batch)]
        return stages

    def shape_at(self, step: int) -> tuple[int, int]:
        """(seq_len, batch_size) of batch number `step`."""
        stage = [s for s in self.stages if s.step <= step][-1]
        return stage.seq_len, stage.batch_size

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.stages)

    # ---- mixture ----------------------------------------------------------------------------------------
    def domains(self) -> list[Domain]:
        """The mixture's domains, validated and normalised (default: every source, equal weights)."""
        names = list(self.sources)
        raw = self.mixture
        if raw is None:
            found = [Domain(name, 1 / len(names)) for name in names]
        elif _is_weights(raw):
            found = parse_domains(raw)
        else:
            found = mixture_plugin(raw).domains(names)
        return normalise(found, names)

    def cut(self, domain: Domain) -> int:
        """The longest document `domain` passes on: its own cut, else `max_doc_tokens`, else the longest row."""
        return domain.max_doc_tokens or self.max_doc_tokens or self.max_seq_len


def _is_weights(raw: Any) -> bool:
    """Whether a mixture value is weights (`a@0.3,...`, `{a: 0.3}`, a list of domains) rather than a plugin spec."""
    if isinstance(raw, str):
        return "@" in raw
    if isinstance(raw, Mapping):
        return "name" not in raw and all(isinstance(v, (int, float, str)) for v in raw.values())
    return isinstance(raw, Sequence)


def mixture_plugin(raw: Any) -> MixturePlugin:
    """A mixture plugin from its spec (`prolong-64k`, `{name: prolong-64k, map: {...}}`)."""
    from ..registry import get_registry
    from ..spec import parse_plugin_spec

    spec = parse_plugin_spec("data", raw)
    cls = get_registry().get("data", spec.name)
    if not issubclass(cls, MixturePlugin):
        raise DataError(f"data plugin {spec.name!r} is a {getattr(cls, 'role', 'data plugin')}, not a mixture")
    return cls.build(spec.params)


def _integer(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{what} got {value!r}; valid: an integer >= {low}")
    return value
