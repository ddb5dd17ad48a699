"""Layer selection: which decoder layers a patch touches.

Forms (all resolved against the model's layer count, all validated):
- `None` / `"all"`: every layer;
- a list of ints, or a string of ints and ranges: `[0, 1, 5]`, `"0-3,8,10-11"` (ranges inclusive,
  negative indices count from the end);
- every-Nth: `"every:4"` (layers 0, 4, 8, ...), `"every:4+3"` (layers 3, 7, 11, ...);
- a hybrid ratio `"S:F"`, e.g. `"5:1"`: in each group of S+F consecutive layers the first S are selected
  (patched, e.g. sparse) and the last F are left full, as in MiMo-V2's 5:1 SWA:global schedule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .errors import SpecError

_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_EVERY = re.compile(r"^\s*every\s*:\s*(\d+)\s*(?:\+\s*(\d+))?\s*$")
_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+))?\s*$")

LAYER_FORMS = "'all', a list of ints, '0-3,8', 'every:N', 'every:N+K' or a ratio 'S:F' such as '5:1'"


def select_layers(selection: Any, num_layers: int) -> list[int]:
    """Resolve `selection` to a sorted list of distinct layer indices in [0, num_layers)."""
    if selection is None or (isinstance(selection, str) and selection.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(selection, bool):
        raise SpecError(f"layers={selection!r} is not a layer selection; valid: {LAYER_FORMS}")
    if isinstance(selection, int):
        return _check([selection], num_layers, selection)
    if isinstance(selection, str):
        text = selection.strip()
        if m := _RATIO.match(text):
            sparse, full = int(m.group(1)), int(m.group(2))
            if sparse + full == 0:
                raise SpecError(f"layers ratio {selection!r} selects nothing; valid: S:F with S+F >= 1")
            period = sparse + full
            return [i for i in range(num_layers) if i % period < sparse]
        if m := _EVERY.match(text):
            step, offset = int(m.group(1)), int(m.group(2) or 0)
            if step < 1 or offset >= step:
                raise SpecError(f"layers {selection!r}: need every:N+K with N >= 1 and 0 <= K < N")
            return [i for i in range(num_layers) if i % step == offset]
        out: list[int] = []
        for part in text.split(","):
            m = _RANGE.match(part)
            if not m:
                raise SpecError(f"layers {selection!r}: cannot parse {part.strip()!r}; valid: {LAYER_FORMS}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            lo, hi = _norm(lo, num_layers, selection), _norm(hi, num_layers, selection)
            if hi < lo:
                raise SpecError(f"layers {selection!r}: range {part.strip()!r} runs backwards")
            out.extend(range(lo, hi + 1))
        return _check(out, num_layers, selection)
    if isinstance(selection, Iterable):
        items = list(selection)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise SpecError(f"layers {selection!r}: a list must hold ints")
        return _check(items, num_layers, selection)
    raise SpecError(f"layers={selection!r} is not a layer selection; valid: {LAYER_FORMS}")


def _norm(index: int, num_layers: int, selection: Any) -> int:
    idx = index + num_layers if index < 0 else index
    if not 0 <= idx < num_layers:
        raise SpecError(f"layers {selection!r}: layer {index} is out of range for a model with {num_layers} layers")
    return idx


def _check(items: list[int], num_layers: int, selection: Any) -> list[int]:
    return sorted({_norm(i, num_layers, selection) for i in items})
