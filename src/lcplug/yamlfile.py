"""Reading the YAML (or JSON) files users hand lcplug: patch specs, data sections, recipes.

One reader, so every such file fails the same way: a one-line error naming the file and what is wrong
(missing, or not valid YAML with the parser's first line), raised as the caller's error class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_yaml(path: str | Path, *, what: str, error: type[Exception]) -> Any:
    """The parsed content of `path` (`.json` as JSON, anything else as YAML); `error` if missing or invalid."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise error(f"{what} {str(path)!r} is not valid {kind}: {str(exc).splitlines()[0]}") from None
