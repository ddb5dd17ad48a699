"""Typed plugin parameters: defaults, help text, coercion from spec strings, validation.

A plugin declares its parameters as a frozen dataclass deriving from `Params`, each field made with
`param(default, help, check=..., valid=...)`. The same declaration drives parsing of the compact spec
string (`"yarn:factor=8"` gives the string "8", coerced to the field's type), validation with an error
naming the parameter and what is valid, the `lcplug plugins` listing, and the manifest round trip.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

from .errors import ParamError, did_you_mean

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    help: str = "",
    *,
    check: Callable[[Any], bool] | None = None,
    valid: str = "",
) -> Any:
    """Declare one plugin parameter.

    `check` returns False for a bad value; `valid` says in words what is valid ("an integer >= 1").
    Mutable defaults (lists, dicts) are copied per instance.
    """
    meta = {"help": help, "check": check, "valid": valid}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (often a string from a compact spec) to type `tp`; raise ValueError if impossible."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.replace(";", " ").replace("|", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return origin(_coerce(v, item_tp) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.replace("_", ""))
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError


@dataclasses.dataclass(frozen=True)
class Params:
    """Base class of every plugin's parameters (a frozen dataclass). A plugin without parameters uses it as is."""

    _owner: ClassVar[str] = "plugin"

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, owner: str | None = None) -> Params:
        """Build validated params from user input: unknown names, bad types and bad values raise ParamError."""
        owner = owner or cls._owner
        raw = dict(raw or {})
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in cls.fields()}
        for key in raw:
            if key not in known:
                raise ParamError(
                    f"{owner}: unknown parameter {key!r}; {did_you_mean(key, known)}"
                    if known
                    else f"{owner}: unknown parameter {key!r}; this plugin takes no parameters"
                )
        values = {}
        for name, field in known.items():
            tp = hints[name]
            if name in raw:
                try:
                    values[name] = _coerce(raw[name], tp)
                except (ValueError, TypeError):
                    raise ParamError(
                        f"{owner}: parameter {name!r} got {raw[name]!r}; expected {_type_name(tp)}"
                        + (f" ({field.metadata['valid']})" if field.metadata.get("valid") else "")
                    ) from None
            elif field.default is _MISSING and field.default_factory is _MISSING:
                raise ParamError(f"{owner}: parameter {name!r} is required ({field.metadata.get('help', '')})")
        params = cls(**values)
        params.validate(owner)
        return params

    def validate(self, owner: str | None = None) -> None:
        """Run each field's `check`; subclasses add cross-field checks (call super first)."""
        owner = owner or self._owner
        for field in self.fields():
            check = field.metadata.get("check")
            value = getattr(self, field.name)
            if check is not None and value is not None and not check(value):
                valid = field.metadata.get("valid") or "see `lcplug plugins`"
                raise ParamError(f"{owner}: parameter {field.name!r} got {value!r}; valid: {valid}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every parameter (defaults included), as the manifest records them."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in self.fields()}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Name, type, default, help and valid range of each parameter, for listings and docs."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in cls.fields():
            required = f.default is _MISSING and f.default_factory is _MISSING
            if f.default is not _MISSING:
                default = _jsonable(f.default)
            elif f.default_factory is not _MISSING:
                default = _jsonable(f.default_factory())
            else:
                default = None
            out.append(
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "required": required,
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "valid": f.metadata.get("valid", ""),
                }
            )
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
